"""Causal-LM training on raw text (a `text` column): warms an initialised model up before SFT
and reports held-out perplexity. Same fields as SFTConfig."""

from align.stages import Traits, sft
from align.stages.sft import OPTIONS, Config  # noqa: F401  (the stage's config class and options)

TRAITS = Traits(produces="policy", data="text")


def validate(stage, model):
    sft.validate(stage, model)


def run(stage, ctx):
    return sft.run(stage, ctx)
