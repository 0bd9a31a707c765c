"""Every stage under `accelerate launch --multi_gpu --num_processes 2 -m align run` on a CPU
machine: two processes over gloo (`--cpu` or a MULTI_CPU config silently start one, so the
world size is asserted), agreeing with one process on the same global batch."""

import sys
from pathlib import Path

import pytest

from conftest import read_metrics, run_align, write_recipe

ACCELERATE = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
              "-m", "align"]


def _stage(kind, model, data_dir, per_device):
    common = {"model": str(model), "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no"}
    if kind == "sft":
        return {**common, "dataset": {"path": str(data_dir / "messages.jsonl")}, "max_steps": 6,
                "per_device_train_batch_size": per_device}
    if kind in ("reward", "dpo"):
        return {**common, "dataset": {"path": str(data_dir / "prefs.jsonl")}, "max_steps": 4,
                "per_device_train_batch_size": per_device, **({"peft": {"r": 4}} if kind == "dpo" else {})}
    if kind == "ppo":
        return {"model": str(model), "dataset": {"path": str(data_dir / "prompts.jsonl")},
                "reward_funcs": "tests.rewards:letter_a", "per_device_train_batch_size": per_device,
                "num_train_steps": 3, "response_length": 8, "num_ppo_epochs": 1, "learning_rate": 1e-3,
                "peft": {"r": 4}, "save_steps": 100}
    if kind == "rloo":
        return {**common, "dataset": {"path": str(data_dir / "prompts.jsonl")}, "reward_funcs": "tests.rewards:letter_a",
                "max_steps": 2, "per_device_train_batch_size": per_device, "num_generations": 4,
                "max_completion_length": 8, "peft": {"r": 4}}
    raise ValueError(kind)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft", "reward", "dpo", "ppo", "rloo"])
def test_stage_two_processes_match_one(tmp_path, pretrained_model, data_dir, kind):
    """Same global batch (2 x 4 vs 1 x 8). Trainer stages see the same data, so losses agree;
    online stages sample with per-process seeds, so only their scale is compared."""
    two = write_recipe(tmp_path / "two.yaml", tmp_path / "two", {kind: _stage(kind, pretrained_model, data_dir, 4)})
    one = write_recipe(tmp_path / "one.yaml", tmp_path / "one", {kind: _stage(kind, pretrained_model, data_dir, 8)})
    result = run_align(["run", two], launcher=ACCELERATE, check=True)
    run_align(["run", one], check=True)

    m2, m1 = read_metrics(tmp_path / "two" / kind), read_metrics(tmp_path / "one" / kind)
    assert m2["world_size"] == 2 and m1["world_size"] == 1
    assert m2["global_step"] == m1["global_step"]
    assert result.stdout.count(f"+ {kind}") == 1, "only the main process prints"
    if kind in ("sft", "reward", "dpo"):
        assert abs(m2["train_loss"] - m1["train_loss"]) < 0.05 * abs(m1["train_loss"]), (m1, m2)
    else:
        assert abs(m2["reward_mean"] - m1["reward_mean"]) < 0.3, (m1, m2)


@pytest.mark.slow
def test_sft_under_fsdp2_on_cpu(tmp_path, pretrained_model, data_dir):
    """The repository's FSDP2 config, on 2 CPU processes: the config file must say `use_cpu: true`
    (the `--cpu` flag silently drops to one process)."""
    import yaml
    from transformers import AutoModelForCausalLM

    from conftest import REPO

    config = yaml.safe_load((REPO / "recipes/accelerate/fsdp2.yaml").read_text())
    config.update(num_processes=2, mixed_precision="no", use_cpu=True)
    (tmp_path / "fsdp2.yaml").write_text(yaml.safe_dump(config))
    launcher = [ACCELERATE[0], "launch", "--config_file", str(tmp_path / "fsdp2.yaml"), "-m", "align"]
    two = write_recipe(tmp_path / "two.yaml", tmp_path / "two", {"sft": _stage("sft", pretrained_model, data_dir, 4)})
    one = write_recipe(tmp_path / "one.yaml", tmp_path / "one", {"sft": _stage("sft", pretrained_model, data_dir, 8)})
    run_align(["run", two], launcher=launcher, check=True)
    run_align(["run", one], check=True)
    m2, m1 = read_metrics(tmp_path / "two" / "sft"), read_metrics(tmp_path / "one" / "sft")
    assert m2["world_size"] == 2
    assert abs(m2["train_loss"] - m1["train_loss"]) < 0.05 * m1["train_loss"], (m1, m2)
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "sft")  # gathered from the shards
    base = AutoModelForCausalLM.from_pretrained(pretrained_model)
    assert sum(p.numel() for p in saved.parameters()) == sum(p.numel() for p in base.parameters())


