"""GRPO on TRL's GRPOTrainer: the same inputs as the `rloo` stage (reward model and/or reward
functions, prompt-only data); every other key is a GRPOConfig field."""

from trl import GRPOConfig as Config  # noqa: F401  (the stage's fields)
from trl import GRPOTrainer

from align.stages import rloo
from align.stages.rloo import OPTIONS, TRAITS  # noqa: F401


def validate(stage, model):
    rloo.validate(stage, model)


def run(stage, ctx):
    return rloo.run_online(stage, ctx, GRPOTrainer)
