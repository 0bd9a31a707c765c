"""Write the toy task's data (align.task) into the stage folder: sft.jsonl, prefs.jsonl,
prompts.jsonl, eval_prompts.jsonl, eval_prefs.jsonl. Later stages name them as
`${task}/sft.jsonl`, and the eval stage scores with the task's gold judge."""

import dataclasses

from align import task
from align.stages import Traits
from align.task import TaskConfig as Config  # noqa: F401  (the stage's fields)

OPTIONS: set = set()
TRAITS = Traits(produces="data")
VERSION = 2  # bump when align/task.py generates different rows for the same config


def run(stage, ctx):
    cfg = stage.config()
    if ctx.is_main:
        task.write_task(stage.dir, **dataclasses.asdict(cfg))
    return {"rows_sft": cfg.n_sft, "rows_pairs": cfg.n_pairs, "rows_prompts": cfg.n_prompts}
