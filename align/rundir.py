"""The run folder: its layout, and every write into it.

    <output_dir>/
      recipe.yaml                     the resolved recipe (secrets removed)
      report.md, plots/               `align report`
      <stage>/
        .align-config                 written first: the config hash the partial contents belong to
        .align-complete.json          written last, atomically: the stage is finished
        metrics.json                  the stage's final metrics
        log_history.jsonl             every logged step (TRL stages and PPO)
        checkpoints/checkpoint-N      resumable state; complete once trainer_state.json parses

Every file is written through `write_atomic` / `write_jsonl` (a temporary file beside the target,
then one rename), so a kill never leaves a half-written file that a later run trusts.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import time
from pathlib import Path

from align.errors import AlignError

RECIPE = "recipe.yaml"
MARKER = ".align-complete.json"
CONFIG_HASH = ".align-config"
METRICS = "metrics.json"
LOG_HISTORY = "log_history.jsonl"
CHECKPOINTS = "checkpoints"


# ---------------------------------------------------------------------------------------------
# Atomic writes


def write_atomic(path, data: str | bytes):
    """Write `data` to `path` through a temporary file in the same folder, then rename it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data) if isinstance(data, bytes) else tmp.write_text(data, encoding="utf-8")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_jsonl(path, rows):
    """Rows as JSON Lines, atomically (the parent folder is created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False, default=float) + "\n" for row in rows))


def read_jsonl(path) -> list[dict]:
    """The JSON objects of a JSON Lines file; unreadable lines (a cut last line) are skipped."""
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def read_json(path):
    """A JSON file's value, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def atomic_dir(out):
    """Yield a temporary folder beside `out`; when the block succeeds it replaces `out` in one
    rename, else it is removed. Either way `out` is never left half-written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# The run folder and its stages


def check_output_dir(path: Path, create: bool = True):
    """`output_dir` must be a writable folder (a dry run checks without creating anything)."""
    if not create:
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


def read_recipe(run_dir) -> dict:
    """The resolved recipe a run saved in its folder."""
    from align.recipe import parse_yaml

    path = Path(run_dir) / RECIPE
    if not path.is_file():
        raise AlignError(f"'{run_dir}' is not a run folder: it has no {RECIPE} (run `align run RECIPE` first)")
    try:
        recipe = parse_yaml(path.read_text(encoding="utf-8"), str(path))
    except OSError as e:
        raise AlignError(f"{path}: cannot read: {e.strerror or e}") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("stages"), dict):
        raise AlignError(f"{path}: no `stages` mapping; is this a run folder?")
    return recipe


def is_complete(stage) -> bool:
    """Whether `stage` (anything with `.dir` and `.hash`) finished with its current config."""
    marker = read_json(Path(stage.dir) / MARKER)
    return isinstance(marker, dict) and marker.get("hash") == stage.hash


def mark_complete(stage, metrics: dict):
    """Write the stage's metrics, then its completion marker (last, atomically)."""
    write_atomic(stage.dir / METRICS, json.dumps(metrics, indent=2, default=float))
    write_atomic(stage.dir / MARKER, json.dumps({"hash": stage.hash, "type": stage.type,
                                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}))


def prepare_stage_dir(stage):
    """Keep a partial stage's checkpoints only when they belong to the same config."""
    hash_file = stage.dir / CONFIG_HASH
    if stage.dir.exists():
        old = hash_file.read_text().strip() if hash_file.exists() else None
        if old != stage.hash:
            shutil.rmtree(stage.dir)
    stage.dir.mkdir(parents=True, exist_ok=True)
    (stage.dir / MARKER).unlink(missing_ok=True)
    write_atomic(hash_file, stage.hash)


def finished_stages(run_dir) -> list[tuple[str, str, Path]]:
    """(name, type, folder) of the run's finished stages, in recipe order."""
    run_dir = Path(run_dir)
    out = []
    for name, block in read_recipe(run_dir)["stages"].items():
        marker = read_json(run_dir / str(name) / MARKER)
        if isinstance(marker, dict):
            out.append((str(name), str(marker.get("type") or (block or {}).get("type") or name), run_dir / str(name)))
    return out


# ---------------------------------------------------------------------------------------------
# Checkpoints and log history


def complete_checkpoints(folder: Path) -> list[Path]:
    """`checkpoint-N` folders, oldest first, whose `trainer_state.json` parses. transformers
    (and align's PPO trainer) write it last, so a folder without a readable one was cut off
    mid-save by a kill and is passed over; the run saves that step again when it gets there."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = sorted((int(m.group(1)), path) for path in folder.iterdir()
                   if path.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", path.name)))
    return [path for _, path in found if isinstance(read_json(path / "trainer_state.json"), dict)]


def last_checkpoint(stage_dir) -> str | None:
    found = complete_checkpoints(Path(stage_dir) / CHECKPOINTS)
    return str(found[-1]) if found else None


def write_log_history(history: list[dict], stage_dir):
    """Every logged step (loss, eval metrics, ...) as JSON Lines, for `align report`: the
    checkpoints' trainer_state.json may be pruned or never written (`save_strategy: "no"`)."""
    write_jsonl(Path(stage_dir) / LOG_HISTORY, history)


def read_log_history(stage_dir) -> list[dict]:
    """The stage's per-step log: `log_history.jsonl`, else the newest checkpoint's
    trainer_state.json (runs from before log_history.jsonl existed)."""
    stage_dir = Path(stage_dir)
    if (stage_dir / LOG_HISTORY).is_file():
        return read_jsonl(stage_dir / LOG_HISTORY)
    for checkpoint in reversed(complete_checkpoints(stage_dir / CHECKPOINTS)):
        state = read_json(checkpoint / "trainer_state.json")
        if isinstance(state.get("log_history"), list):
            return [r for r in state["log_history"] if isinstance(r, dict)]
    return []


# ---------------------------------------------------------------------------------------------
# Targets of chat / generate / merge / push


def resolve_target(target: str) -> str:
    """A run folder means its last finished chat policy (else its last finished policy); a
    stage folder, checkpoint or Hub id is used as given."""
    from align.data import looks_local
    from align.stages import traits

    path = Path(target)
    if (path / RECIPE).is_file() and not (path / "config.json").is_file():
        finished = [(traits(kind), folder) for _, kind, folder in finished_stages(path) if _known_type(kind)]
        policies = [(t, folder) for t, folder in finished if t.produces == "policy"]
        chat = [folder for t, folder in policies if t.chat]
        if not policies:
            raise AlignError(f"{target}: the run has no finished policy stage yet")
        return str((chat or [folder for _, folder in policies])[-1])
    if not path.exists() and looks_local(target):
        raise AlignError(f"{target}: no such folder")
    return target


def _known_type(kind: str) -> bool:
    from align.stages import TYPES

    return kind in TYPES
