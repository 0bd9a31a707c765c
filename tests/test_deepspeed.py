"""Every stage under DeepSpeed ZeRO-2 and ZeRO-3, with the repository's accelerate configs, on two
CPU processes (a real process group: align starts DeepSpeed's over gloo, see align/distributed.py;
the world size and the engine really used are asserted from metrics.json).

References, on the same global batch of 8:
- sft, reward, dpo: one plain process (1 x 8 against 2 x 4): loss curve and final weights.
- rloo, grpo, ppo sample with per-process random streams, so one process would sample other
  responses; they are compared with DDP on two processes (`--multi_gpu`), whose streams are the
  same: per-step logs and final weights. PPO runs 2 epochs x 2 minibatches x 2 accumulated
  micro-batches with max_grad_norm small enough that both networks are clipped, so a wrong
  step count, a joint clipping norm or a missed accumulation would all show.
Every saved model is read back with plain transformers / safetensors (no DeepSpeed).
"""

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, read_metrics, run_align, write_recipe

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("deepspeed")]

ACCELERATE = str(Path(sys.executable).with_name("accelerate"))
DDP = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
       "--dynamo_backend", "no", "--main_process_port", "0", "-m", "align"]
OFFLINE = ("sft", "sft_lora", "reward", "dpo")
ONLINE = ("rloo", "grpo", "ppo_lora", "ppo_full")
MAX_GRAD_NORM = 0.005  # below both networks' gradient norms: each is clipped at every step


def stages(model, data_dir, per_device, names):
    common = {"model": str(model), "learning_rate": 1e-3, "logging_steps": 1, "save_strategy": "no",
              "per_device_train_batch_size": per_device}
    online = {**common, "dataset": {"path": str(data_dir / "prompts.jsonl")}, "reward_funcs": "tests.rewards:letter_a",
              "max_steps": 2, "num_generations": 4, "max_completion_length": 8}
    ppo = {"type": "ppo", "model": str(model), "dataset": {"path": str(data_dir / "prompts.jsonl")},
           "reward_funcs": "tests.rewards:letter_a", "per_device_train_batch_size": per_device, "num_train_steps": 2,
           "response_length": 8, "num_ppo_epochs": 2, "num_mini_batches": 2, "gradient_accumulation_steps": 2,
           "learning_rate": 1e-3, "max_grad_norm": MAX_GRAD_NORM, "save_steps": 1, "disable_tqdm": True}
    every = {
        "sft": {**common, "dataset": {"path": str(data_dir / "messages.jsonl")}, "max_steps": 3},
        "sft_lora": {**common, "type": "sft", "dataset": {"path": str(data_dir / "messages.jsonl")}, "max_steps": 3,
                     "peft": {"r": 4}},
        "reward": {**common, "dataset": {"path": str(data_dir / "prefs.jsonl")}, "max_steps": 3},
        "dpo": {**common, "dataset": {"path": str(data_dir / "prefs.jsonl")}, "max_steps": 3, "peft": {"r": 4}},
        "rloo": {**online, "peft": {"r": 4}},
        "grpo": online,
        "ppo_lora": {**ppo, "peft": {"r": 4}},
        "ppo_full": ppo,
    }
    return {name: every[name] for name in names}


def zero_launcher(tmp_path, stage: int):
    """The repository's zero{2,3}.yaml on 2 processes in fp32 (CPU); nothing else changed."""
    config = yaml.safe_load((REPO / f"recipes/accelerate/zero{stage}.yaml").read_text())
    config.update(num_processes=2, mixed_precision="no")
    path = tmp_path / f"zero{stage}.yaml"
    path.write_text(yaml.safe_dump(config))
    return [ACCELERATE, "launch", "--config_file", str(path), "-m", "align"]


@pytest.fixture(scope="module")
def references(tmp_path_factory, pretrained_model, data_dir):
    """(one plain process: the offline stages, DDP on 2 processes: the online stages)."""
    root = tmp_path_factory.mktemp("reference")
    one = write_recipe(root / "one.yaml", root / "one", stages(pretrained_model, data_dir, 8, OFFLINE))
    ddp = write_recipe(root / "ddp.yaml", root / "ddp", stages(pretrained_model, data_dir, 4, ONLINE))
    run_align(["run", one], check=True)
    run_align(["run", ddp], launcher=DDP, check=True)
    assert read_metrics(root / "ddp" / "ppo_full")["engine"] == "ddp"
    return root / "one", root / "ddp"


