"""Held-out curves during RL (align/heldout.py) on real tiny models: PPO and RLOO score their policy
on held-out prompts before training, every eval_steps and at the end, with the same code as
`align eval`; every point carries the training compute so far, counted as `align plan` counts it;
evaluating leaves training exactly as it was; `align forecast` and the report read the points."""

import json

import pytest

from align import estimate
from align.models import load_tokenizer
from conftest import read_metrics, run_align, write_recipe
from test_ppo import _lora_reward_adapter

EVAL_KEYS = {"eval_gold_score", "eval_reward", "eval_kl_to_ref", "eval_response_length", "flops", "train_seconds"}


def _blocks(data_dir, reward):
    held_out = {"eval_dataset": {"path": str(data_dir / "prompts.jsonl"), "split": "train[:8]"},
                "judge": "tests.rewards:judge_a", "reward_model": str(reward), "peft": {"r": 4}, "learning_rate": 1e-3}
    ppo = {**held_out, "dataset": {"path": str(data_dir / "prompts.jsonl")}, "num_train_steps": 4, "eval_steps": 1,
           "per_device_train_batch_size": 8, "num_ppo_epochs": 1, "response_length": 8, "save_steps": 0,
           "per_device_eval_batch_size": 4, "report_to": "tensorboard", "disable_tqdm": True}
    rloo = {**held_out, "dataset": {"path": str(data_dir / "prompts.jsonl")}, "max_steps": 4, "eval_steps": 2,
            "per_device_train_batch_size": 8, "num_generations": 4, "max_completion_length": 8, "beta": 0.05,
            "logging_steps": 1, "save_strategy": "no"}
    return ppo, rloo


def _log(stage_dir):
    return [json.loads(line) for line in (stage_dir / "log_history.jsonl").read_text().splitlines()]


def _points(log):
    return [r for r in log if "eval_gold_score" in r]


def test_ppo_and_rloo_log_held_out_points_with_compute(tmp_path, tiny_model, data_dir):
    reward = _lora_reward_adapter(tiny_model, tmp_path / "rm")
    ppo, rloo = _blocks(data_dir, reward)
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"ppo": ppo, "rloo": rloo}, model=str(tiny_model))
    result = run_align(["run", recipe], check=True)
    assert "[ppo] held-out at step 0: gold_score" in result.stdout

    # PPO: a point before training and after every step, each with every metric and the compute so far.
    log = _log(tmp_path / "run" / "ppo")
    points = _points(log)
    assert [p["step"] for p in points] == [0, 1, 2, 3, 4]
    assert all(EVAL_KEYS <= set(p) for p in points), points[0]
    assert points[0]["flops"] == 0 and points[0]["train_seconds"] == 0
    assert all(0 <= p["eval_gold_score"] <= 100 and p["eval_kl_to_ref"] > -0.5 for p in points)
    assert [r["step"] for r in log if "reward" in r] == [1, 2, 3, 4]  # the start point is no step record
    # Compute: align plan's PPO count per token (shared LoRA base: policy and critic train at 4 N
    # per token, reference and reward forward at 2 N, the policy generates at 2 N, the rollout pass
    # is reused) times the step's real tokens, whose response part is logged.
    from transformers import AutoConfig

    n = estimate.count_parameters(AutoConfig.from_pretrained(str(tiny_model)))["total"]
    n_score = estimate.score_parameters(AutoConfig.from_pretrained(str(tiny_model)))
    per_token = estimate.ppo_flops(n, episodes=1, prompt_len=1, response_len=0, n_reference=n, n_reward=n_score,
                               n_critic=n_score, train_per_param_token=4.0)["total"]
    tokenizer = load_tokenizer(str(tiny_model))
    prompts = [json.loads(line)["prompt"] for line in (data_dir / "prompts.jsonl").read_text().splitlines()]
    lengths = [len(tokenizer(tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False),
                             add_special_tokens=False)["input_ids"]) for p in prompts]
    previous = 0.0
    for r in log[1:]:
        tokens = (r["flops"] - previous) / per_token
        prompt_tokens = tokens - 8 * r["response_length"]
        assert prompt_tokens == pytest.approx(round(prompt_tokens), abs=1e-6), r  # whole tokens
        assert 8 * min(lengths) <= round(prompt_tokens) <= 8 * max(lengths), r
        previous = r["flops"]
    assert [p["flops"] for p in points] == sorted({p["flops"] for p in points})  # strictly rising
    # The trackers get them as eval/<metric>, at their steps.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tb,) = (tmp_path / "run" / "ppo" / "checkpoints" / "runs").iterdir()
    events = EventAccumulator(str(tb))
    events.Reload()
    scalars = events.Scalars("eval/gold_score")
    assert [e.step for e in scalars] == [0, 1, 2, 3, 4]
    assert [e.value for e in scalars] == pytest.approx([p["eval_gold_score"] for p in points], rel=1e-5)
    assert read_metrics(tmp_path / "run" / "ppo")["eval_gold_score"] == points[-1]["eval_gold_score"]

    # RLOO: TRL's schedule (eval_on_start, eval_steps 2), align's metrics, compute from TRL's token count.
    log = _log(tmp_path / "run" / "rloo")
    points = _points(log)
    assert [p["step"] for p in points] == [0, 2, 4]
    assert all(EVAL_KEYS <= set(p) for p in points), points[0]
    assert points[0]["flops"] == 0 and points[0]["train_seconds"] == 0 < points[1]["train_seconds"]
    per_token = 2.0 * (n + n_score + n) + 4.0 * n  # generation, reward, reference; LoRA training
    tokens = {r["step"]: r["num_tokens"] for r in log if "num_tokens" in r}
    for p in points[1:]:
        assert p["flops"] == pytest.approx(per_token * tokens[p["step"]], rel=1e-9)
    assert read_metrics(tmp_path / "run" / "rloo")["eval_gold_score"] == points[-1]["eval_gold_score"]

    # align forecast: PPO has five points (one fit), RLOO three: its one-line reason, not a table.
    out = run_align(["forecast", tmp_path / "run"], check=True)
    assert "| ppo | gold_score | 5 |" in out.stdout
    assert "- rloo: 3 held-out points; a sigmoid fit needs at least 5" in out.stdout
    few = run_align(["forecast", tmp_path / "run", "--stage", "rloo"])
    assert few.returncode == 2 and few.stderr.startswith("error: rloo: 3 held-out points")
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Held-out curves and forecast" in report and (tmp_path / "run" / "plots" / "ppo_forecast.png").is_file()


