"""Safety (issue 12): a run never deletes anything outside its folder, never loses a finished
stage to a failed edit or a second run, never saves diverged or damaged work as finished,
never runs code planted in a checkpoint, and never writes a token."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from align import rundir
from align.cli import main
from align.errors import AlignError
from align.recipe import build_recipe
from conftest import REPO, TINY_MODEL, read_metrics, run_align, write_recipe

FAST_PPO = {"per_device_train_batch_size": 8, "num_mini_batches": 2, "gradient_accumulation_steps": 2,
            "num_ppo_epochs": 2, "response_length": 8, "temperature": 1.0, "kl_coef": 0.01}


def _sft(tiny_model, data_dir, **changes):
    """8 steps at a constant rate, checkpoints at 4 and 8, a log line every 3 steps (so the
    checkpoint steps are not logging steps of their own)."""
    return {"model": str(tiny_model), "dataset": {"path": str(data_dir / "messages.jsonl")}, "max_steps": 8,
            "per_device_train_batch_size": 8, "learning_rate": 1e-3, "lr_scheduler_type": "constant",
            "save_steps": 4, "save_total_limit": 3, "logging_steps": 3, **changes}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _error(capsys, argv) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, tiny_model, data_dir) -> Path:
    """A finished one-stage SFT run; tests work on copies of it."""
    out = tmp_path_factory.mktemp("finished")
    recipe = write_recipe(out / "r.yaml", out / "run", {"sft": _sft(tiny_model, data_dir)})
    run_align(["run", recipe], check=True)
    return out / "run"


def _copy(finished: Path, tmp_path: Path, tiny_model, data_dir) -> tuple[Path, Path]:
    """A copy of the finished run in `tmp_path/run` and a recipe for it."""
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    return run, write_recipe(tmp_path / "r.yaml", run, {"sft": _sft(tiny_model, data_dir)})


# ---------------------------------------------------------------------------------------------
# 1. Stage names are folder names, never paths; deletions stay inside the run folder


@pytest.mark.parametrize("name", ["../victim", "ABSOLUTE", ".", "..", "sft/../../victim", "plots"])
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_stage_names_that_are_paths_are_refused_and_nothing_is_deleted(tmp_path, capsys, name, dry_run):
    out = tmp_path / "work" / "run"
    keep = [tmp_path / "victim" / "keep.txt", tmp_path / "work" / "keep.txt", out / "keep.txt"]
    for path in keep:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the user's work")
    name = str(tmp_path / "victim") if name == "ABSOLUTE" else name
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(out), "stages": {name: {"type": "task", "n_sft": 5}}}))
    line = _error(capsys, ["run", str(recipe), *(["--dry-run"] if dry_run else [])])
    assert f"stage name {name!r} is not a plain name" in line
    assert all(path.read_text() == "the user's work" for path in keep)


def test_remove_refuses_every_path_not_strictly_inside_the_run_folder(tmp_path):
    run = tmp_path / "run"
    (run / "sft" / "checkpoints").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("x")
    (run / "link").symlink_to(outside)
    for path in (run, run / ".", run / "sft" / "..", tmp_path, outside, run / ".." / "outside", Path("/"),
                 run / "link" / "keep.txt"):
        with pytest.raises(AlignError, match="refusing to delete"):
            rundir.remove(path, run)
    rundir.remove(run / "link", run)  # a link inside is removed as a link: its target is untouched
    assert (outside / "keep.txt").is_file() and not (run / "link").exists()
    rundir.remove(run / "sft" / "checkpoints", run)
    assert not (run / "sft" / "checkpoints").exists() and (run / "sft").is_dir()


# ---------------------------------------------------------------------------------------------
# 2. A changed stage is rebuilt beside its finished output


def test_failed_edit_keeps_the_finished_stage(tmp_path, finished, tiny_model, data_dir):
    run, recipe = _copy(finished, tmp_path, tiny_model, data_dir)
    before = _sha(run / "sft" / "model.safetensors")
    bad = run_align(["run", recipe, "--set", f"stages.sft.model={tmp_path / 'no-such-model'}"])
    assert bad.returncode == 2 and "no-such-model" in bad.stderr
    assert _sha(run / "sft" / "model.safetensors") == before
    assert "finished earlier" in run_align(["run", recipe], check=True).stdout

    # A good edit replaces it once complete, and leaves no build folder behind.
    good = run_align(["run", recipe, "--set", "stages.sft.max_steps=4"], check=True)
    assert "the old output stays until the new one is complete" in good.stdout
    assert read_metrics(run / "sft")["global_step"] == 4 and _sha(run / "sft" / "model.safetensors") != before
    assert sorted(p.name for p in run.iterdir() if p.name.startswith(".sft")) == []


def test_rebuild_beside_resumes_and_an_interrupted_swap_is_finished(tmp_path):
    run = tmp_path / "run"

    def stage(config_hash):
        return types.SimpleNamespace(name="sft", type="sft", dir=run / "sft", hash=config_hash)

    old = stage("A")
    old.dir.mkdir(parents=True)
    (old.dir / "model.safetensors").write_text("old weights")
    rundir.mark_complete(old, {})

    new = stage("B")
    build = rundir.prepare_stage_dir(new)
    assert build == run / ".sft.build" and rundir.is_complete(old)
    (build / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (build / "checkpoints" / "checkpoint-2" / "trainer_state.json").write_text("{}")
    # Interrupted: the next run resumes in the same build folder; the old output is untouched.
    assert rundir.prepare_stage_dir(new) == build and rundir.last_checkpoint(build).endswith("checkpoint-2")
    assert rundir.building_in(new) == build and (old.dir / "model.safetensors").read_text() == "old weights"
    # A third config starts its own build from nothing.
    assert rundir.prepare_stage_dir(stage("C")) == build and rundir.last_checkpoint(build) is None
    assert rundir.prepare_stage_dir(new) == build

    (build / "model.safetensors").write_text("new weights")
    rundir.mark_complete(types.SimpleNamespace(**{**vars(new), "dir": build}), {})
    os.replace(old.dir, run / ".sft.old")  # killed halfway through `install`
    rundir.recover(new)
    assert rundir.is_complete(new) and (run / "sft" / "model.safetensors").read_text() == "new weights"
    assert sorted(p.name for p in run.iterdir()) == ["sft"]

    # Killed after the build was marked complete, before `install` began.
    newer = stage("D")
    build = rundir.prepare_stage_dir(newer)
    (build / "model.safetensors").write_text("newer weights")
    rundir.mark_complete(types.SimpleNamespace(**{**vars(newer), "dir": build}), {})
    rundir.recover(newer)
    assert rundir.is_complete(newer) and (run / "sft" / "model.safetensors").read_text() == "newer weights"
    assert sorted(p.name for p in run.iterdir()) == ["sft"]


# ---------------------------------------------------------------------------------------------
# 3. Duplicate keys


def test_duplicate_yaml_keys_are_refused(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'run'}\nstages:\n  sft:\n    max_steps: 5\n"
                      f"  reward: {{}}\n  sft:\n    max_steps: 6\n")
    line = _error(capsys, ["run", str(recipe)])
    assert "duplicate key 'sft'" in line and "lines 3 and 6" in line and str(recipe) in line
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# 4. One run per folder


def test_a_second_run_on_the_same_folder_stops_at_once(tmp_path, tiny_model, data_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"sft": _sft(tiny_model, data_dir, max_steps=400)})
    checkpoints = tmp_path / "run" / "sft" / "checkpoints"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    holder = subprocess.Popen([sys.executable, "-m", "align", "run", str(recipe)], cwd=REPO, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not list(checkpoints.glob("checkpoint-*")) and time.time() < deadline:
            assert holder.poll() is None, "the first run ended early"
            time.sleep(0.2)
        second = run_align(["run", recipe, "--set", "stages.sft.max_steps=5"])
        assert second.returncode == 2 and "in use by another `align run` (pid" in second.stderr
        assert "Traceback" not in second.stderr
        assert holder.poll() is None and list(checkpoints.glob("checkpoint-*")), "the first run was disturbed"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The kernel released the killed run's lock.
    assert run_align(["run", recipe, "--set", "stages.sft.max_steps=5"]).returncode == 0


def test_the_lock_excludes_a_second_holder_until_released(tmp_path):
    with rundir.locked(tmp_path):
        with pytest.raises(AlignError, match=f"in use by another `align run` \\(pid {os.getpid()}\\)"):
            with rundir.locked(tmp_path):
                pass
        assert (tmp_path / rundir.LOCK).exists()
    assert not (tmp_path / rundir.LOCK).exists()  # a finished run leaves the folder as it was
    with rundir.locked(tmp_path):
        pass


# ---------------------------------------------------------------------------------------------
# 5. Hashes do not depend on where the run folder is


def test_hashes_do_not_depend_on_where_the_run_folder_is(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stages = {"task": {"n_sft": 10}, "init": {"dataset": {"path": "${task}/sft.jsonl"}, **TINY_MODEL},
              "sft": {"model": "${init}", "dataset": {"path": "${task}/sft.jsonl"}, "max_steps": 3}}
    hashes = [[s.hash for s in build_recipe({"output_dir": out, "stages": stages}).stages]
              for out in ("runs/a", str(tmp_path / "runs" / "a"), "/somewhere/else", "./runs/a/")]
    assert all(h == hashes[0] for h in hashes), hashes
    changed = build_recipe({"output_dir": "runs/a", "stages": {**stages, "init": {**stages["init"], "hidden_size": 32}}})
    assert [s.hash for s in changed.stages][1:] != hashes[0][1:] and changed.stages[0].hash == hashes[0][0]


def test_a_moved_run_folder_is_not_retrained(tmp_path):
    stages = {"task": {"n_sft": 20}, "init": {"dataset": {"path": "${task}/sft.jsonl"}, **TINY_MODEL,
                                                "tokenizer_samples": 20}}
    run_align(["run", write_recipe(tmp_path / "a.yaml", tmp_path / "a", stages)], check=True)
    shutil.move(tmp_path / "a", tmp_path / "b")
    again = run_align(["run", write_recipe(tmp_path / "b.yaml", tmp_path / "b", stages)], check=True)
    assert again.stdout.count("finished earlier") == 2, again.stdout


# ---------------------------------------------------------------------------------------------
# 6. Divergence is never marked complete


DIVERGING = {
    "sft": ("messages.jsonl", {}),
    "reward": ("prefs.jsonl", {}),
    "dpo": ("prefs.jsonl", {}),
}


# A rate far too high, after a warmup step at rate 0: the first checkpoint is finite, later ones
# would not be.
TOO_HIGH = {"learning_rate": 1e30, "warmup_steps": 4, "save_steps": 1, "save_total_limit": 20}


def _error_line(result) -> str:
    lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[0]


def _finite_checkpoints(stage_dir: Path, weights: str) -> list[Path]:
    found = sorted((stage_dir / "checkpoints").glob("checkpoint-*"))
    for checkpoint in found:
        for file in checkpoint.glob(weights):
            assert all(t.isfinite().all() for t in load_file(str(file)).values() if t.is_floating_point()), file
    return found


@pytest.mark.parametrize("kind", list(DIVERGING))
def test_divergence_stops_the_stage_and_keeps_only_finite_checkpoints(tmp_path, tiny_model, data_dir, kind):
    data, extra = DIVERGING[kind]
    stages = {kind: {"model": str(tiny_model), "dataset": {"path": str(data_dir / data)}, **TOO_HIGH,
                     "max_steps": 12, "per_device_train_batch_size": 8, "logging_steps": 4, **extra},
              "after": {"type": "sft", "model": f"${{{kind}}}" if kind != "reward" else str(tiny_model),
                        "dataset": {"path": str(data_dir / "messages.jsonl")}, "max_steps": 2}}
    result = run_align(["run", write_recipe(tmp_path / "r.yaml", tmp_path / "run", stages)])
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    line = _error_line(result)
    assert line.startswith(f"error: stages.{kind}: training diverged at step ") and "not marked finished" in line
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / kind / rundir.MARKER).exists() and not (tmp_path / "run" / "after").exists()
    kept = _finite_checkpoints(tmp_path / "run" / kind, "*.safetensors")
    assert kept and f"its last checkpoint ({kept[-1].name}) is finite and kept" in line


def test_ppo_divergence_stops_the_stage_before_a_nan_checkpoint(tmp_path, tiny_model, data_dir):
    block = {"dataset": {"path": str(data_dir / "prompts.jsonl")}, **FAST_PPO, "num_train_steps": 8, **TOO_HIGH,
             "reward_funcs": "tests.rewards:letter_a"}
    result = run_align(["run", write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"ppo": block},
                                            model=str(tiny_model))])
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    line = _error_line(result)
    assert line.startswith("error: stages.ppo: training diverged at step ")
    assert not (tmp_path / "run" / "ppo" / rundir.MARKER).exists()
    kept = _finite_checkpoints(tmp_path / "run" / "ppo", "trainable.safetensors")
    assert kept and f"its last checkpoint ({kept[-1].name}) is finite and kept" in line


# ---------------------------------------------------------------------------------------------
# 7-9. Resume: no extra step, damaged files passed over, whole-stage metrics


def _weights(stage_dir: Path) -> dict:
    return load_file(str(stage_dir / "model.safetensors"))


def _same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all((a[k] - b[k]).abs().max() < 1e-6 for k in a)


def test_resume_from_the_final_checkpoint_trains_no_extra_step(tmp_path, finished, tiny_model, data_dir):
    run, recipe = _copy(finished, tmp_path, tiny_model, data_dir)
    (run / "sft" / rundir.MARKER).unlink()  # killed during the final save
    (run / "sft" / "model.safetensors").unlink()
    again = run_align(["run", recipe], check=True)
    assert "resuming from checkpoint-8" in again.stdout
    assert read_metrics(run / "sft")["global_step"] == 8
    assert _same_weights(_weights(run / "sft"), _weights(finished / "sft"))


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, finished, tiny_model, data_dir):
    run, recipe = _copy(finished, tmp_path, tiny_model, data_dir)
    (run / "sft" / rundir.MARKER).unlink()
    newest = run / "sft" / "checkpoints" / "checkpoint-8" / "model.safetensors"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    again = run_align(["run", recipe], check=True)
    assert "resuming from checkpoint-4" in again.stdout
    assert read_metrics(run / "sft")["global_step"] == 8
    assert _same_weights(_weights(run / "sft"), _weights(finished / "sft"))


def test_truncated_finished_model_is_rebuilt_not_trusted(tmp_path, finished, tiny_model, data_dir):
    run, recipe = _copy(finished, tmp_path, tiny_model, data_dir)
    model = run / "sft" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:1000])
    again = run_align(["run", recipe], check=True)
    assert f"{model} is 1,000 bytes" in again.stdout and "+ sft" in again.stdout
    assert _same_weights(_weights(run / "sft"), _weights(finished / "sft"))


def test_resumed_stage_reports_train_loss_and_tokens_of_every_step(tmp_path, finished, tiny_model, data_dir):
    run, recipe = _copy(finished, tmp_path, tiny_model, data_dir)
    for name in (rundir.MARKER, "model.safetensors"):
        (run / "sft" / name).unlink()
    shutil.rmtree(run / "sft" / "checkpoints" / "checkpoint-8")
    again = run_align(["run", recipe], check=True)
    assert "resuming from checkpoint-4" in again.stdout
    whole, resumed = read_metrics(finished / "sft"), read_metrics(run / "sft")
    assert resumed["resumed_from_step"] == 4
    assert resumed["train_loss"] == pytest.approx(whole["train_loss"], rel=1e-5)

    def tokens(stage_dir):
        return [(r["step"], r["num_tokens"]) for r in rundir.read_log_history(stage_dir) if "num_tokens" in r]

    assert tokens(run / "sft") == tokens(finished / "sft") and tokens(run / "sft")[-1][1] > 0


# ---------------------------------------------------------------------------------------------
# 10. No pickle that can run code is ever loaded


class _Planted:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


def test_planted_pickle_in_a_ppo_checkpoint_is_never_run(tmp_path, tiny_model, data_dir):
    import pickle

    block = {"dataset": {"path": str(data_dir / "prompts.jsonl")}, **FAST_PPO, "num_train_steps": 3,
             "save_steps": 2, "reward_funcs": "tests.rewards:letter_a"}
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"ppo": block}, model=str(tiny_model))
    run_align(["run", recipe], check=True)
    stage = tmp_path / "run" / "ppo"
    (stage / rundir.MARKER).unlink()
    scheduler = stage / "checkpoints" / "checkpoint-2" / "scheduler.pt"
    planted = pickle.dumps(_Planted(tmp_path / "pwned"))
    assert len(planted) <= scheduler.stat().st_size
    scheduler.write_bytes(planted.ljust(scheduler.stat().st_size, b"\0"))  # same size: the file list still holds

    again = run_align(["run", recipe])
    assert not (tmp_path / "pwned").exists(), "the planted pickle ran"
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert f"{scheduler}: refused to load" in again.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------
# 11. No token reaches a file


def test_hub_token_in_a_stage_is_refused(tmp_path, capsys):
    token = "hf_" + "x" * 34
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "stages": {"sft": {
        "dataset": {"path": str(tmp_path / "d.jsonl")}, "hub_token": token}}}))
    line = _error(capsys, ["run", str(recipe)])
    assert "stages.sft.hub_token" in line and "HF_TOKEN" in line and token not in line
    assert not (tmp_path / "run").exists()


def test_checkpoints_carry_no_pickled_training_args(finished):
    assert list(finished.rglob("checkpoint-*")), "the run saved no checkpoint"
    assert not list(finished.rglob("training_args.bin"))
    assert not list(finished.rglob("*.pkl"))
