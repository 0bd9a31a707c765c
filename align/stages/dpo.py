"""Direct preference optimisation on TRL's DPOTrainer. The reference is the stage's starting
model: with LoRA/QLoRA it is that same base with the adapter disabled (no second copy in memory,
alignment-handbook #224); with full fine-tuning TRL loads a frozen copy. `beta` and `loss_type`
are DPOConfig fields and pass through.
"""

from trl import DPOConfig as Config
from trl import DPOTrainer

from align.stages.sft import load_datasets
from align.training import TRAINING_OPTIONS, check_training_fields, load_policy, train_and_save, trainer_config

OPTIONS = TRAINING_OPTIONS
DATA_KIND = "preference"


def validate(stage, model):
    check_training_fields(stage)


def build_trainer(stage, ctx):
    train, evals = load_datasets(stage, ctx, DATA_KIND)
    model, tokenizer, peft_config = load_policy(stage, ctx)
    return DPOTrainer(
        model=model,
        ref_model=None,
        args=trainer_config(stage, ctx, **({"eval_strategy": "epoch"} if evals is not None else {})),
        train_dataset=train,
        eval_dataset=evals,
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def run(stage, ctx):
    trainer = build_trainer(stage, ctx)
    metrics = train_and_save(trainer, stage, ctx)
    for key in ("eval_rewards/accuracies", "eval_rewards/margins"):
        if key in metrics:
            metrics[key.replace("eval_rewards/", "pref_")] = metrics[key]
    return metrics
