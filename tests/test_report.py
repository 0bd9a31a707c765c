"""`align report`: report.md and its PNG plots, after a real run and from synthetic logs."""

import json
import re
from pathlib import Path

import pytest

from conftest import read_metrics, run_align, write_recipe
from align import report
from align.errors import AlignError

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _images(report_md: Path) -> list[Path]:
    """The PNGs report.md links to; each must exist and decode to a non-empty image."""
    import matplotlib.image

    links = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", report_md.read_text())
    paths = [report_md.parent / link for link in links]
    for path in paths:
        assert path.is_file(), f"{path} is linked from report.md but missing"
        assert path.read_bytes()[:8] == PNG_MAGIC
        pixels = matplotlib.image.imread(path)
        assert pixels.shape[0] > 0 and pixels.shape[1] > 0
    return paths


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory, tiny_model, data_dir) -> Path:
    out = tmp_path_factory.mktemp("report")
    recipe = write_recipe(out / "r.yaml", out / "run", {"sft": {
        "model": str(tiny_model), "dataset": {"path": str(data_dir / "messages.jsonl"), "test_size": 0.05},
        "max_steps": 10, "per_device_train_batch_size": 8, "learning_rate": 1e-3,
        "logging_steps": 2, "save_strategy": "no"}})
    result = run_align(["run", recipe], check=True)
    assert "report: " in result.stdout and "report not written" not in result.stderr
    return out / "run"


def test_run_writes_report_with_plots(sft_run):
    md = sft_run / "report.md"
    text = md.read_text()
    assert "| sft | sft | finished" in text
    assert f"| {report._duration(read_metrics(sft_run / 'sft')['stage_seconds'])} |" in text
    images = _images(md)
    assert [p.name for p in images] == ["loss.png"]
    # Trainer stages keep their full log even without checkpoints (save_strategy: "no").
    history = [json.loads(line) for line in (sft_run / "sft" / "log_history.jsonl").read_text().splitlines()]
    assert [e["step"] for e in history if "loss" in e] == [2, 4, 6, 8, 10]
    assert any("eval_loss" in e for e in history)
    assert not list((sft_run / "sft").glob("checkpoints/checkpoint-*"))


def test_report_command_rebuilds(sft_run, tmp_path):
    (sft_run / "report.md").unlink()
    for png in (sft_run / "plots").glob("*.png"):
        png.unlink()
    result = run_align(["report", sft_run], check=True)
    assert result.stdout.strip().endswith("report.md")
    assert [p.name for p in _images(sft_run / "report.md")] == ["loss.png"]

    bad = run_align(["report", tmp_path])
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "no recipe.yaml" in bad.stderr


def _synthetic_run(root: Path) -> Path:
    """A run folder as the stages would leave it: sft (only a checkpoint's trainer_state.json),
    reward (final accuracy only), dpo (logged accuracies), ppo (log_history.jsonl), eval."""
    import yaml

    from align import evaluate

    run = root / "run"
    stages = {"sft": {"type": "sft"}, "reward": {"type": "reward"}, "dpo": {"type": "dpo"},
              "ppo": {"type": "ppo"}, "eval": {"type": "eval"}, "later": {"type": "sft"}}
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({"name": "synthetic", "output_dir": str(run), "stages": stages},
                                                  sort_keys=False))
    for name, seconds in (("sft", 12.5), ("reward", 3.0), ("dpo", 75.0), ("ppo", 4000.0), ("eval", 2.0)):
        (run / name).mkdir()
        (run / name / ".align-complete.json").write_text(json.dumps(
            {"hash": "x", "type": stages[name]["type"], "finished": "2025-01-01T10:00:00"}))
        (run / name / "metrics.json").write_text(json.dumps({"stage_seconds": seconds}))
    ckpt = run / "sft" / "checkpoints" / "checkpoint-4"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"log_history": [
        {"loss": 3.0, "step": 2}, {"loss": float("nan"), "step": 3}, {"loss": 2.5, "step": 4},
        {"eval_loss": 2.7, "step": 4}, {"train_runtime": 1.0, "step": 4}]}))
    (run / "reward" / "metrics.json").write_text(json.dumps({"stage_seconds": 3.0, "eval_accuracy": 0.8,
                                                             "pair_accuracy": 0.8}))
    (run / "dpo" / "log_history.jsonl").write_text("".join(
        json.dumps({"loss": 0.69 - 0.05 * i, "rewards/accuracies": 0.5 + 0.1 * i, "step": i}) + "\n"
        for i in range(1, 4)) + "not json\n")
    (run / "ppo" / "log_history.jsonl").write_text("".join(json.dumps(
        {"step": i, "reward": 0.1 * i, "kl": 0.01 * i, "entropy": 2.0 - 0.1 * i, "response_length": 20 - i,
         "policy_loss": -0.01, "value_loss": 0.5 / i}) + "\n" for i in range(1, 6)))
    results = {"policies": {"sft": {"gold_score": 41.0, "reward": 0.1, "kl_to_ref": 0.0},
                            "ppo": {"gold_score": 63.5, "reward": 0.9, "kl_to_ref": 1.2, "win_rate_vs_ref": 0.7}},
               "reward_model": {"pair_accuracy": 0.81, "mean_margin": 1.4},
               "samples": [{"prompt": "add 2 3", "sft": "5", "ppo": "5"}]}
    evaluate.write(results, run / "eval")
    (run / "later").mkdir()  # started, never finished
    return run


