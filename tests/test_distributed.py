"""`accelerate launch --multi_gpu --num_processes 2 -m align run` on a CPU machine: two processes
over gloo (`--cpu` or a MULTI_CPU config silently starts one, so the world size is asserted)."""

import shutil
import sys
from pathlib import Path

import pytest

from conftest import read_metrics, run_align, write_recipe

ACCELERATE = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
              "-m", "align"]


@pytest.mark.slow
def test_sft_two_processes_match_one(tmp_path, tiny_model, data_dir):
    """Same global batch (2 x 4 vs 1 x 8), same data order: the losses agree."""
    stage = {"model": str(tiny_model), "dataset": {"path": str(data_dir / "messages.jsonl")},
             "max_steps": 6, "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no"}
    two = write_recipe(tmp_path / "two.yaml", tmp_path / "two", {"sft": {**stage, "per_device_train_batch_size": 4}})
    one = write_recipe(tmp_path / "one.yaml", tmp_path / "one", {"sft": {**stage, "per_device_train_batch_size": 8}})
    result = run_align(["run", two], launcher=ACCELERATE, check=True)
    run_align(["run", one], check=True)

    m2, m1 = read_metrics(tmp_path / "two" / "sft"), read_metrics(tmp_path / "one" / "sft")
    assert m2["world_size"] == 2 and m1["world_size"] == 1
    assert m2["global_step"] == m1["global_step"] == 6
    assert abs(m2["train_loss"] - m1["train_loss"]) < 0.05 * m1["train_loss"], (m1, m2)
    assert result.stdout.count("+ sft") == 1, "only the main process prints"
    assert (tmp_path / "two" / "sft" / "model.safetensors").is_file()
