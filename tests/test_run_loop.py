"""The run loop: finished stages are skipped, a changed config reruns that stage and the ones
after it, a killed stage resumes from its checkpoint, and markers only mark finished work."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import REPO, read_metrics, run_align, write_recipe
from align.rundir import MARKER


def _stages(tiny_model, data_dir, sft_steps=20):
    return {
        "sft": {"model": str(tiny_model), "dataset": {"path": str(data_dir / "messages.jsonl")},
                "max_steps": sft_steps, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
                "save_steps": 5, "logging_steps": 5},
        "sft2": {"dataset": {"path": str(data_dir / "prompt_completion.jsonl")}, "max_steps": 5,
                 "per_device_train_batch_size": 8, "save_strategy": "no", "type": "sft"},
    }


def test_skip_and_rerun_after_config_change(tmp_path, tiny_model, data_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", _stages(tiny_model, data_dir, 10))
    first = run_align(["run", recipe], check=True)
    assert "+ sft " in first.stdout and "+ sft2" in first.stdout
    saved = (tmp_path / "run" / "recipe.yaml").read_text()
    assert "max_steps: 10" in saved and "${" not in saved

    weights = {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*.safetensors")}
    again = run_align(["run", recipe], check=True)
    assert "finished earlier" in again.stdout and "+ sft" not in again.stdout
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run").rglob("*.safetensors")} == weights  # nothing rewritten

    # The second stage defaults to the first one's output; changing the first reruns both.
    changed = run_align(["run", recipe, "--set", "stages.sft.learning_rate=2e-3"], check=True)
    assert "+ sft " in changed.stdout and "+ sft2" in changed.stdout
    only_last = run_align(["run", recipe, "--set", "stages.sft.learning_rate=2e-3",
                           "--set", "stages.sft2.max_steps=6"], check=True)
    assert "= sft " in only_last.stdout and "+ sft2" in only_last.stdout


def test_killed_stage_resumes_from_checkpoint(tmp_path, tiny_model, data_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", _stages(tiny_model, data_dir, 400))
    stage_dir = tmp_path / "run" / "sft"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, "-m", "align", "run", str(recipe)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not list((stage_dir / "checkpoints").glob("checkpoint-1[0-9]")) and time.time() < deadline:
            time.sleep(0.2)
            assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.5)  # let the checkpoint folder finish writing
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert not (stage_dir / MARKER).exists(), "a killed stage must not be marked complete"
    assert not (tmp_path / "run" / "sft2").exists()

    done = run_align(["run", recipe, "--set", "stages.sft.max_steps=400"], check=True)
    assert "resuming from checkpoint-" in done.stdout
    m = read_metrics(stage_dir)
    assert m["resumed_from_step"] >= 10 and m["global_step"] == 400
    assert json.loads((stage_dir / MARKER).read_text())["type"] == "sft"
    assert (tmp_path / "run" / "sft2" / MARKER).exists()


def test_stage_version_change_reruns_it(tmp_path, monkeypatch):
    """A stage module's VERSION is part of its hash: new generator code means new data."""
    from align.recipe import build_recipe
    from align.stages import task

    raw = {"output_dir": str(tmp_path), "stages": {"task": {"n_sft": 10}, "init": {"dataset": {"path": "${task}/sft.jsonl"}}}}
    before = [s.hash for s in build_recipe(raw).stages]
    monkeypatch.setattr(task, "VERSION", task.VERSION + 1)
    after = [s.hash for s in build_recipe(raw).stages]
    assert before[0] != after[0] and before[1] != after[1]


def test_resume_passes_over_a_checkpoint_cut_off_mid_save(tmp_path):
    """A kill while transformers writes checkpoint-N leaves a folder without trainer_state.json
    (written last): resuming must take the newest complete one, not crash on the partial one."""
    
    from align.rundir import CHECKPOINTS, last_checkpoint

    folder = tmp_path / CHECKPOINTS
    for step, state in ((10, '{"global_step": 10}'), (20, '{"global_step": 20}'), (30, None), (40, '{"glob')):
        (folder / f"checkpoint-{step}").mkdir(parents=True)
        (folder / f"checkpoint-{step}" / "model.safetensors").write_bytes(b"")
        if state is not None:
            (folder / f"checkpoint-{step}" / "trainer_state.json").write_text(state)
    (folder / "checkpoint-99.tmp").mkdir()
    assert last_checkpoint(tmp_path) == str(folder / "checkpoint-20")
    assert last_checkpoint(tmp_path / "nothing") is None


def test_set_a_model_field_when_model_is_a_plain_id(tmp_path):
    """`model: some/id` is short for `{name_or_path: some/id}`, so `--set model.dtype=...` works on it."""
    from align.recipe import apply_overrides, build_recipe

    raw = apply_overrides({"output_dir": str(tmp_path), "model": "org/model", "stages": {"task": {}}},
                          ["model.dtype=bfloat16", "model.trust_remote_code=false"])
    assert raw["model"] == {"name_or_path": "org/model", "dtype": "bfloat16", "trust_remote_code": False}
    assert build_recipe(raw).model["dtype"] == "bfloat16"
