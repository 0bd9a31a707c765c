"""Stage types. Each module `align.stages.<type>` defines:

    Config   the dataclass whose fields a stage block may set (TRL's config class for TRL stages)
    OPTIONS  the align-level keys it also accepts (dataset, peft, quantization, model, ...)
    run(stage, ctx) -> dict   trains, writes its output into stage.dir, returns metrics
    validate(stage, model)    optional: checks that need no data or model (run at recipe load)
"""

import importlib

from align.errors import AlignError
from align.recipe import suggest

TYPES = ("task", "init", "pretrain", "sft", "reward", "dpo", "ppo", "rloo", "grpo", "eval")


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
