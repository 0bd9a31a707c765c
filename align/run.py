"""The run loop: stages in order, each skipped when finished with the same config, resumed from
its last checkpoint when it was interrupted, and marked complete only after its output is saved.

Under `accelerate launch` every process runs this loop; only the main process writes markers,
metrics and the resolved recipe, and all processes wait for it at each boundary.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path

from align import rundir
from align.errors import AlignError
from align.functions import load_function, specs_of
from align.recipe import Recipe, dump_yaml


@dataclass
class Context:
    recipe: Recipe
    state: object  # accelerate.PartialState

    @property
    def is_main(self) -> bool:
        return self.state.is_main_process

    @property
    def seed(self) -> int:
        return self.recipe.seed

    @property
    def model(self) -> dict:
        return self.recipe.model

    def log(self, message: str):
        if self.is_main:
            print(message, flush=True)

    def wait(self):
        self.state.wait_for_everyone()


def _preflight(recipe: Recipe, todo, dry_run: bool):
    """Check every dataset that already exists and import every named function now, before any
    compute is spent (a dry run only checks their form: importing runs their module's code)."""
    from align import data

    produced = str(recipe.output_dir)
    for stage in todo:
        for where, spec in [] if dry_run else specs_of(stage):
            load_function(spec, where)
        kind = stage.traits.data
        for key in ("dataset", "eval_dataset"):
            spec = stage.options.get(key)
            if not spec or kind is None:
                continue
            sources = spec if isinstance(spec, list) else [spec]
            if all(isinstance(s, dict) and isinstance(s.get("path"), str) and not s["path"].startswith(produced)
                   and (Path(s["path"]).exists() or data.looks_local(s["path"])) for s in sources):
                data.load(spec, kind, f"stages.{stage.name}.{key}", recipe.seed)


def run(recipe: Recipe, only: str | None = None, dry_run: bool = False):
    import torch
    from accelerate import PartialState
    from transformers import set_seed

    # Without CUDA, accelerate only starts the gloo process group when asked for the CPU.
    state = PartialState(cpu=not torch.cuda.is_available())
    ctx = Context(recipe, state)
    selected = [recipe.stage(only)] if only else recipe.stages
    if only:
        index = recipe.stages.index(selected[0])
        for prev in recipe.stages[:index]:
            if not rundir.is_complete(prev):
                raise AlignError(f"--stage {only}: earlier stage '{prev.name}' is not finished; run the recipe "
                                 f"without --stage first")
    todo = [s for s in selected if not rundir.is_complete(s)]
    problem = None
    if ctx.is_main:
        try:
            rundir.check_output_dir(recipe.output_dir, create=not dry_run)
            _preflight(recipe, todo, dry_run)
        except AlignError as e:
            problem = str(e)
    if state.num_processes > 1:  # the other processes must stop too, not wait for the main one forever
        from accelerate.utils import broadcast_object_list

        problem = broadcast_object_list([problem])[0]
        if problem and not ctx.is_main:
            sys.exit(2)  # the main process reports it
    if problem:
        raise AlignError(problem)
    if dry_run:
        from align import plan

        ctx.log(plan_text(recipe))
        ctx.log(plan.plan_text(recipe))
        return
    if ctx.is_main:
        rundir.write_atomic(recipe.output_dir / rundir.RECIPE, dump_yaml(recipe.resolved))
    if not state.is_main_process:
        _quiet_workers()

    for stage in selected:
        if stage not in todo:
            ctx.log(f"= {stage.name:<10} finished earlier (config unchanged) -> {stage.dir}")
            _push_if_asked(recipe, stage, ctx)  # a push that failed last time is retried
            continue
        if ctx.is_main:
            rundir.prepare_stage_dir(stage)
        ctx.wait()
        ctx.log(f"> {stage.name:<10} {stage.type} ...")
        set_seed(recipe.seed)
        start = time.time()
        metrics = stage.module.run(stage, ctx) or {}
        metrics["stage_seconds"] = round(time.time() - start, 2)
        metrics["world_size"] = state.num_processes
        ctx.wait()
        if ctx.is_main:
            rundir.mark_complete(stage, metrics)
        ctx.wait()
        ctx.log(summary_line(stage, metrics))
        _push_if_asked(recipe, stage, ctx)
    ctx.log(f"outputs: {recipe.output_dir.resolve()}")
    if ctx.is_main:  # report.md + plots; a plotting failure must never fail a finished run
        try:
            from align import report

            ctx.log(f"report: {report.write_report(recipe.output_dir)}")
        except Exception as e:  # noqa: BLE001
            print(f"warning: report not written: {type(e).__name__}: {e}", file=sys.stderr)


def summary_line(stage, metrics: dict) -> str:
    parts = [f"+ {stage.name:<10} {_duration(metrics['stage_seconds'])}"]
    if metrics.get("train_loss_first") is not None:
        parts.append(f"loss {metrics['train_loss_first']:.3f} -> {metrics['train_loss_last']:.3f}")
    for key in ("eval_perplexity", "eval_accuracy", "gold_score", "reward_mean", "eval_gold_score", "parameters"):
        if isinstance(metrics.get(key), (int, float)):
            value = metrics[key]
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value:,}")
    return "  ".join(parts) + f"  -> {stage.dir}"


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def plan_text(recipe: Recipe) -> str:
    lines = [f"recipe '{recipe.name}' is valid; outputs in {recipe.output_dir}"]
    for stage in recipe.stages:
        state = "finished" if rundir.is_complete(stage) else "to run"
        model = stage.options.get("model", "")
        lines.append(f"  {stage.name:<10} {stage.type:<9} {state:<9} {model}")
    return "\n".join(lines)


def _quiet_workers():
    import transformers

    transformers.logging.set_verbosity_error()
    import datasets

    datasets.disable_progress_bars()


def _push_if_asked(recipe: Recipe, stage, ctx):
    hub = recipe.hub
    if not hub or stage.name not in hub.get("stages", []) or not ctx.is_main:
        return
    from align import push

    push.push_stage(recipe, stage, repo_id=hub["repo_id"], private=hub.get("private", False),
                    merged=hub.get("merged", False))