def test_evaluating_leaves_ppo_training_exactly_as_it_was(tmp_path, tiny_model, data_dir):
    """Generation for the held-out points reseeds; the training's random streams must not notice:
    with and without evaluation, PPO takes the very same steps."""
    reward = _lora_reward_adapter(tiny_model, tmp_path / "rm")
    ppo, _ = _blocks(data_dir, reward)
    ppo = {**ppo, "num_train_steps": 3, "report_to": "none"}
    logs = {}
    for name, strategy in (("with", "steps"), ("without", "no")):
        recipe = write_recipe(tmp_path / f"{name}.yaml", tmp_path / name, {"ppo": {**ppo, "eval_strategy": strategy}},
                              model=str(tiny_model))
        run_align(["run", recipe], check=True)
        logs[name] = [r for r in _log(tmp_path / name / "ppo") if "reward" in r]
    assert not _points(logs["without"]) and len(_points(logs["with"])) == 3
    for a, b in zip(logs["with"], logs["without"], strict=True):
        assert a["reward"] == pytest.approx(b["reward"], abs=1e-6) and a["kl"] == pytest.approx(b["kl"], abs=1e-6)


def test_judge_without_held_out_prompts_is_refused_at_load(tmp_path, data_dir):
    block = {"dataset": {"path": str(data_dir / "prompts.jsonl")}, "reward_funcs": "tests.rewards:letter_a",
             "judge": "tests.rewards:judge_a", "max_steps": 2}
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"rloo": block}, model="none")
    result = run_align(["run", "--dry-run", recipe])
    assert result.returncode == 2 and result.stderr.strip() == (
        "error: stages.rloo.judge: scores held-out prompts, and the stage has none; add `eval_dataset: {path: ...}` "
        "(or `test_size` in its dataset)")


def test_grpo_without_a_reference_in_memory_loads_its_starting_model(tmp_path, tiny_model, data_dir):
    """GRPO with beta 0 and full fine-tuning keeps no reference model; the held-out KL then reads
    the stage's starting model: zero before the first step, not after training."""
    block = {"dataset": {"path": str(data_dir / "prompts.jsonl")}, "reward_funcs": "tests.rewards:letter_a",
             "eval_dataset": {"path": str(data_dir / "prompts.jsonl"), "split": "train[:4]"}, "beta": 0.0,
             "max_steps": 2, "eval_steps": 2, "per_device_train_batch_size": 8, "num_generations": 4,
             "max_completion_length": 8, "learning_rate": 1e-2, "logging_steps": 1, "save_strategy": "no"}
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"grpo": block}, model=str(tiny_model))
    run_align(["run", recipe], check=True)
    points = [r for r in _log(tmp_path / "run" / "grpo") if "eval_kl_to_ref" in r]
    assert [p["step"] for p in points] == [0, 2]
    assert "eval_gold_score" not in points[0] and "eval_reward" not in points[0]  # no judge, no reward model
    assert points[0]["eval_kl_to_ref"] == 0 and points[1]["eval_kl_to_ref"] != 0, points
