"""`align forecast RUN`: where an RL stage's held-out score saturates, from the early part of its curve.

ScaleRL (Khatri et al. 2025, arXiv:2510.13786) models the held-out score after training compute C as

    R(C) = R0 + (A - R0) / (1 + (C_mid / C) ** B)

with R0 the score before RL, A the asymptote, B the efficiency (how steeply the score rises in
log-compute) and C_mid the compute at which half the gain A - R0 is made. A sigmoid fitted on the
first part of a run forecasts where it saturates, and RL setups compare by (A, B) rather than by
where each happened to stop.

The fit (`fit_sigmoid`) is pure numpy/scipy: R0 is the first point's score; A, B and log C_mid are
fitted by robust least squares (`soft_l1`) with bounds, in log-compute for conditioning, from
several starts; intervals come from a bootstrap over the points' residuals (resample, refit).
Fewer than `MIN_POINTS` points are refused. A curve that has not bent yet leaves A unidentified: the
bootstrap then spreads A over a wide range and `Fit.pinned` is false.

The curves are the held-out points the PPO, RLOO and GRPO stages log every `eval_steps`
(align/heldout.py): `eval_<metric>` with `flops`, the training compute spent so far.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from align.errors import AlignError
from align.markdown import table
from align.rundir import finished_stages, read_log_history, read_recipe

MIN_POINTS = 5  # the first point (R0) plus at least four for three parameters
LEVEL = 0.9  # central bootstrap interval
B_BOUNDS = (0.05, 20.0)
MID_RANGE = math.log(1e3)  # C_mid may lie this far (in log-compute) beyond the measured range
# Scores with a known range, by metric name: the judge's gold score is 0-100.
METRIC_BOUNDS = {"gold_score": (0.0, 100.0)}
SCORES = ("gold_score", "reward")  # the default metric: the first one a stage logged
MULTIPLES = (2, 4, 10)  # forecast at these multiples of the run's final compute


class ForecastError(AlignError):
    """A curve that cannot be fitted (too few points, no compute logged)."""


# ---------------------------------------------------------------------------------------------
# The curve and its fit (pure)


def sigmoid(compute, r0: float, a: float, b: float, c_mid: float):
    """R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B); R(0) = R0. Accepts scalars or arrays."""
    c = np.asarray(compute, dtype=float)
    gain = np.where(c > 0, _expit(b * (np.log(np.where(c > 0, c, 1.0)) - math.log(c_mid))), 0.0)
    out = r0 + (a - r0) * gain
    return float(out) if out.ndim == 0 else out


def _expit(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -700, 700)))


def compute_for_gain(fraction: float, b: float, c_mid: float) -> float:
    """Compute at which the score has made `fraction` of its gain A - R0: C_mid (f / (1 - f))^(1/B)."""
    return c_mid * (fraction / (1.0 - fraction)) ** (1.0 / b)


@dataclasses.dataclass
class Fit:
    """A fitted sigmoid, its bootstrap samples and the points it was fitted on."""

    r0: float
    a: float
    b: float
    c_mid: float
    compute: np.ndarray  # the fitted points (the R0 point excluded)
    scores: np.ndarray
    samples: np.ndarray  # (n_boot, 3): A, B, C_mid of each bootstrap refit

    def predict(self, compute):
        return sigmoid(compute, self.r0, self.a, self.b, self.c_mid)

    def band(self, compute, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
        """Central `level` interval of the bootstrap refits' predictions at `compute`."""
        c = np.atleast_1d(np.asarray(compute, dtype=float))
        preds = np.stack([sigmoid(c, self.r0, a, b, m) for a, b, m in self.samples]) if len(self.samples) else \
            np.atleast_2d(self.predict(c))
        q = (1 - level) / 2
        return np.quantile(preds, q, axis=0), np.quantile(preds, 1 - q, axis=0)

    def interval(self, name: str, level: float = LEVEL) -> tuple[float, float]:
        """Central `level` bootstrap interval of "A", "B" or "C_mid"."""
        column = {"A": 0, "B": 1, "C_mid": 2}[name]
        values = self.samples[:, column] if len(self.samples) else np.array([[self.a, self.b, self.c_mid][column]])
        q = (1 - level) / 2
        return float(np.quantile(values, q)), float(np.quantile(values, 1 - q))

    @property
    def compute_90(self) -> float:
        """Compute to make 90 % of the gain A - R0."""
        return compute_for_gain(0.9, self.b, self.c_mid)

    @property
    def pinned(self) -> bool:
        """Whether the data pin A down: its interval is narrower than a quarter of the gain. A
        curve still rising straight in log-compute has not bent, and A could be almost anything."""
        lo, hi = self.interval("A")
        return hi - lo <= 0.25 * max(abs(self.a - self.r0), 1e-12)


