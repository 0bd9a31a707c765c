"""The sigmoid fit of `align forecast` on synthetic curves whose parameters are known: recovered
from clean and noisy points, forecast from the early part of a curve that has bent, refused with
one message when there are too few points, and a wide interval (not a confident number) for a
curve that has not bent yet. Then the command on a run folder written by hand."""

import json

import numpy as np
import pytest

from align.forecast import (ForecastError, compute_for_gain, fit_sigmoid, forecast_run, forecast_stage, markdown,
                            sigmoid)
from conftest import run_align

TRUE = {"r0": 60.0, "a": 92.0, "b": 1.8, "c_mid": 4e11}
FINAL = 4e12  # ten times C_mid: the run has saturated


def _points(n=41, end=FINAL, noise=0.0, seed=0):
    c = np.linspace(0, end, n)
    y = sigmoid(c, **TRUE) + np.random.default_rng(seed).normal(0, noise, n) * (c > 0)
    return c, y


def test_sigmoid_shape_and_compute_for_gain():
    assert sigmoid(0.0, **TRUE) == 60.0
    assert sigmoid(TRUE["c_mid"], **TRUE) == pytest.approx(76.0)  # half the gain at C_mid
    c90 = compute_for_gain(0.9, TRUE["b"], TRUE["c_mid"])
    assert c90 == pytest.approx(4e11 * 9 ** (1 / 1.8))
    assert sigmoid(c90, **TRUE) == pytest.approx(60 + 0.9 * 32)


def test_clean_curve_parameters_recovered():
    fit = fit_sigmoid(*_points(), n_boot=20)
    assert fit.r0 == 60.0
    assert fit.a == pytest.approx(92.0, abs=1e-3)
    assert fit.b == pytest.approx(1.8, rel=1e-3)
    assert fit.c_mid == pytest.approx(4e11, rel=1e-3)
    assert fit.pinned


def test_noisy_curve_recovered_within_its_interval():
    fit = fit_sigmoid(*_points(noise=1.5, seed=3), bounds=(0, 100), n_boot=100)
    assert fit.a == pytest.approx(92.0, abs=1.5)
    assert fit.b == pytest.approx(1.8, rel=0.25)
    assert fit.c_mid == pytest.approx(4e11, rel=0.3)
    lo, hi = fit.interval("A")
    assert lo < 92.0 < hi and hi - lo < 4, (lo, hi)
    lo, hi = fit.interval("B")
    assert lo < 1.8 < hi
    assert fit.pinned


def test_forecast_from_the_first_quarter_of_a_bent_curve():
    """ScaleRL's use: fit the first 25% of the compute, forecast the end of the run (and beyond)."""
    c, y = _points(noise=1.0, seed=5)
    early = c <= 0.25 * FINAL
    fit = fit_sigmoid(c[early], y[early], bounds=(0, 100), n_boot=100)
    assert abs(fit.predict(FINAL) - sigmoid(FINAL, **TRUE)) < 2.0
    lo, hi = fit.band(10 * FINAL)
    assert lo[0] <= sigmoid(10 * FINAL, **TRUE) <= hi[0]


def test_too_few_points_refused_with_one_message():
    c, y = _points(n=4)
    with pytest.raises(ForecastError, match=r"ppo: 4 held-out points; a sigmoid fit needs at least 5 \(the first "
                                            r"gives R0\): evaluate more often \(eval_steps\) or train longer"):
        fit_sigmoid(c, y, where="ppo")
    c[2] = np.nan  # a point that is not a number does not count
    with pytest.raises(ForecastError, match="3 held-out points"):
        fit_sigmoid(c, y)


