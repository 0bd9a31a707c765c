"""The run loop: stages in order, each skipped when finished with the same config, resumed from
its last checkpoint when it was interrupted, and marked complete only after its output is saved.

Under `accelerate launch` every process runs this loop; only the main process writes markers,
metrics and the resolved recipe, and all processes wait for it at each boundary.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from align.errors import AlignError
from align.recipe import Recipe, dump_yaml

MARKER = ".align-complete.json"  # written last, atomically: the stage is finished
CONFIG_HASH = ".align-config"  # written first: which config the partial contents belong to
MODEL_STAGES = ("init", "pretrain", "sft", "dpo", "ppo", "rloo", "grpo")


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

    def default_model(self, stage) -> str:
        """The latest earlier policy stage's output, else the recipe's `model`."""
        earlier = self.recipe.stages[: self.recipe.stages.index(stage)]
        for prev in reversed(earlier):
            if prev.type in MODEL_STAGES:
                return str(prev.dir)
        if self.recipe.model.get("name_or_path"):
            return self.recipe.model["name_or_path"]
        raise AlignError(f"stages.{stage.name}.model: no model to start from; set the top-level `model:` "
                         f"or `model: ${{stage}}` naming an earlier stage")


def write_atomic(path: Path, text: str):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def is_complete(stage) -> bool:
    try:
        return json.loads((stage.dir / MARKER).read_text()).get("hash") == stage.hash
    except (OSError, ValueError):
        return False


def check_output_dir(path: Path, create: bool = True):
    if not create:  # a dry run leaves no trace: check the nearest existing folder instead
        existing = next(p for p in [path, *path.parents] if p.exists())
        if not existing.is_dir() or not os.access(existing, os.W_OK):
            raise AlignError(f"output_dir: cannot write to '{path}' ('{existing}' is not a writable folder)")
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".align-write-test{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise AlignError(f"output_dir: cannot write to '{path}': {e.strerror or e}") from None


def _prepare_stage_dir(stage, ctx):
    """Keep a partial stage's checkpoints only when they belong to the same config."""
    hash_file = stage.dir / CONFIG_HASH
    if stage.dir.exists():
        old = hash_file.read_text().strip() if hash_file.exists() else None
        if old != stage.hash:
            shutil.rmtree(stage.dir)
    (stage.dir).mkdir(parents=True, exist_ok=True)
    (stage.dir / MARKER).unlink(missing_ok=True)
    write_atomic(hash_file, stage.hash)


def _preflight(recipe: Recipe, todo):
    """Check every dataset that already exists now, before any compute is spent."""
    from align import data

    produced = str(recipe.output_dir)
    for stage in todo:
        kind = getattr(stage.module, "DATA_KIND", None)
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
            if not is_complete(prev):
                raise AlignError(f"--stage {only}: earlier stage '{prev.name}' is not finished; run the recipe "
                                 f"without --stage first")
    todo = [s for s in selected if not is_complete(s)]
    problem = None
    if ctx.is_main:
        try:
            check_output_dir(recipe.output_dir, create=not dry_run)
            _preflight(recipe, todo)
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
        write_atomic(recipe.output_dir / "recipe.yaml", dump_yaml(recipe.resolved))
    if not state.is_main_process:
        _quiet_workers()

    for stage in selected:
        if stage not in todo:
            ctx.log(f"= {stage.name:<10} finished earlier (config unchanged) -> {stage.dir}")
            _push_if_asked(recipe, stage, ctx)  # a push that failed last time is retried
            continue
        if ctx.is_main:
            _prepare_stage_dir(stage, ctx)
        ctx.wait()
        ctx.log(f"> {stage.name:<10} {stage.type} ...")
        set_seed(recipe.seed)
        start = time.time()
        metrics = stage.module.run(stage, ctx) or {}
        metrics["stage_seconds"] = round(time.time() - start, 2)
        metrics["world_size"] = state.num_processes
        ctx.wait()
        if ctx.is_main:
            write_atomic(stage.dir / "metrics.json", json.dumps(metrics, indent=2, default=float))
            write_atomic(stage.dir / MARKER, json.dumps({"hash": stage.hash, "type": stage.type,
                                                        "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}))
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
    for key in ("eval_perplexity", "eval_accuracy", "gold_score", "reward_mean", "parameters"):
        if isinstance(metrics.get(key), (int, float)):
            value = metrics[key]
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value:,}")
    return "  ".join(parts) + f"  -> {stage.dir}"


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"


def plan_text(recipe: Recipe) -> str:
    lines = [f"recipe '{recipe.name}' is valid; outputs in {recipe.output_dir}"]
    for stage in recipe.stages:
        state = "finished" if is_complete(stage) else "to run"
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
