"""`align plan recipe.yaml`: every stage's row matches align.plan's estimators for its config,
with configs read from disk, from `init` blocks, or from what earlier stages will write."""

import json
from pathlib import Path

import pytest
import torch

from conftest import TINY_MODEL, run_align, write_recipe
from align import plan, plan_inputs
from align.estimate import (
    chinchilla_tokens, count_parameters, estimate_memory, estimate_ppo_memory, estimate_time, flops, ppo_flops,
    value_head_parameters,
)
from align.estimate import fmt_bytes as _fmt_bytes
from align.estimate import fmt_count as _fmt_count
from align.estimate import fmt_flops as _fmt_flops
from align.estimate import fmt_time as _fmt_time
from align.recipe import load_recipe

FPS = 1e12
ON_GPU = torch.cuda.is_available()
DTYPE = "bf16" if ON_GPU else "fp32"
HAS_PPO = (Path(plan.__file__).parent / "stages" / "ppo.py").exists()


def _lines(path: Path) -> int:
    return sum(1 for line in path.read_text().splitlines() if line.strip())


def _chain(data_dir: Path) -> dict:
    stages = {
        "init": {"dataset": {"path": str(data_dir / "messages.jsonl")}, **TINY_MODEL},
        "sft": {"model": "${init}", "dataset": {"path": str(data_dir / "messages.jsonl")},
                "peft": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                "max_steps": 10, "per_device_train_batch_size": 4, "max_length": 64,
                "gradient_checkpointing": False},
        "reward": {"model": "${sft}", "dataset": {"path": str(data_dir / "prefs.jsonl")}, "num_train_epochs": 2,
                   "per_device_train_batch_size": 8, "max_length": 96, "gradient_checkpointing": False},
        "dpo": {"model": "${sft}", "dataset": {"path": str(data_dir / "prefs.jsonl"), "test_size": 0.1},
                "peft": {"r": 8, "target_modules": "all-linear"}, "num_train_epochs": 1,
                "per_device_train_batch_size": 4, "max_length": 64, "gradient_checkpointing": False},
    }
    if HAS_PPO:
        stages["ppo"] = {"model": "${sft}", "reward_model": "${reward}", "dataset": {"path": str(data_dir / "prompts.jsonl")},
                         "peft": {"r": 8, "target_modules": "all-linear"}, "num_train_steps": 3,
                         "per_device_train_batch_size": 4, "response_length": 16, "max_prompt_length": 32}
    stages["eval"] = {"prompts": {"path": str(data_dir / "prompts.jsonl")}}
    return stages


def _tiny_config():
    from transformers import LlamaConfig

    # The init stage's defaults (align/stages/init.py) with the fixture's sizes.
    return LlamaConfig(max_position_embeddings=512, tie_word_embeddings=True, **TINY_MODEL)


def _row_line(out: str, name: str) -> str:
    lines = [line for line in out.splitlines() if line.split()[:1] == [name]]
    assert lines, f"no line for stage {name} in:\n{out}"
    return lines[0]  # the first table (memory / FLOPs / time)