def test_curve_that_has_not_bent_gives_a_wide_interval():
    """Points up to a third of C_mid rise almost straight in log-compute: A is not identified. The
    answer must be a wide interval (flagged), not a confident number."""
    c, y = _points(n=12, end=TRUE["c_mid"] / 3, noise=0.3, seed=1)
    fit = fit_sigmoid(c, y, bounds=(0, 100), n_boot=100)
    lo, hi = fit.interval("A")
    assert hi - lo > 20, (lo, hi)
    assert not fit.pinned
    history = [{"step": i, "flops": float(ci), "eval_gold_score": float(yi)} for i, (ci, yi) in enumerate(zip(c, y))]
    fc = forecast_stage("ppo", history, n_boot=50)
    assert any("A is not pinned down" in note and "has not bent yet" in note for note in fc.notes())


def test_a_curve_that_turns_back_is_flagged():
    c, y = _points(n=21)
    y[-6:] -= np.linspace(2, 12, 6)  # over-optimisation: the held-out score falls late in the run
    history = [{"step": i, "flops": float(ci), "eval_gold_score": float(yi)} for i, (ci, yi) in enumerate(zip(c, y))]
    notes = forecast_stage("rloo", history, n_boot=20).notes()
    assert any("turns back" in note for note in notes), notes


def _write_run(root, curves: dict):
    """A run folder as align leaves it: recipe.yaml, stage markers and log_history.jsonl."""
    stages = {name: {"type": kind} for name, (kind, _) in curves.items()}
    (root / "recipe.yaml").parent.mkdir(parents=True, exist_ok=True)
    (root / "recipe.yaml").write_text(json.dumps({"name": "t", "stages": stages}))
    for name, (kind, history) in curves.items():
        (root / name).mkdir()
        (root / name / ".align-complete.json").write_text(json.dumps({"hash": "x", "type": kind}))
        (root / name / "log_history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))


def _history(c, y, *, gold=True):
    key = "eval_gold_score" if gold else "eval_reward"
    rows = []
    for i, (ci, yi) in enumerate(zip(c, y)):
        rows.append({"step": 2 * i, "flops": float(ci), key: float(yi), "train_seconds": float(i)})
        if i:  # PPO writes a record every step; most have no held-out metrics
            rows.append({"step": 2 * i + 1, "flops": float(ci) + 1.0, "reward": 0.5})
    return rows


def test_forecast_command_on_a_run_folder(tmp_path):
    c, y = _points(n=21, noise=0.5, seed=2)
    run = tmp_path / "run"
    _write_run(run, {"ppo": ("ppo", _history(c, y)), "rloo": ("rloo", _history(c[:4], y[:4])),
                     "sft": ("sft", [{"step": 1, "loss": 1.0}])})

    forecasts, problems = forecast_run(run, n_boot=30)
    assert [f.stage for f in forecasts] == ["ppo"]
    assert len(forecasts[0].compute) == 21 and forecasts[0].metric == "gold_score"
    assert problems == ["rloo: 4 held-out points; a sigmoid fit needs at least 5 (the first gives R0): evaluate "
                        "more often (eval_steps) or train longer"]
    text = markdown(forecasts, problems)
    row = next(line for line in text.splitlines() if line.startswith("| ppo | gold_score | 21 | 60 |"))
    assert float(row.split("|")[5].split()[0]) == pytest.approx(92, abs=1), row  # A
    assert "- rloo: 4 held-out points" in text

    result = run_align(["forecast", run, "--fit-fraction", "0.3"], check=True)
    assert "| ppo | gold_score | 21 |" in result.stdout and "fit on first" in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("| ppo | 30% |"))
    cells = [x.strip() for x in row.split("|")[1:-1]]
    assert abs(float(cells[6])) < 5, row  # the early forecast's error at the final point

    few = run_align(["forecast", run, "--stage", "rloo"])
    assert few.returncode == 2 and few.stderr.strip() == (
        "error: rloo: 4 held-out points; a sigmoid fit needs at least 5 (the first gives R0): evaluate more often "
        "(eval_steps) or train longer")
    wrong = run_align(["forecast", run, "--stage", "ppo2"])
    assert wrong.returncode == 2 and "--stage ppo2: not an RL stage of this run; did you mean 'ppo'?" in wrong.stderr
