"""Reward model on TRL's RewardTrainer: a one-logit sequence classifier trained with the
Bradley-Terry loss on (prompt, chosen, rejected) pairs; an optional `margin` column and
`center_rewards_coefficient` pass through. Full, LoRA or QLoRA.

The output loads with `AutoModelForSequenceClassification.from_pretrained` (full), or as base +
adapter whose `modules_to_save` holds the score head (LoRA), so the PPO stage and TRL's
RLOO/GRPO trainers can use it unchanged.
"""

from trl import RewardConfig as Config
from trl import RewardTrainer

from align.stages import Traits
from align.training import TRAINING_OPTIONS, check_training_fields, run_trainer

OPTIONS = TRAINING_OPTIONS
TRAITS = Traits(produces="reward_model", data="preference")


def validate(stage, model):
    check_training_fields(stage)


def run(stage, ctx):
    metrics = run_trainer(stage, ctx, RewardTrainer, kind="seq-cls")
    # TRL logs pair accuracy and the mean chosen-rejected margin; name them for the report.
    if "eval_accuracy" in metrics:
        metrics["pair_accuracy"] = metrics["eval_accuracy"]
    if "eval_margin" in metrics:
        metrics["mean_margin"] = metrics["eval_margin"]
    return metrics