def fit_sigmoid(compute, scores, *, bounds: tuple[float, float] | None = None, n_boot: int = 100,
                seed: int = 0, where: str = "curve") -> Fit:
    """Fit R(C) to points sorted by compute; the first point gives R0 (at C = 0 it is R0 exactly).

    `bounds` limits A (a score's known range, e.g. 0-100); without them A may lie up to ten
    times the measured range beyond it. ForecastError when fewer than MIN_POINTS points remain.
    """
    from scipy.optimize import least_squares

    c = np.asarray(compute, dtype=float)
    y = np.asarray(scores, dtype=float)
    keep = np.isfinite(c) & np.isfinite(y)
    c, y = c[keep], y[keep]
    order = np.argsort(c, kind="stable")
    c, y = c[order], y[order]
    if len(c) < MIN_POINTS or np.count_nonzero(c[1:] > 0) < MIN_POINTS - 1:
        raise ForecastError(f"{where}: {len(c)} held-out point{'s' if len(c) != 1 else ''}; a sigmoid fit needs "
                            f"at least {MIN_POINTS} (the first gives R0): evaluate more often (eval_steps) or train "
                            f"longer")
    r0, c, y = float(y[0]), c[1:], y[1:]
    x = np.log(c)
    shift = float(x.max())  # fit in log-compute relative to the last point: values near 0
    x = x - shift
    span = max(float(np.ptp(np.append(y, r0))), 1e-6)
    a_lo, a_hi = min(y.min(), r0) - 10 * span, max(y.max(), r0) + 10 * span
    if bounds is not None:
        a_lo, a_hi = max(a_lo, bounds[0]), min(a_hi, bounds[1])
    lower = np.array([a_lo, B_BOUNDS[0], x.min() - MID_RANGE])
    upper = np.array([a_hi, B_BOUNDS[1], MID_RANGE])
    noise = _noise_scale(y, span)

    def residuals(p, xs, ys):
        a, b, m = p
        return r0 + (a - r0) * _expit(b * (xs - m)) - ys

    def jacobian(p, xs, ys):
        a, b, m = p
        s = _expit(b * (xs - m))
        slope = (a - r0) * s * (1 - s)
        return np.stack([s, slope * (xs - m), -slope * b], axis=1)

    def solve(xs, ys, starts):
        best = None
        for start in starts:
            start = np.clip(start, lower + 1e-6 * (upper - lower), upper - 1e-6 * (upper - lower))
            result = least_squares(residuals, start, jac=jacobian, args=(xs, ys), bounds=(lower, upper),
                                   loss="soft_l1", f_scale=noise, ftol=1e-6, xtol=1e-6, gtol=1e-6)
            if best is None or result.cost < best.cost:
                best = result
        return best.x

    fitted = solve(x, y, _grid_starts(x, y, r0, lower, upper, keep=4))
    rng = np.random.default_rng(seed)
    samples = []
    # Residual bootstrap: the points stay where the schedule put them (a fixed design); each refit
    # sees the fitted curve plus the residuals drawn again. Resampling whole points instead would
    # drop plateau points and let slow-rising curves through, widening A for a curve that has bent.
    curve_y = y + residuals(fitted, x, y)
    res = y - curve_y
    for _ in range(n_boot):
        yb = curve_y + rng.choice(res - res.mean(), len(res), replace=True)
        samples.append(solve(x, yb, [fitted, *_grid_starts(x, yb, r0, lower, upper, keep=1)]))
    a, b, m = fitted
    samples = np.array(samples).reshape(-1, 3)
    samples[:, 2] = np.exp(samples[:, 2] + shift)
    return Fit(r0=r0, a=float(a), b=float(b), c_mid=float(math.exp(m + shift)), compute=c, scores=y,
               samples=samples)


def _noise_scale(y: np.ndarray, span: float) -> float:
    """Robust noise estimate from successive differences (scale of soft_l1's linear region)."""
    if len(y) < 3:
        return 0.05 * span
    d = np.diff(y)
    mad = float(np.median(np.abs(d - np.median(d)))) * 1.4826 / math.sqrt(2)
    return max(mad, 0.01 * span)


