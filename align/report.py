"""`align report RUN`: a run folder's `report.md` with PNG plots in `plots/`.

Everything is read back from what the stages left on disk, so a report can be rebuilt at any
time, for a finished or a partial run:

    recipe.yaml                      the resolved recipe: stage names, order and types
    <stage>/.align-complete.json     finished stages
    <stage>/metrics.json             duration (`stage_seconds`) and the stage's final metrics
    <stage>/log_history.jsonl        every logged step (trainer stages and PPO); older runs fall
                                     back to the newest checkpoints/checkpoint-N/trainer_state.json
    <stage>/eval.json, eval.md       the eval stage's results

Plots (only those with data): training loss per trainer stage (`loss.png`), reward-model /
preference accuracy (`accuracy.png`), PPO-style curves per RL stage (`<stage>_rl.png`), each RL
stage's held-out curve against training compute with its sigmoid forecast (`<stage>_forecast.png`,
align/forecast.py) and the gold score per policy (`<stage>_gold_score.png`). Plots are drawn with matplotlib's Agg
canvas directly (no pyplot, no global backend switch) and every file is written atomically.
"""

from __future__ import annotations

import io
import math
import time
from pathlib import Path

from align import forecast
from align.markdown import table
from align.rundir import MARKER, METRICS, read_json, read_log_history, read_recipe, remove, write_atomic
from align.stages import TYPES, Traits, traits

REPORT = "report.md"
PLOTS = "plots"

# Curves of an RL stage: (title, keys tried in order). align's PPO writes the first key; the
# others are the names TRL's RLOO/GRPO trainers log.
RL_CURVES = (
    ("reward", ("reward", "objective/scores", "rewards/mean")),
    ("KL", ("kl", "objective/kl")),
    ("entropy", ("entropy", "objective/entropy")),
    ("response length", ("response_length", "completions/mean_length")),
    ("policy loss", ("policy_loss", "loss/policy_avg")),
    ("value loss", ("value_loss", "loss/value_avg")),
)
# Final metrics worth a column in the stage table, in order of interest.
KEY_METRICS = (
    "parameters", "global_step", "train_loss_first", "train_loss_last", "eval_loss", "eval_perplexity",
    "pair_accuracy", "eval_accuracy", "mean_margin", "pref_accuracies", "pref_margins",
    "reward_first", "reward_last", "reward_mean", "kl_mean", "response_length",
    "rows_sft", "rows_pairs", "rows_prompts",
)
# Accuracy series: reward models log eval_accuracy (and accuracy while training); DPO logs
# rewards/accuracies.
ACCURACY_KEYS = ("eval_accuracy", "accuracy", "eval_rewards/accuracies", "rewards/accuracies")
FINAL_ACCURACY_KEYS = ("eval_accuracy", "pair_accuracy", "pref_accuracies")


