"""Supervised fine-tuning on TRL's SFTTrainer: full, LoRA (`peft:`) or QLoRA (`peft:` +
`quantization:`). Loss falls on completions (prompt/completion data) or assistant turns
(conversational data) only; `packing` / `padding_free` pass through to SFTConfig.
"""

import math

from trl import SFTConfig as Config
from trl import SFTTrainer

from align.stages import Traits
from align.training import TRAINING_OPTIONS, check_training_fields, run_trainer

OPTIONS = TRAINING_OPTIONS
TRAITS = Traits(produces="policy", data="lm", chat=True)


def validate(stage, model):
    check_training_fields(stage)


def _defaults(train) -> dict:
    # Never learn to imitate the user's turns.
    return {"assistant_only_loss": True} if "messages" in train.column_names else {}


def run(stage, ctx):
    metrics = run_trainer(stage, ctx, SFTTrainer, defaults=_defaults)
    if "eval_loss" in metrics:
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
    return metrics