def _expected(data_dir: Path) -> dict:
    cfg = _tiny_config()
    n = count_parameters(cfg)["total"]
    n_score = n - count_parameters(cfg)["lm_head"] + value_head_parameters(cfg)
    pairs = _lines(data_dir / "prefs.jsonl")
    exp = {}

    tokens = 10 * 4 * 1 * 64
    f = flops(n, tokens, per_param_token=4)
    mem = estimate_memory(cfg, method="lora", r=4, target_modules=["q_proj", "v_proj"], dtype=DTYPE,
                          optimizer="adamw", batch_size=4, seq_len=64)
    exp["sft"] = {"tokens": tokens, "flops": f, "mem": mem, "seconds": estimate_time(f, FPS, mfu=0.4)}

    tokens = pairs * 2 * 2 * 96
    f = flops(n_score, tokens, per_param_token=6)
    mem = estimate_memory(cfg, method="full", dtype=DTYPE, batch_size=16, seq_len=96, head="value")
    exp["reward"] = {"tokens": tokens, "flops": f, "mem": mem, "seconds": estimate_time(f, FPS, mfu=0.4)}

    train_pairs = int(pairs - pairs * 0.1)
    tokens = train_pairs * 2 * 64
    f = flops(n, tokens, per_param_token=4) + flops(n, tokens, per_param_token=2)
    mem = estimate_memory(cfg, method="lora", r=8, dtype=DTYPE, batch_size=8, seq_len=64)
    exp["dpo"] = {"tokens": tokens, "flops": f, "mem": mem, "seconds": estimate_time(f, FPS, mfu=0.4)}

    if HAS_PPO:
        episodes = 3 * 4
        f = ppo_flops(n, episodes=episodes, prompt_len=32, response_len=16, ppo_epochs=4, n_reward=n_score,
                      n_critic=n_score, train_per_param_token=4)["total"]
        # The reward stage fine-tunes fully: a separate sequence classifier next to the shared base.
        reward_cfg = _tiny_config()
        reward_cfg.architectures, reward_cfg.num_labels = ["LlamaForSequenceClassification"], 1
        mem = estimate_ppo_memory(cfg, method="lora", r=8, dtype=DTYPE, batch_size=4, prompt_len=32,
                                  response_len=16, reward_config=reward_cfg)
        assert mem["weights"] > estimate_ppo_memory(cfg, method="lora", r=8, dtype=DTYPE, batch_size=4,
                                                    prompt_len=32, response_len=16)["weights"]
        exp["ppo"] = {"tokens": episodes * 48, "flops": f, "mem": mem, "seconds": estimate_time(f, FPS, mfu=0.4)}
    return exp


def test_plan_cli_chain(tmp_path, data_dir):
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", _chain(data_dir))
    result = run_align(["plan", recipe, "--flops-per-second", FPS], env={"WORLD_SIZE": "1"}, check=True)
    out = result.stdout
    assert not (tmp_path / "run").exists(), "planning must not create the run"
    n = count_parameters(_tiny_config())["total"]
    assert _fmt_count(n) in _row_line(out, "init")
    for name, exp in _expected(data_dir).items():
        line = _row_line(out, name)
        assert _fmt_flops(exp["flops"]) in line, (name, line)
        assert _fmt_time(exp["seconds"]) in line, (name, line)
        assert _fmt_bytes(exp["mem"]["total"]) in line, (name, line)
        assert _fmt_count(exp["mem"]["trainable_params"]) in line, (name, line)
    detail = [line for line in out.splitlines() if line.startswith("sft ")][1]
    assert "lora r=4 q_proj,v_proj" in detail and "4x1x1" in detail and " 64 " in detail
    assert _fmt_count(chinchilla_tokens(n)) in detail
    assert "world size 1" in out
    assert _row_line(out, "eval")


def test_plan_rows_match_estimators(tmp_path, data_dir, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "run", _chain(data_dir)))
    rows = {r["name"]: r for r in plan.plan_recipe(recipe, flops_per_second=FPS)}
    for name, exp in _expected(data_dir).items():
        row = rows[name]
        assert row["tokens"] == exp["tokens"], name
        assert row["flops"] == pytest.approx(exp["flops"]), name
        assert row["seconds"] == pytest.approx(exp["seconds"]), name
        for key in ("params", "trainable_params", "weights", "gradients", "optimizer", "activations", "total"):
            assert row[key] == exp["mem"][key], (name, key)
    assert rows["sft"]["method"] == "lora" and rows["reward"]["method"] == "full"
    assert rows["sft"]["examples"] == _lines(data_dir / "messages.jsonl")
    assert rows["eval"]["notes"] and "flops" not in rows["eval"]
    assert not [n for r in rows.values() for n in r["notes"] if "config" in n]  # every config resolved

    # Data-parallel processes multiply the sequences of a max_steps stage and divide time.
    two = {r["name"]: r for r in plan.plan_recipe(recipe, flops_per_second=FPS, world_size=2)}
    assert two["sft"]["tokens"] == 2 * rows["sft"]["tokens"]
    assert two["dpo"]["tokens"] == rows["dpo"]["tokens"]
    assert two["dpo"]["seconds"] == pytest.approx(rows["dpo"]["seconds"] / 2)
    text = plan.plan_text(recipe, flops_per_second=FPS)
    assert "plan for recipe 'test'" in text and "chinchilla" in text