# ---------------------------------------------------------------------------------------------
# Reading a run folder


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def series(history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key`, skipping entries without it or with non-finite values. The
    x value is the entry's `step` (1, 2, ... when entries carry none)."""
    xs, ys = [], []
    for i, row in enumerate(history):
        y = _number(row.get(key))
        if y is None:
            continue
        x = _number(row.get("step"))
        xs.append(x if x is not None else float(i + 1))
        ys.append(y)
    return xs, ys


def _stages(run_dir: Path, recipe: dict) -> list[dict]:
    out = []
    for name, block in recipe["stages"].items():
        block = block if isinstance(block, dict) else {}
        folder = run_dir / str(name)
        marker = read_json(folder / MARKER)
        metrics = read_json(folder / METRICS)
        if isinstance(marker, dict):
            status = "finished"
            if marker.get("finished"):
                status += f" {str(marker['finished']).replace('T', ' ')}"
        elif folder.is_dir():
            status = "incomplete"
        else:
            status = "not run"
        kind = str(block.get("type", name))
        stage_traits = traits(kind) if kind in TYPES else Traits()
        out.append({
            "name": str(name),
            "type": kind,
            "online": stage_traits.online,  # RL curves rather than a loss curve
            "pairs": stage_traits.data == "preference",  # pair accuracy
            "dir": folder,
            "status": status,
            "finished": isinstance(marker, dict),
            "metrics": metrics if isinstance(metrics, dict) else {},
            "history": read_log_history(folder) if folder.is_dir() else [],
        })
    return out


# ---------------------------------------------------------------------------------------------
# Plots


def _figure(width=7.0, height=4.0, nrows=1, ncols=1):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _integer_steps(ax):
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path: Path):
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    write_atomic(path, buffer.getvalue())


def plot_loss(stages: list[dict], path: Path) -> bool:
    """Training loss per trainer stage (solid) and eval loss (dashed, markers) over steps."""
    lines = []
    for s in stages:
        if s["online"]:
            continue
        train, evals = series(s["history"], "loss"), series(s["history"], "eval_loss")
        if train[0] or evals[0]:
            lines.append((s["name"], train, evals))
    if not lines:
        return False
    fig, axes = _figure()
    ax = axes[0][0]
    colors = [f"C{i % 10}" for i in range(len(lines))]
    for (name, train, evals), color in zip(lines, colors):
        if train[0]:
            ax.plot(*train, color=color, label=f"{name} train", marker="o" if len(train[0]) == 1 else None)
        if evals[0]:
            ax.plot(*evals, color=color, linestyle="--", marker="o", label=f"{name} eval")
    ax.set(title="Training loss", xlabel="step", ylabel="loss")
    _integer_steps(ax)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)
    return True


def plot_accuracy(stages: list[dict], path: Path) -> bool:
    """Reward-model (and DPO implicit reward) pair accuracy over steps when logged; stages
    that only have a final number get a horizontal line, or, with no curves at all, a bar."""
    curves, finals = [], []
    for s in stages:
        if not s["pairs"]:
            continue
        found = False
        for key in ACCURACY_KEYS:
            xs, ys = series(s["history"], key)
            if xs:
                curves.append((f"{s['name']} {key}", xs, ys))
                found = True
        if not found:
            value = next((_number(s["metrics"].get(k)) for k in FINAL_ACCURACY_KEYS
                          if _number(s["metrics"].get(k)) is not None), None)
            if value is not None:
                finals.append((s["name"], value))
    if not curves and not finals:
        return False
    fig, axes = _figure()
    ax = axes[0][0]
    if curves:
        for label, xs, ys in curves:
            ax.plot(xs, ys, marker="o", label=label)
        for i, (name, value) in enumerate(finals):
            ax.axhline(value, color=f"C{(len(curves) + i) % 10}", linestyle=":", label=f"{name} final")
        ax.set(xlabel="step")
        _integer_steps(ax)
        ax.legend(fontsize="small")
    else:
        ax.bar([n for n, _ in finals], [v for _, v in finals], color="C0")
        for i, (_, v) in enumerate(finals):
            ax.annotate(f"{v:.3f}", (i, v), ha="center", va="bottom")
    ax.axhline(0.5, color="grey", linewidth=0.8, linestyle="--")
    ax.set(title="Preference accuracy (chosen scored above rejected)", ylabel="accuracy", ylim=(0, 1.05))
    ax.grid(alpha=0.3)
    _save(fig, path)
    return True


def rl_curves(history: list[dict]) -> list[tuple[str, str, list, list]]:
    out = []
    for title, keys in RL_CURVES:
        for key in keys:
            xs, ys = series(history, key)
            if xs:
                out.append((title, key, xs, ys))
                break
    return out


def plot_rl(stage: dict, path: Path) -> bool:
    """Reward, KL, entropy, response length (and the losses, when logged) of an RL stage."""
    curves = rl_curves(stage["history"])
    if not curves:
        return False
    ncols = min(3, len(curves))
    nrows = math.ceil(len(curves) / ncols)
    fig, axes = _figure(4.0 * ncols, 3.0 * nrows, nrows, ncols)
    flat = [ax for row in axes for ax in row]
    for ax, (title, key, xs, ys) in zip(flat, curves):
        ax.plot(xs, ys, color="C0", marker="o" if len(xs) == 1 else None)
        ax.set(title=title, xlabel="step", ylabel=key)
        _integer_steps(ax)
        ax.grid(alpha=0.3)
    for ax in flat[len(curves):]:
        ax.set_visible(False)
    fig.suptitle(f"{stage['name']} ({stage['type']})")
    _save(fig, path)
    return True


def plot_gold(results: dict, title: str, path: Path) -> bool:
    """Gold score (0-100) of each evaluated policy, from eval.json."""
    policies = results.get("policies") if isinstance(results, dict) else None
    if not isinstance(policies, dict):
        return False
    bars = [(str(n), _number(m.get("gold_score"))) for n, m in policies.items() if isinstance(m, dict)]
    bars = [(n, v) for n, v in bars if v is not None]
    if not bars:
        return False
    fig, axes = _figure(max(4.0, 1.2 * len(bars) + 2), 4.0)
    ax = axes[0][0]
    ax.bar([n for n, _ in bars], [v for _, v in bars], color=[f"C{i % 10}" for i in range(len(bars))])
    for i, (_, v) in enumerate(bars):
        ax.annotate(f"{v:.1f}", (i, v), ha="center", va="bottom")
    top = max(v for _, v in bars)
    ax.set(title=title, ylabel="gold score", ylim=(min(0.0, min(v for _, v in bars)), max(100.0, top * 1.1)))
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)
    return True


def plot_forecast(fc: forecast.StageForecast, path: Path) -> bool:
    """Held-out points against training compute (log scale): the sigmoid fitted on the first
    `fit_fraction` of the compute with its bootstrap band, carried on to 10x the final compute,
    the fit on every point (dashed), the cut-off and the starting score R0."""
    import numpy as np

    c, y = fc.compute, fc.scores
    positive = c > 0
    seen = positive & (c <= fc.cutoff)
    fig, axes = _figure()
    ax = axes[0][0]
    grid = np.geomspace(c[positive].min() / 2, 10 * c[-1], 200)
    if fc.early is not None:
        lo, hi = fc.early.band(grid)
        ax.fill_between(grid, lo, hi, color="C1", alpha=0.2, label=f"forecast {forecast.LEVEL:.0%} band")
        ax.plot(grid, fc.early.predict(grid), color="C1", label=f"fit on first {fc.fit_fraction:.0%} of compute")
    ax.plot(grid, fc.fit.predict(grid), color="C2", linestyle="--", label="fit on every point")
    ax.plot(c[seen], y[seen], "o", color="C0", label="held-out points (fitted)")
    ax.plot(c[positive & ~seen], y[positive & ~seen], "o", color="C0", mfc="none", label="later points")
    ax.axvline(fc.cutoff, color="grey", linestyle=":", label="fit cut-off")
    ax.axhline(fc.fit.r0, color="grey", linewidth=0.8, label="R0 (before RL)")
    ax.set(title=f"{fc.stage}: held-out {fc.metric} against training compute", xscale="log",
           xlabel="training FLOPs (as align plan counts them)", ylabel=fc.metric)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save(fig, path)
    return True


def forecasts(stages: list[dict]) -> tuple[list, list[str]]:
    """Forecasts of the RL stages that logged held-out points, and why others could not be fitted."""
    found, problems = [], []
    for s in stages:
        if not s["online"] or forecast.default_metric(s["history"]) is None:
            continue
        try:
            found.append(forecast.forecast_stage(s["name"], s["history"]))
        except forecast.ForecastError as e:
            problems.append(str(e))
    return found, problems


# ---------------------------------------------------------------------------------------------
# Markdown


def _fmt(value) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _duration(seconds) -> str:
    s = _number(seconds)
    if s is None:
        return ""
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def key_metrics(stage: dict, limit: int = 6) -> str:
    m = stage["metrics"]
    parts = [f"{k} {_fmt(m[k])}" for k in KEY_METRICS if k in m and m[k] is not None][:limit]
    if stage["type"] == "eval":  # flattened "<policy>/<metric>"
        parts += [f"{k} {_fmt(v)}" for k, v in m.items() if k.endswith("/gold_score")][:limit]
    return ", ".join(parts)


def write_report(run_dir) -> Path:
    """(Re)build `report.md` and `plots/*.png` in `run_dir`; returns the report's path."""
    run_dir = Path(run_dir)
    recipe = read_recipe(run_dir)
    stages = _stages(run_dir, recipe)
    plots_dir = run_dir / PLOTS
    plots_dir.mkdir(parents=True, exist_ok=True)
    made: list[str] = []

    def plot(filename, draw, *args) -> str | None:
        if draw(*args, plots_dir / filename):
            made.append(filename)
            return f"{PLOTS}/{filename}"
        return None

    lines = [f"# Run report: {recipe.get('name', run_dir.name)}", "",
             f"Run folder `{run_dir}`, report written {time.strftime('%Y-%m-%d %H:%M:%S')}.", "",
             "## Stages", "", *table(["stage", "type", "status", "duration", "key metrics"], [
                 [s["name"], s["type"], s["status"], _duration(s["metrics"].get("stage_seconds")), key_metrics(s)]
                 for s in stages])]
    total = sum(_number(s["metrics"].get("stage_seconds")) or 0.0 for s in stages)
    if total:
        lines += ["", f"Total stage time: {_duration(total)}."]

    figures = []
    loss = plot("loss.png", plot_loss, stages)
    if loss:
        figures += ["## Training loss", "", f"![Training loss]({loss})", ""]
    accuracy = plot("accuracy.png", plot_accuracy, stages)
    if accuracy:
        figures += ["## Reward-model accuracy", "", f"![Preference accuracy]({accuracy})", ""]
    for s in stages:
        if s["online"]:
            rl = plot(f"{s['name']}_rl.png", plot_rl, s)
            if rl:
                last = s["history"][-1] if s["history"] else {}
                summary = ", ".join(f"{key} {_fmt(_number(last.get(key)))}" for _, key, *_ in rl_curves(s["history"])
                                    if _number(last.get(key)) is not None)
                figures += [f"## {s['name']}: RL curves", "", f"![{s['name']} curves]({rl})", ""]
                if summary:
                    figures += [f"Last step: {summary}.", ""]
    fitted, problems = forecasts(stages)
    if fitted or problems:
        figures += ["## Held-out curves and forecast", ""]
        for fc in fitted:
            image = plot(f"{fc.stage}_forecast.png", plot_forecast, fc)
            figures += [f"![{fc.stage} forecast]({image})", ""]
        figures += [forecast.markdown(fitted, problems).rstrip(), ""]
    for s in stages:
        results = read_json(s["dir"] / "eval.json")
        eval_md = s["dir"] / "eval.md"
        if results is None and not eval_md.is_file():
            continue
        figures += [f"## Evaluation: {s['name']}", ""]
        gold = plot(f"{s['name']}_gold_score.png", plot_gold, results, f"Gold score ({s['name']})")
        if gold:
            figures += [f"![Gold score]({gold})", ""]
        if eval_md.is_file():
            figures += [eval_md.read_text().rstrip(), ""]
    if figures:
        lines += [""] + figures
    else:
        lines += ["", "No logged steps or evaluation results yet."]

    for old in plots_dir.glob("*.png"):  # plots of stages that no longer have data
        if old.name not in made:
            remove(old, run_dir)

    path = run_dir / REPORT
    write_atomic(path, "\n".join(lines).rstrip() + "\n")
    return path


def report_command(args):
    path = write_report(args.run_dir)
    print(path)
