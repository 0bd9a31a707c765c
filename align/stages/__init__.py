"""Stage types. Each module `align.stages.<type>` defines:

    Config   the dataclass whose fields a stage block may set (TRL's config class for TRL stages)
    OPTIONS  the align-level keys it also accepts (dataset, peft, quantization, model, ...)
    TRAITS   what the stage is (a `Traits`): what it produces, what data it takes, ...
    run(stage, ctx) -> dict   trains, writes its output into stage.dir, returns metrics
    validate(stage, model)    optional: checks that need no data or model (run at recipe load)

Everything that asks "which stages produce a policy / take pairs / can be chatted with" (the run
loop, the planner, eval, report, chat) reads `TRAITS`, so a new stage type is one new module.
"""

from __future__ import annotations

import dataclasses
import importlib

from align.errors import AlignError, suggest

TYPES = ("task", "init", "pretrain", "sft", "reward", "dpo", "ppo", "rloo", "grpo", "eval")


@dataclasses.dataclass(frozen=True)
class Traits:
    produces: str | None = None
    """"policy" (a causal LM), "reward_model" (a one-logit sequence classifier), "data", or None."""
    data: str | None = None
    """The dataset kind it trains on (a key of `align.data.FORMATS`), None when it takes none."""
    chat: bool = False
    """A chat policy: evaluated, compared and chatted with by default (sft, dpo and the RL stages)."""
    online: bool = False
    """Trains on its own generations (PPO, RLOO, GRPO): logs rewards, KL and response lengths."""


def stage_module(stage_type, where: str):
    if stage_type not in TYPES:
        raise AlignError(f"{where}.type: unknown stage type '{stage_type}'{suggest(str(stage_type), TYPES)} "
                         f"(types: {', '.join(TYPES)})")
    try:
        return importlib.import_module(f"align.stages.{stage_type}")
    except ModuleNotFoundError as e:
        if e.name == f"align.stages.{stage_type}":
            raise AlignError(f"{where}.type: stage type '{stage_type}' is not available in this version") from None
        raise


def traits(stage_type: str) -> Traits:
    """The traits a stage type declares."""
    return stage_module(stage_type, f"type {stage_type}").TRAITS