def test_synthetic_logs_make_every_plot(tmp_path):
    run = _synthetic_run(tmp_path)
    (run / "plots").mkdir()
    (run / "plots" / "stale.png").write_bytes(PNG_MAGIC)
    md = report.write_report(run)
    assert md == run / "report.md"
    text = md.read_text()
    names = sorted(p.name for p in _images(md))
    assert names == ["accuracy.png", "eval_gold_score.png", "loss.png", "ppo_rl.png"]
    assert sorted(p.name for p in (run / "plots").iterdir()) == names  # stale plot removed
    assert "| ppo | ppo | finished 2025-01-01 10:00:00 | 1h06m |" in text
    assert "| dpo | dpo | finished 2025-01-01 10:00:00 | 1m15s |" in text
    assert "| later | sft | incomplete |" in text
    assert "eval_accuracy 0.8" in text
    assert "Reward model: pair accuracy 0.810" in text  # eval.md included
    assert "| ppo | 63.5 |" in text
    assert "Last step: reward 0.5, kl 0.05, entropy 1.5, response_length 15" in text
    assert not list(run.glob("*.tmp*")) and not list((run / "plots").glob(".*"))


def test_plot_data_selection(tmp_path):
    run = _synthetic_run(tmp_path)
    stages = {s["name"]: s for s in report._stages(run, {"stages": {"sft": {}, "ppo": {}, "dpo": {}}})}
    assert report.series(stages["sft"]["history"], "loss") == ([2.0, 4.0], [3.0, 2.5])  # NaN dropped
    assert [c[1] for c in report.rl_curves(stages["ppo"]["history"])] == [
        "reward", "kl", "entropy", "response_length", "policy_loss", "value_loss"]
    assert len(stages["dpo"]["history"]) == 3  # the malformed line is skipped
    # Only a final accuracy: a bar chart instead of curves.
    only_final = [s for s in report._stages(run, {"stages": {"reward": {}}})]
    assert report.plot_accuracy(only_final, tmp_path / "a.png")
    assert (tmp_path / "a.png").read_bytes()[:8] == PNG_MAGIC
    assert not report.plot_loss(only_final, tmp_path / "b.png") and not (tmp_path / "b.png").exists()


def test_not_a_run_folder(tmp_path):
    with pytest.raises(AlignError, match="no recipe.yaml"):
        report.write_report(tmp_path)


def test_report_failure_does_not_fail_the_run(tmp_path, monkeypatch, capsys):
    from align import run as run_module
    from align.recipe import build_recipe

    def broken(run_dir):
        raise RuntimeError("no display")

    monkeypatch.setattr(report, "write_report", broken)
    recipe = build_recipe({"name": "t", "output_dir": str(tmp_path / "run"),
                           "stages": {"task": {"n_sft": 10, "n_pairs": 10, "n_prompts": 10, "n_eval": 10}}})
    run_module.run(recipe)
    assert (tmp_path / "run" / "task" / ".align-complete.json").exists()
    assert "warning: report not written: RuntimeError: no display" in capsys.readouterr().err
