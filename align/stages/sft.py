"""Supervised fine-tuning on TRL's SFTTrainer: full, LoRA (`peft:`) or QLoRA (`peft:` +
`quantization:`). Loss falls on completions (prompt/completion data) or assistant turns
(conversational data) only; `packing` / `padding_free` pass through to SFTConfig.
"""

import math

from trl import SFTConfig as Config
from trl import SFTTrainer

from align import data
from align.training import TRAINING_OPTIONS, check_training_fields, load_policy, train_and_save, trainer_config

OPTIONS = TRAINING_OPTIONS
DATA_KIND = "lm"


def validate(stage, model):
    check_training_fields(stage)


def load_datasets(stage, ctx, kind=DATA_KIND):
    where = f"stages.{stage.name}"
    train, evals = data.load(stage.options["dataset"], kind, f"{where}.dataset", ctx.seed)
    if stage.options.get("eval_dataset"):
        evals, _ = data.load(stage.options["eval_dataset"], kind, f"{where}.eval_dataset", ctx.seed)
    return train, evals


def run(stage, ctx, kind=DATA_KIND):
    train, evals = load_datasets(stage, ctx, kind)
    model, tokenizer, peft_config = load_policy(stage, ctx)
    defaults = {}
    if "messages" in train.column_names:
        defaults["assistant_only_loss"] = True  # never learn to imitate the user's turns
    if evals is not None:
        defaults["eval_strategy"] = "epoch"
    trainer = SFTTrainer(
        model=model,
        args=trainer_config(stage, ctx, **defaults),
        train_dataset=train,
        eval_dataset=evals,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    metrics = train_and_save(trainer, stage, ctx)
    if "eval_loss" in metrics:
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    return metrics
