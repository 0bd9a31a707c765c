"""The run loop: stages in order, each skipped when finished with the same config, resumed from
its last checkpoint when it was interrupted, and marked complete only after its output is saved.

A run holds the run folder's lock from start to end. A stage whose finished output belongs to
another config is rebuilt beside it (`rundir.prepare_stage_dir`) and swapped in only once
complete, so a failed edit never costs the old output.

Under `accelerate launch` every process runs this loop; only the main process takes the lock
and writes markers, metrics and the resolved recipe, and all processes wait for it at each
boundary.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from align import distributed, rundir
from align.divergence import Diverged
from align.errors import AlignError, disk_full
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
    """Check every dataset and local model that already exists and import every named function
    now, before any compute is spent (a dry run only checks their form: importing runs their
    module's code)."""
    from align import data

    produced = str(recipe.output_dir)
    for stage in todo:
        for where, spec in [] if dry_run else specs_of(stage):
            load_function(spec, where)
        for key, kind in _data_keys(stage):
            spec = stage.options.get(key)
            spec = {"path": spec} if isinstance(spec, str) else spec
            if not spec:
                continue
            sources = spec if isinstance(spec, list) else [spec]
            if all(isinstance(s, dict) and isinstance(s.get("path"), str) and not s["path"].startswith(produced)
                   and (Path(s["path"]).exists() or data.looks_local(s["path"])) for s in sources):
                data.load(spec, kind, f"stages.{stage.name}.{key}", recipe.seed)
    for stage in todo:
        _check_models(recipe, stage)


EVAL_DATA = {"prompts": "prompt", "pairs": "preference", "texts": "text"}  # the eval stage's files


def _data_keys(stage) -> list[tuple[str, str]]:
    kind = stage.traits.data
    keys = [("dataset", kind), ("eval_dataset", kind)] if kind else []
    return keys + [(k, v) for k, v in EVAL_DATA.items() if stage.type == "eval"]


def _check_models(recipe: Recipe, stage):
    """Local model paths exist and hold a model; a reward model has a trained score head (an
    earlier stage's output counts by what that stage produces)."""
    from align import models

    outputs = {str(s.dir): s for s in recipe.stages}
    named = [(key, stage.options.get(key)) for key in ("model", "reward_model", "value_model", "reference")]
    policies = stage.options.get("policies")
    named += [("policies", p) for p in (policies.values() if isinstance(policies, dict) else policies or [])]
    if not stage.options.get("model") and stage.type not in ("init", "task", "eval"):
        named.append(("model", recipe.start_model(stage)))
    for key, path in named:
        if not isinstance(path, str) or not path:
            continue
        where = f"stages.{stage.name}.{key}" if key in stage.options else "model"
        policy = key in ("model", "policies", "reference") and stage.traits.produces != "reward_model"
        source = outputs.get(str(Path(path)))
        if source is not None:
            if key == "reward_model" and source.traits.produces != "reward_model":
                raise AlignError(f"{where}: ${{{source.name}}} is a {source.type} stage's output, a causal LM with no "
                                 f"trained score head (it would score with a random one); use a reward stage's "
                                 f"output, e.g. ${{reward}}")
            if policy and source.traits.produces == "reward_model":
                raise AlignError(f"{where}: ${{{source.name}}} is a reward model, not a policy: it scores text and "
                                 f"cannot generate it; use a policy stage's output (sft, dpo, ppo ...)")
        elif not path.startswith(str(recipe.output_dir)):
            models.check_model_path(path, where)
            if key == "reward_model":
                models.check_reward_model(path, where)
            elif policy:
                models.check_policy_model(path, where)


def run(recipe: Recipe, only: str | None = None, dry_run: bool = False):
    state = distributed.process_state()  # a real process group on CPU too
    ctx = Context(recipe, state)
    selected = [recipe.stage(only)] if only else recipe.stages
    with contextlib.ExitStack() as held:
        problem = None
        if ctx.is_main:
            try:
                rundir.check_output_dir(recipe.output_dir, create=not dry_run)
                if not dry_run:  # the lock is held until the run ends; then nothing else writes here
                    held.enter_context(rundir.locked(recipe.output_dir))
                    for stage in recipe.stages:
                        rundir.recover(stage)
                _check_earlier(recipe, only)
                _preflight(recipe, [s for s in selected if not rundir.is_complete(s)], dry_run)
            except AlignError as e:
                problem = str(e)
        if state.num_processes > 1:  # the other processes must stop too, not wait for the main one forever
            from accelerate.utils import broadcast_object_list

            problem = broadcast_object_list([problem])[0]
            if problem and not ctx.is_main:
                # The main process reports it and exits 2. Exiting 0 here lets it: a worker's
                # failure would make the launcher kill the main process before it has printed.
                sys.exit(0)
        if problem:
            raise AlignError(problem)
        if dry_run:
            from align import plan

            ctx.log(plan.plan_text(recipe))
            return
        _run_stages(recipe, selected, ctx)


def _check_earlier(recipe: Recipe, only: str | None):
    if not only:
        return
    for prev in recipe.earlier(recipe.stage(only)):
        if not rundir.is_complete(prev):
            raise AlignError(f"--stage {only}: earlier stage '{prev.name}' is not finished; run the recipe "
                             f"without --stage first")


def _run_stages(recipe: Recipe, selected, ctx: Context):
    from transformers import set_seed

    todo = [s for s in selected if not rundir.is_complete(s)]
    if ctx.is_main:
        rundir.write_atomic(recipe.output_dir / rundir.RECIPE, dump_yaml(recipe.resolved))
    else:
        _quiet_workers()

    for stage in selected:
        if stage not in todo:
            ctx.log(f"= {stage.name:<10} finished earlier (config unchanged) -> {stage.dir}")
            _push_if_asked(recipe, stage, ctx)  # a push that failed last time is retried
            continue
        problem = rundir.completion_problem(stage)
        if ctx.is_main:
            rundir.prepare_stage_dir(stage)
        ctx.wait()
        # The stage is built in its own folder, or beside its finished output when that exists.
        building = dataclasses.replace(stage, dir=rundir.building_in(stage))
        if building.dir != stage.dir:
            ctx.log(f"  {stage.name}: {problem}; the old output stays until the new one is complete")
        ctx.log(f"> {stage.name:<10} {stage.type} ...")
        set_seed(recipe.seed)
        start = time.time()
        try:
            metrics = stage.module.run(building, ctx) or {}
        except Diverged as e:
            raise AlignError(f"stages.{stage.name}: {e}") from None
        except Exception as e:  # a full disk reads differently from every library that writes
            path = disk_full(e, building.dir)
            if path is None:
                raise
            raise AlignError(f"stage {stage.name}: no space left on device while writing {path}") from None
        metrics["stage_seconds"] = round(time.time() - start, 2)
        metrics["world_size"] = ctx.state.num_processes
        metrics["engine"] = distributed.in_use()
        ctx.wait()
        if ctx.is_main:
            rundir.mark_complete(building, metrics)
            rundir.install(stage, building.dir)
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
