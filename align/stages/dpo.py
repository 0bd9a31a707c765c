"""Direct preference optimisation on TRL's DPOTrainer. The reference is the stage's starting
model: with LoRA/QLoRA it is that same base with the adapter disabled (no second copy in memory,
alignment-handbook #224); with full fine-tuning TRL loads a frozen copy. `beta` and `loss_type`
are DPOConfig fields and pass through.
"""

from trl import DPOConfig as Config
from trl import DPOTrainer

from align.stages import Traits
from align.training import TRAINING_OPTIONS, check_training_fields, run_trainer

OPTIONS = TRAINING_OPTIONS
TRAITS = Traits(produces="policy", data="preference", chat=True)


def validate(stage, model):
    check_training_fields(stage)


def run(stage, ctx):
    metrics = run_trainer(stage, ctx, DPOTrainer)
    for key in ("eval_rewards/accuracies", "eval_rewards/margins"):
        if key in metrics:
            metrics[key.replace("eval_rewards/", "pref_")] = metrics[key]
    return metrics