def _grid_starts(x, y, r0, lower, upper, keep: int) -> list[np.ndarray]:
    """Starting points for the local solver: on a grid of (B, log C_mid) the best A is a
    one-variable linear least-squares problem; the `keep` best grid cells are returned."""
    bs = np.geomspace(max(lower[1], 0.2), min(upper[1], 8.0), 7)
    ms = np.linspace(lower[2], upper[2], 15)
    s = _expit(bs[:, None, None] * (x[None, None, :] - ms[None, :, None]))  # (B, M, N)
    gain = (s * (y - r0)).sum(-1) / np.maximum((s * s).sum(-1), 1e-12)  # best A - R0 per cell
    a = np.clip(r0 + gain, lower[0], upper[0])
    cost = (((r0 + (a - r0)[..., None] * s) - y) ** 2).sum(-1)
    best = np.argsort(cost, axis=None)[:keep]
    return [np.array([a.flat[i], bs[i // len(ms)], ms[i % len(ms)]]) for i in best]


# ---------------------------------------------------------------------------------------------
# A run's held-out curves


def curve(history: list[dict], metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(compute, score) of a stage's held-out points: its records with `eval_<metric>` and `flops`,
    one per step (the last record of a step wins)."""
    points = {}
    for row in history:
        value, flops = row.get(f"eval_{metric}"), row.get("flops")
        if _finite(value) and _finite(flops):
            points[row.get("step")] = (float(flops), float(value))
    pairs = sorted(points.values())
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def default_metric(history: list[dict]) -> str | None:
    """The judge's gold score when the stage logged one, else the reward-model score."""
    return next((m for m in SCORES if any(_finite(r.get(f"eval_{m}")) for r in history)), None)


@dataclasses.dataclass
class StageForecast:
    """A stage's held-out curve, the fit on all its points and the forecast from its early part."""

    stage: str
    metric: str
    compute: np.ndarray
    scores: np.ndarray
    fit: Fit  # on every point
    fit_fraction: float
    early: Fit | None  # on the points up to fit_fraction of the final compute
    early_problem: str | None = None  # why there is no early fit

    @property
    def cutoff(self) -> float:
        return self.fit_fraction * float(self.compute[-1])

    @property
    def later(self) -> tuple[np.ndarray, np.ndarray]:
        """The points the early fit did not see."""
        beyond = self.compute > self.cutoff
        return self.compute[beyond], self.scores[beyond]

    def early_errors(self) -> np.ndarray:
        """Early forecast minus measurement at every later point."""
        c, y = self.later
        return np.asarray(self.early.predict(c)) - y if self.early is not None and len(c) else np.array([])

    def notes(self) -> list[str]:
        """When not to trust the numbers, as far as the curve itself tells."""
        out = []
        for label, fit in (("all points", self.fit), (f"first {self.fit_fraction:.0%}", self.early)):
            if fit is not None and not fit.pinned:
                lo, hi = fit.interval("A")
                out.append(f"{self.stage} ({label}): A is not pinned down ({lo:.3g} to {hi:.3g}): the curve has not "
                           f"bent yet; train longer before trusting the asymptote")
        if self.fit.c_mid < self.fit.compute.min():
            out.append(f"{self.stage}: most of the rise came before the first evaluated point, so B and C_mid are "
                       f"barely constrained (A is what the plateau says); evaluate more often early for them")
        peak = int(np.argmax(self.scores)) if self.fit.a >= self.fit.r0 else int(np.argmin(self.scores))
        drop = abs(float(self.scores[peak] - self.scores[-1]))
        if peak < len(self.scores) - 1 and drop > 3 * _noise_scale(self.scores, float(np.ptp(self.scores)) or 1.0):
            out.append(f"{self.stage}: the curve turns back after C = {self.compute[peak]:.3g} (by {drop:.3g}); "
                       f"a sigmoid assumes it does not (over-optimisation of the reward model?)")
        return out


def forecast_stage(name: str, history: list[dict], *, metric: str | None = None, fit_fraction: float = 0.25,
                   n_boot: int = 100, seed: int = 0) -> StageForecast:
    """Fit a stage's held-out curve on all its points and on its first `fit_fraction` of compute."""
    metric = metric or default_metric(history)
    if metric is None:
        raise ForecastError(f"{name}: no held-out points logged; give the stage an eval_dataset (and eval_steps)")
    compute, scores = curve(history, metric)
    if not len(compute):
        raise ForecastError(f"{name}: no held-out eval_{metric} points with compute (flops) logged")
    bounds = METRIC_BOUNDS.get(metric)
    fit = fit_sigmoid(compute, scores, bounds=bounds, n_boot=n_boot, seed=seed, where=name)
    early, problem = None, None
    inside = compute <= fit_fraction * compute[-1]
    try:
        early = fit_sigmoid(compute[inside], scores[inside], bounds=bounds, n_boot=n_boot, seed=seed,
                            where=f"{name} (first {fit_fraction:.0%} of compute)")
    except ForecastError as e:
        problem = str(e)
    return StageForecast(name, metric, compute, scores, fit, fit_fraction, early, problem)


def forecast_run(run_dir, *, stages: list[str] | None = None, metric: str | None = None, fit_fraction: float = 0.25,
                 n_boot: int = 100) -> tuple[list[StageForecast], list[str]]:
    """Forecasts of the run's RL stages (finished or still running) and the reasons for those that
    could not be fitted."""
    from pathlib import Path

    from align.errors import suggest
    from align.stages import TYPES, traits

    if not 0 < fit_fraction <= 1:
        raise AlignError(f"--fit-fraction: must be in (0, 1], got {fit_fraction}")
    run_dir = Path(run_dir)
    recipe = read_recipe(run_dir)
    online = [str(name) for name, block in recipe["stages"].items()
              if (kind := str((block or {}).get("type", name))) in TYPES and traits(kind).online]
    for name in stages or []:
        if name not in online:
            raise AlignError(f"--stage {name}: not an RL stage of this run{suggest(name, online)} "
                             f"(RL stages: {', '.join(online) or 'none'})")
    finished = {name for name, _, _ in finished_stages(run_dir)}
    forecasts, problems = [], []
    for name in stages or online:
        folder = run_dir / name
        if not folder.is_dir():
            problems.append(f"{name}: not run yet")
            continue
        try:
            fc = forecast_stage(name, read_log_history(folder), metric=metric, fit_fraction=fit_fraction,
                                n_boot=n_boot)
        except ForecastError as e:
            problems.append(str(e))
            continue
        if name not in finished:
            problems.append(f"{name}: still running or interrupted; fitted on the points so far")
        forecasts.append(fc)
    return forecasts, problems


# ---------------------------------------------------------------------------------------------
# Tables and the command


def _num(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 1e4 else f"{value:.2e}"


def _with_interval(value: float, interval: tuple[float, float]) -> str:
    return f"{_num(value)} [{_num(interval[0])}, {_num(interval[1])}]"


def markdown(forecasts: list[StageForecast], problems: list[str] = ()) -> str:
    """The comparison table (fit on every point), the early-forecast check, and notes."""
    if not forecasts:
        return "\n".join(problems) + "\n"
    level = f"{LEVEL:.0%}"
    lines = [f"Fit on every held-out point: R(C) = R0 + (A - R0) / (1 + (C_mid / C)^B), C in training FLOPs; "
             f"[{level} bootstrap interval].", "",
             *table(["stage", "metric", "points", "R0", "A", "B", "C_mid", "C to 90% of gain", "final C",
                     "final measured", *[f"at {k}x C" for k in MULTIPLES]],
                    [[f.stage, f.metric, len(f.compute), _num(f.fit.r0), _with_interval(f.fit.a, f.fit.interval("A")),
                      _with_interval(f.fit.b, f.fit.interval("B")), _num(f.fit.c_mid), _num(f.fit.compute_90),
                      _num(f.compute[-1]), _num(f.scores[-1]),
                      *[_with_interval(f.fit.predict(k * f.compute[-1]),
                                       tuple(x[0] for x in f.fit.band(k * f.compute[-1]))) for k in MULTIPLES]]
                     for f in forecasts])]
    rows = []
    for f in forecasts:
        if f.early is None:
            rows.append([f.stage, f"{f.fit_fraction:.0%}", "", "", "", _num(f.scores[-1]), "", f.early_problem])
            continue
        c, _ = f.later
        errors = f.early_errors()
        band = f.early.band(f.compute[-1])
        rows.append([f.stage, f"{f.fit_fraction:.0%}", len(f.early.compute) + 1,
                     _with_interval(f.early.a, f.early.interval("A")),
                     _with_interval(f.early.predict(f.compute[-1]), (band[0][0], band[1][0])), _num(f.scores[-1]),
                     f"{errors[-1]:+.3g}" if len(errors) else "",
                     f"{np.abs(errors).max():.3g} over {len(c)} later points" if len(errors) else "no later points"])
    lines += ["", "Forecast from the first part of each run (points up to that share of its final compute), "
                  "against what the run then measured:", "",
              *table(["stage", "fit on first", "points", "A", "predicted final", "measured final",
                      "error at final", "largest error"], rows)]
    notes = [n for f in forecasts for n in f.notes()] + list(problems)
    if notes:
        lines += ["", *[f"- {n}" for n in notes]]
    return "\n".join(lines) + "\n"


def forecast_command(args):
    forecasts, problems = forecast_run(args.run_dir, stages=args.stage or None, metric=args.metric,
                                       fit_fraction=args.fit_fraction)
    if not forecasts:
        raise ForecastError("; ".join(problems) if problems else f"{args.run_dir}: the run has no RL stages")
    print(markdown(forecasts, problems), end="")