def test_config_only_local_folder_and_offline_hub_id(tmp_path, data_dir):
    from transformers import Qwen2Config

    folder = tmp_path / "qwen-config-only"
    cfg = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    cfg.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json"]
    stages = {
        "local": {"type": "sft", "model": str(folder), "dataset": {"path": str(data_dir / "messages.jsonl")},
                  "num_train_epochs": 1, "per_device_train_batch_size": 8, "max_length": 128,
                  "gradient_checkpointing": False},
        "hub": {"type": "sft", "model": "align-tests/no-such-model", "max_steps": 5,
                "dataset": {"path": str(data_dir / "messages.jsonl")}},
    }
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", stages)
    result = run_align(["plan", recipe, "--flops-per-second", FPS], check=True)
    n = count_parameters(cfg)["total"]
    tokens = _lines(data_dir / "messages.jsonl") * 128
    f = flops(n, tokens)
    line = _row_line(result.stdout, "local")
    assert _fmt_count(n) in line and _fmt_flops(f) in line
    mem = estimate_memory(cfg, dtype=DTYPE, batch_size=8, seq_len=128)
    assert _fmt_bytes(mem["total"]) in line
    assert "hub: cannot read the Hub config of 'align-tests/no-such-model' (offline?)" in result.stdout


def test_dataset_rows(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text("".join(json.dumps({"text": str(i)}) + "\n" for i in range(100)) + "\n")
    b = tmp_path / "b.json"
    b.write_text(json.dumps([{"text": "x"}] * 40))
    c = tmp_path / "c.csv"
    c.write_text("text\n" + "".join(f"row {i}\n" for i in range(30)))
    assert plan_inputs.dataset_rows({"path": str(a)}) == 100
    assert plan_inputs.dataset_rows({"path": str(b)}) == 40 and plan_inputs.dataset_rows({"path": str(c)}) == 30
    assert plan_inputs.dataset_rows({"path": str(a), "split": "train[:25]"}) == 25
    assert plan_inputs.dataset_rows({"path": str(a), "split": "train[:10%]"}) == 10
    assert plan_inputs.dataset_rows({"path": str(a), "test_size": 0.2}) == 80
    assert plan_inputs.dataset_rows([{"path": str(a), "weight": 0.5}, {"path": str(b), "weight": 2}]) == 130
    assert plan_inputs.dataset_rows({"path": "org/hub-dataset"}) is None
    assert plan_inputs.dataset_rows({"path": "run/task/sft.jsonl"}, {str(Path("run/task/sft.jsonl")): 7}) == 7


def test_missing_recipe_is_a_one_line_error(tmp_path):
    result = run_align(["plan", tmp_path / "nope.yaml"])
    assert result.returncode == 2 and result.stderr.strip().startswith("error: recipe")
    assert result.stderr.strip().count("\n") == 0


def test_adapter_folder_resolves_to_its_base(tmp_path, data_dir):
    from transformers import Qwen2Config

    base = tmp_path / "base"
    cfg = Qwen2Config(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    cfg.save_pretrained(base)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base), "r": 8}))
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"dpo": {
        "model": str(adapter), "dataset": {"path": str(data_dir / "prefs.jsonl")}, "max_steps": 2,
        "per_device_train_batch_size": 2, "max_length": 32}}))
    (row,) = plan.plan_recipe(recipe, flops_per_second=FPS, world_size=1)
    n = count_parameters(cfg)["total"]
    assert row["tokens"] == 2 * 2 * 2 * 32
    assert row["flops"] == pytest.approx(flops(n, row["tokens"], per_param_token=8))  # 6N policy + 2N reference
    assert row["chinchilla_tokens"] == chinchilla_tokens(n)