def losses(stage_dir: Path, key: str) -> list[float]:
    return [r[key] for r in map(json.loads, (stage_dir / "log_history.jsonl").read_text().splitlines()) if key in r]


def weight_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between same-named tensors of two saved folders."""
    from safetensors.torch import load_file

    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert files and files == sorted(p.name for p in b.glob("*.safetensors")), (a, b)
    worst = 0.0
    for name in files:
        x, y = load_file(str(a / name)), load_file(str(b / name))
        assert set(x) - {"lm_head.weight"} == set(y) - {"lm_head.weight"}  # a tied head may be written out
        for key in set(x) & set(y):
            assert x[key].shape == y[key].shape, key  # gathered, not a shard
            worst = max(worst, (x[key].float() - y[key].float()).abs().max().item())
    return worst


@pytest.mark.parametrize("zero", [2, 3])
def test_every_stage_under_zero_matches_its_reference(tmp_path, pretrained_model, data_dir, references, zero):
    one, ddp = references
    recipe = write_recipe(tmp_path / "zero.yaml", tmp_path / "run",
                          stages(pretrained_model, data_dir, 4, OFFLINE + ONLINE))
    run_align(["run", recipe], launcher=zero_launcher(tmp_path, zero), check=True)
    run = tmp_path / "run"
    figures = {}
    for name in OFFLINE + ONLINE:
        metrics = read_metrics(run / name)
        assert metrics["world_size"] == 2 and metrics["engine"] == f"zero{zero}", (name, metrics)
        reference = one if name in OFFLINE else ddp
        key = "policy_loss" if name.startswith("ppo") else "loss"
        mine, theirs = losses(run / name, key), losses(reference / name, key)
        assert len(mine) == len(theirs) > 0, (name, mine, theirs)
        figures[name] = (max(abs(a - b) for a, b in zip(mine, theirs)), weight_difference(run / name, reference / name))
    for name in ("ppo_lora", "ppo_full"):
        figures[f"{name}/critic"] = (0.0, weight_difference(run / name / "critic", ddp / name / "critic"))
        assert losses(run / name, "optimizer_steps") == [4.0, 4.0]  # 2 epochs x 2 minibatches, whatever the accumulation
        for key in ("grad_norm_policy", "grad_norm_critic"):  # before clipping, each above max_grad_norm
            assert losses(run / name, key) == pytest.approx(losses(ddp / name, key), rel=1e-4)
            assert min(losses(run / name, key)) > MAX_GRAD_NORM
    print(f"zero{zero} max |loss diff|, max |weight diff|:", {k: f"{a:.2g}, {b:.2g}" for k, (a, b) in figures.items()})
    for name, (loss_diff, weight_diff) in figures.items():
        assert loss_diff < 1e-4 and weight_diff < 1e-4, (name, loss_diff, weight_diff)

    # Saved models load without DeepSpeed.
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    base = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(pretrained_model).parameters())
    for name in ("sft", "ppo_full"):
        assert sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(run / name).parameters()) == base
    AutoModelForSequenceClassification.from_pretrained(run / "reward")

    if zero == 2:  # resume: drop the finished marker and the final weights; checkpoint-1 must give the same run
        from align import rundir

        final = {p.name: p.read_bytes() for p in (run / "ppo_full").glob("*.safetensors")}
        (run / "ppo_full" / rundir.MARKER).unlink()
        for name in final:
            (run / "ppo_full" / name).unlink()
        shutil.rmtree(run / "ppo_full" / "critic")
        run_align(["run", recipe], launcher=zero_launcher(tmp_path, zero), check=True)
        assert read_metrics(run / "ppo_full")["resumed_from_step"] == 1
        assert {p.name: p.read_bytes() for p in (run / "ppo_full").glob("*.safetensors")} == final