@pytest.mark.slow
def test_bad_input_under_two_processes_one_message_no_worker_traceback(tmp_path, tiny_model):
    """The main process checks the recipe's files; the other process must stop with it (not
    wait at a barrier and die in gloo), and the error is printed once."""
    stage = {"dataset": {"path": str(tmp_path / "missing.jsonl")}, "reward_funcs": "tests.rewards:letter_a",
             "response_length": 8, "num_train_steps": 1}
    recipe = write_recipe(tmp_path / "bad.yaml", tmp_path / "out", {"ppo": stage}, model=str(tiny_model))
    result = run_align(["run", recipe], launcher=ACCELERATE, timeout=300)
    assert result.returncode != 0
    # align's one line, and the launcher's report naming it as the root cause (its own traceback
    # of the launcher process cannot be suppressed from the workers)
    lines = result.stderr.splitlines()
    assert sum(line.startswith("error: stages.ppo.dataset.path") for line in lines) == 1, result.stderr[-3000:]
    assert any("traceback : error: stages.ppo.dataset.path" in line for line in lines), result.stderr[-3000:]
    assert "[rank1]" not in result.stderr and "gloo" not in result.stderr, result.stderr[-3000:]
    assert not (tmp_path / "out" / "ppo").exists()


@pytest.mark.slow
def test_classifier_from_a_lora_adapter_under_two_processes(tmp_path, tiny_model, data_dir):
    """A reward stage starting from a LoRA SFT output goes through a merged copy written next to
    the adapter: with two processes it is written once (the main process first), not raced."""
    stages = {"sft": {"dataset": {"path": str(data_dir / "messages.jsonl")}, "peft": {"r": 4},
                      "max_steps": 2, "per_device_train_batch_size": 8, "save_strategy": "no"},
              "reward": {"dataset": {"path": str(data_dir / "prefs.jsonl")}, "max_steps": 2,
                         "per_device_train_batch_size": 4, "save_strategy": "no"}}
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", stages, model=str(tiny_model))
    run_align(["run", recipe, "--stage", "sft"], check=True)
    result = run_align(["run", recipe], launcher=ACCELERATE, check=True)
    assert "error" not in result.stderr.lower().replace("error_file", ""), result.stderr[-2000:]
    assert read_metrics(tmp_path / "run" / "reward")["world_size"] == 2
    assert sorted(p.name for p in (tmp_path / "run" / "sft").iterdir() if p.name.startswith("merged")) == ["merged"]


@pytest.mark.parametrize("launch", [{"ACCELERATE_USE_FSDP": "true"},
                                    {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "1"}])
def test_ppo_under_fsdp_or_zero1_is_refused_at_load_naming_the_alternative(tmp_path, tiny_model, data_dir, launch):
    """PPO's update is wired to DDP and DeepSpeed ZeRO-2/3 only: under an FSDP or ZeRO-1 launch
    the recipe stops before anything is loaded, with one line that names the alternative."""
    stage = {"dataset": {"path": str(data_dir / "prompts.jsonl")}, "reward_funcs": "tests.rewards:letter_a",
             "response_length": 8, "num_train_steps": 1}
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "out", {"ppo": stage}, model=str(tiny_model))
    result = run_align(["run", recipe, "--dry-run"], env=launch)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.count("error: stages.ppo:") == 1 and "zero3.yaml" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