def test_engine_and_processes_from_flags_and_accelerate_env(tmp_path, data_dir):
    """`--engine zero3 --num-processes 4`, or the environment `accelerate launch` sets, shards the
    memory per device; the table says which engine."""
    from transformers import Qwen2Config

    folder = tmp_path / "model"
    cfg = Qwen2Config(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    cfg.save_pretrained(folder)
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"sft": {
        "model": str(folder), "dataset": {"path": str(data_dir / "messages.jsonl")}, "max_steps": 5,
        "per_device_train_batch_size": 2, "max_length": 32, "gradient_checkpointing": False}})
    expected = estimate_memory(cfg, dtype=DTYPE, batch_size=2, seq_len=32, engine="zero3", processes=4)
    assert expected["total"] < estimate_memory(cfg, dtype=DTYPE, batch_size=2, seq_len=32)["total"]
    flags = run_align(["plan", recipe, "--flops-per-second", FPS, "--engine", "zero3", "--num-processes", 4],
                      check=True).stdout
    env = run_align(["plan", recipe, "--flops-per-second", FPS], check=True,
                    env={"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                         "WORLD_SIZE": "4"}).stdout
    for out in (flags, env):
        line = _row_line(out, "sft")
        assert "zero3 x4" in line and _fmt_bytes(expected["total"]) in line, line
        assert "engine zero3 x4" in out


def test_sequence_lengths_from_the_data_and_tokenizer(tmp_path, data_dir, tiny_model, monkeypatch):
    """With the start model's tokenizer on disk, tokens are counted on the stage's data: batches
    padded to their longest row, as TRL pads them, instead of max_length."""
    from transformers import AutoTokenizer

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    rows = [json.loads(line) for line in (data_dir / "messages.jsonl").read_text().splitlines()]
    lengths = [len(tok(tok.apply_chat_template(r["messages"], tokenize=False), add_special_tokens=False)["input_ids"])
               for r in rows]
    found = plan_inputs.token_lengths({"path": str(data_dir / "messages.jsonl")}, str(tiny_model))
    assert found["sequence"] == lengths[:plan_inputs.LENGTH_SAMPLE]
    assert plan_inputs.padded_length([7] * 10, 4) == 7 and plan_inputs.padded_length([5, 9], 64, cap=8) == 8
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"sft": {
        "model": str(tiny_model), "dataset": {"path": str(data_dir / "messages.jsonl")}, "max_steps": 3,
        "per_device_train_batch_size": 4, "max_length": 256, "gradient_checkpointing": False}}))
    (row,) = plan.plan_recipe(recipe, flops_per_second=FPS)
    assert min(lengths) <= row["seq_len"] <= max(lengths) < 256
    assert row["tokens"] == pytest.approx(3 * 4 * row["seq_len"])
    assert row["seq_len"] == pytest.approx(plan_inputs.padded_length(lengths[:plan_inputs.LENGTH_SAMPLE], 4))


def test_cpu_time_is_probed_per_step(tmp_path, data_dir, tiny_model, monkeypatch):
    """Without --flops-per-second on a CPU, a small model's step is timed (no constant rate):
    the stage's seconds are its steps times the probed step, and the table says so."""
    if ON_GPU:
        pytest.skip("CPU planning")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"sft": {
        "model": str(tiny_model), "dataset": {"path": str(data_dir / "messages.jsonl")}, "max_steps": 7,
        "per_device_train_batch_size": 4, "max_length": 64, "gradient_checkpointing": False}}))
    (row,) = plan.plan_recipe(recipe)
    assert row["step_seconds"] > 0 and row["seconds"] == pytest.approx(7 * row["step_seconds"])
    assert row["runtime"] > 0
    assert "rates measured on this CPU" in plan.plan_text(recipe, rows=[row])
