"""The run folder: its layout, and every write into it.

    <output_dir>/
      recipe.yaml                     the resolved recipe (secrets removed)
      report.md, plots/               `align report`
      .align-lock                     held (flock) by the `align run` using the folder
      <stage>/
        .align-config                 written first: the config hash the partial contents belong to
        .align-complete.json          written last, atomically: the stage is finished, with the
                                      size of every file it vouches for
        metrics.json                  the stage's final metrics
        log_history.jsonl             every logged step (TRL stages and PPO)
        checkpoints/checkpoint-N      resumable state; complete once trainer_state.json parses and
                                      the sizes in its .align-files.json still hold
      .<stage>.build/                 a changed stage rebuilt beside its finished output; it
                                      replaces <stage> only once complete

Every file is written through `write_atomic` / `write_jsonl` (a temporary file beside the target,
then one rename), so a kill never leaves a half-written file that a later run trusts. Every
deletion goes through `remove`, which refuses any path not strictly inside the run folder.
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
LOCK = ".align-lock"
FILES = ".align-files.json"  # a checkpoint's files and their sizes, written once it is complete


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


def remove(path, root, *, ignore_errors: bool = False):
    """Delete the file or folder `path`, which must lie strictly inside `root` (the run folder,
    or a folder inside it); anything else is refused. Every deletion a run makes goes through
    here. A symbolic link is removed as a link, never followed."""
    path, root = Path(path), Path(root).resolve()
    real = path.parent.resolve() / path.name
    if path.name in ("", ".", "..") or root not in real.parents:
        raise AlignError(f"refusing to delete '{path}': it is not inside the run folder '{root}'")
    if real.is_symlink() or real.is_file():
        real.unlink(missing_ok=True)
    elif real.exists():
        shutil.rmtree(real, ignore_errors=ignore_errors)


@contextlib.contextmanager
def locked(run_dir):
    """Hold the run folder's lock for the block: a second `align run` on the folder stops at once.
    It is an flock, so the kernel releases it when the process dies, however it dies. The lock
    file is removed when the block ends (still locked), so a finished or failed run leaves the
    folder as it was; a process that locked a file just removed re-checks and takes the new one."""
    import fcntl

    path = Path(run_dir) / LOCK
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise AlignError(f"output_dir '{run_dir}' is in use by another `align run` ({holder}); wait for it to "
                             f"finish, or give this run another output_dir") from None
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break  # the file we locked is still the lock file
        except FileNotFoundError:
            pass
        handle.close()
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        handle.close()


def file_sizes(folder, skip=()) -> dict[str, int]:
    """{relative path: size} of every file under `folder`, except top-level names in `skip`."""
    folder = Path(folder)
    return {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).parts[0] not in skip}


def size_problem(folder, sizes: dict) -> str | None:
    """What no longer matches a `file_sizes` record (a truncated or missing file), or None."""
    for name, size in sizes.items():
        path = Path(folder) / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} is {path.stat().st_size:,} bytes, {size:,} when it was written"
    return None


def write_file_list(folder):
    """Vouch for a finished checkpoint: record its files' sizes (resume checks them)."""
    write_atomic(Path(folder) / FILES, json.dumps(file_sizes(folder, skip={FILES})))


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


# Bookkeeping a finished stage does not vouch for: the marker itself, dotfiles written after it
# (push records), checkpoints, and the merged copy a later stage may add.
_UNVOUCHED = {CHECKPOINTS, "merged"}


def completion_problem(stage) -> str | None:
    """Why `stage` (anything with `.dir` and `.hash`) is not finished with its current config,
    or None when it is: its marker must name this config, and every file it vouches for must
    still have the size it had (a marker from before file lists existed vouches for the hash)."""
    marker = read_json(Path(stage.dir) / MARKER)
    if not isinstance(marker, dict):
        return "not finished"
    if marker.get("hash") != stage.hash:
        return "finished with another config"
    return size_problem(stage.dir, marker.get("files") or {})


def is_complete(stage) -> bool:
    return completion_problem(stage) is None


def mark_complete(stage, metrics: dict):
    """Write the stage's metrics, then its completion marker (last, atomically), which records
    the size of every file of the output."""
    write_atomic(stage.dir / METRICS, json.dumps(metrics, indent=2, default=float))
    files = {name: size for name, size in file_sizes(stage.dir, skip=_UNVOUCHED).items() if not name.startswith(".")}
    write_atomic(stage.dir / MARKER, json.dumps({"hash": stage.hash, "type": stage.type, "files": files,
                                                 "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}))


def build_dir(stage) -> Path:
    """Where a changed stage is rebuilt, beside its finished output (a stage name never starts
    with '.', so this never names another stage)."""
    return stage.dir.with_name(f".{stage.dir.name}.build")


def _old_dir(stage) -> Path:
    return stage.dir.with_name(f".{stage.dir.name}.old")


def prepare_stage_dir(stage) -> Path:
    """The folder to build `stage` in, keeping partial work only when it belongs to this config.

    A finished output (of another config, or damaged) stays where it is until its replacement
    is complete: the stage is built in `build_dir(stage)`, which `install` swaps in. Otherwise
    the stage is built in place. Either way an interrupted build resumes from its checkpoints."""
    root = stage.dir.parent
    build = build_dir(stage)
    if build.exists() and _config_of(build) != stage.hash:
        remove(build, root)
    if build.exists() or isinstance(read_json(stage.dir / MARKER), dict):
        target = build
    else:
        target = stage.dir
        if target.exists() and _config_of(target) != stage.hash:
            remove(target, root)
    target.mkdir(parents=True, exist_ok=True)
    remove(target / MARKER, root)
    write_atomic(target / CONFIG_HASH, stage.hash)
    return target


def building_in(stage) -> Path:
    """The folder `prepare_stage_dir` chose (every process of a launch asks after it ran)."""
    return build_dir(stage) if build_dir(stage).exists() else stage.dir


def install(stage, built: Path):
    """Put a completed build in place of the stage's old output, then delete the old output."""
    if Path(built) == stage.dir:
        return
    root, old = stage.dir.parent, _old_dir(stage)
    remove(old, root)  # left by an interrupted install, whose new output is complete
    if stage.dir.exists():
        os.replace(stage.dir, old)
    os.replace(built, stage.dir)
    remove(old, root)


def recover(stage):
    """Finish an install that a kill interrupted (a build is marked complete just before it is
    installed); without a complete build, put back an old output that was moved aside."""
    root, build, old = stage.dir.parent, build_dir(stage), _old_dir(stage)
    if isinstance(read_json(build / MARKER), dict):
        install(stage, build)
    elif not stage.dir.exists() and old.exists():
        os.replace(old, stage.dir)
    remove(old, root)


def _config_of(folder: Path) -> str | None:
    try:
        return (folder / CONFIG_HASH).read_text().strip()
    except OSError:
        return None


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
    mid-save by a kill and is passed over; the run saves that step again when it gets there.
    A checkpoint whose files no longer have the sizes its `.align-files.json` recorded (a
    truncated copy, a full disk) is passed over too."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = sorted((int(m.group(1)), path) for path in folder.iterdir()
                   if path.is_dir() and (m := re.fullmatch(r"checkpoint-(\d+)", path.name)))
    return [path for _, path in found if isinstance(read_json(path / "trainer_state.json"), dict)
            and size_problem(path, read_json(path / FILES) or {}) is None]


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
