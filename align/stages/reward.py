"""Reward model on TRL's RewardTrainer: a one-logit sequence classifier trained with the
Bradley-Terry loss on (prompt, chosen, rejected) pairs; an optional `margin` column and
`center_rewards_coefficient` pass through. Full, LoRA or QLoRA.

The output loads with `AutoModelForSequenceClassification.from_pretrained` (full), or as base +
adapter whose `modules_to_save` holds the score head (LoRA), so the PPO stage and TRL's
RLOO/GRPO trainers can use it unchanged.
"""

from trl import RewardConfig as Config
from trl import RewardTrainer

from align.stages.sft import load_datasets
from align.training import TRAINING_OPTIONS, check_training_fields, load_policy, train_and_save, trainer_config

OPTIONS = TRAINING_OPTIONS
DATA_KIND = "preference"


def validate(stage, model):
    check_training_fields(stage)


def run(stage, ctx):
    train, evals = load_datasets(stage, ctx, DATA_KIND)
    model, tokenizer, peft_config = load_policy(stage, ctx, kind="seq-cls")
    trainer = RewardTrainer(
        model=model,
        args=trainer_config(stage, ctx, **({"eval_strategy": "epoch"} if evals is not None else {})),
        train_dataset=train,
        eval_dataset=evals,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    metrics = train_and_save(trainer, stage, ctx)
    # TRL logs pair accuracy and the mean chosen-rejected margin; name them for the report.
    if "eval_accuracy" in metrics:
        metrics["pair_accuracy"] = metrics["eval_accuracy"]
    if "eval_margin" in metrics:
        metrics["mean_margin"] = metrics["eval_margin"]
    return metrics
