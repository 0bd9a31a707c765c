"""PPO math as small pure functions.

Everything here is stateless torch code except the two tiny KL-controller classes, so
each piece can be tested by hand and reused by the PPO trainer (and RLOO/GRPO where it
fits).

Conventions
-----------
* ``B`` = batch size, ``T`` = response length (tokens generated after the prompt),
  ``V`` = vocabulary size.
* ``mask`` is a ``(B, T)`` bool (or 0/1 float) tensor marking real response tokens.
  Masks are never inferred from pad ids, because the pad id may equal the EOS id.
* Response masks are prefixes: each row is real tokens followed by padding. ``gae``
  relies on this.
* Values at masked positions may be arbitrary (even ``inf``/``nan``); every function
  ignores them and returns 0 there where it returns per-token tensors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

Tensor = torch.Tensor

__all__ = [
    "AdaptiveKLController",
    "FixedKLController",
    "apply_missing_stop_penalty",
    "entropy_from_logits",
    "gae",
    "kl_per_token",
    "last_token_index",
    "logprobs_from_logits",
    "masked_mean",
    "masked_var",
    "masked_whiten",
    "place_score",
    "policy_loss",
    "response_mask_after_stop",
    "token_rewards",
    "truncate_after_stop",
    "value_loss",
]


# --------------------------------------------------------------------------- masking


def _as_bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over the positions where ``mask`` is true.

    Args:
        x: ``(B, T)`` float (any shape works; ``mask`` must broadcast to it).
        mask: ``(B, T)`` bool or 0/1 float.
        dim: reduce over this dimension only; ``None`` reduces over everything.

    Returns:
        0-dim tensor (``dim=None``) or ``x`` reduced over ``dim``. Where no position is
        real the mean is 0 rather than NaN.
    """
    m = _as_bool(mask)
    # where(), not x * mask: garbage (inf/nan) at masked positions must not leak in.
    total = torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))
    count = m.expand_as(x).to(x.dtype)
    if dim is None:
        return total.sum() / count.sum().clamp_min(1)
    return total.sum(dim) / count.sum(dim).clamp_min(1)


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of ``x`` over the positions where ``mask`` is true.

    Args:
        x: ``(B, T)`` float.
        mask: ``(B, T)`` bool or 0/1 float.
        unbiased: divide by ``n - 1`` (Bessel) instead of ``n``.

    Returns:
        0-dim tensor. With fewer than two real positions (``unbiased``) or none at all,
        returns 0 instead of NaN/inf.
    """
    m = _as_bool(mask)
    mean = masked_mean(x, m)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    sq_dev = torch.where(m, (x - mean) ** 2, zero).sum()
    n = m.expand_as(x).to(x.dtype).sum()
    denom = (n - 1 if unbiased else n).clamp_min(1)
    return sq_dev / denom


def masked_whiten(
    x: Tensor,
    mask: Tensor,
    shift_mean: bool = True,
    all_reduce: Callable[[Tensor], Tensor] | None = None,
    *,
    eps: float = 1e-8,
) -> Tensor:
    """Normalise ``x`` to mean 0 / variance 1 over the real positions.

    Statistics use the unbiased variance. Two-pass (mean first, then squared
    deviations) so it stays accurate when the mean is large relative to the spread.

    Args:
        x: ``(B, T)`` float.
        mask: ``(B, T)`` bool or 0/1 float.
        shift_mean: if False, the original mean is added back (only the scale changes),
            which is how rewards are usually whitened.
        all_reduce: optional callable that sums a 1-D tensor across processes and
            returns the summed tensor (e.g. ``lambda t: accelerator.reduce(t, "sum")``).
            It is called exactly twice, in the same order on every process: first with
            ``[sum(x), count]``, then with ``[sum((x - mean)**2)]``. Local shapes may
            differ between processes. ``None`` uses local statistics only.
        eps: added to the variance before the square root.

    Returns:
        ``(B, T)`` tensor of ``x.dtype``: whitened values at real positions, 0 elsewhere.
    """
    m = _as_bool(mask)
    # Low-precision inputs (bf16) would lose the statistics; float64 stays float64.
    stat_dtype = torch.promote_types(x.dtype, torch.float32)
    xs = x.to(stat_dtype)
    zero = torch.zeros((), dtype=stat_dtype, device=x.device)
    count = m.expand_as(x).to(stat_dtype).sum()

    first = torch.stack([torch.where(m, xs, zero).sum(), count])
    if all_reduce is not None:
        first = all_reduce(first)
    total, n = first[0], first[1]
    mean = total / n.clamp_min(1)

    second = torch.where(m, (xs - mean) ** 2, zero).sum().reshape(1)
    if all_reduce is not None:
        second = all_reduce(second)
    var = second[0] / (n - 1).clamp_min(1)

    out = (xs - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(m, out, zero).to(x.dtype)


# ------------------------------------------------------------------ logits → tokens


def logprobs_from_logits(logits: Tensor, token_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """Log-probabilities of ``token_ids`` under ``softmax(logits / temperature)``.

    The caller aligns the inputs: ``logits[:, t]`` must be the distribution that produced
    ``token_ids[:, t]`` (i.e. logits already shifted by one against the sequence). The
    rollout temperature must be passed again whenever log-probs are recomputed (policy,
    reference, old policy); otherwise the importance ratio and the KL are off.

    Args:
        logits: ``(B, T, V)`` float (bf16 is fine; computed in at least float32).
        token_ids: ``(B, T)`` long.
        temperature: > 0.

    Returns:
        ``(B, T)`` float32 (float64 if ``logits`` is float64). Differentiable.
    """
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if logits.shape[:-1] != token_ids.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match token_ids {tuple(token_ids.shape)}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = []
    # Row by row: a full (B, T, V) float32 copy is the peak-memory spike of the PPO step.
    for row_logits, row_ids in zip(logits, token_ids):
        row = row_logits.to(dtype)
        if temperature != 1.0:
            row = row / temperature
        picked = row.gather(-1, row_ids.long().unsqueeze(-1)).squeeze(-1)
        rows.append(picked - torch.logsumexp(row, dim=-1))
    if not rows:
        return logits.new_zeros(token_ids.shape, dtype=dtype)
    return torch.stack(rows)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` at every position (divide by the temperature first
    if the sampling distribution is wanted).

    Args:
        logits: ``(B, T, V)`` float.

    Returns:
        ``(B, T)`` float32 (float64 if ``logits`` is float64), in nats.
    """
    dtype = torch.promote_types(logits.dtype, torch.float32)
    rows = []
    for row_logits in logits:  # row by row for the same memory reason as above
        row = row_logits.to(dtype)
        # Shift by the max: H is shift-invariant, and the two terms below cancel badly
        # when logits carry a large common offset.
        row = row - row.amax(dim=-1, keepdim=True).detach().nan_to_num(neginf=0.0)
        # H = logsumexp(l) - sum_v p_v * l_v  (no log(0) even for -inf logits once p_v=0)
        p = torch.softmax(row, dim=-1)
        rows.append(torch.logsumexp(row, dim=-1) - (p * row.nan_to_num(neginf=0.0)).sum(-1))
    if not rows:
        return logits.new_zeros(logits.shape[:-1], dtype=dtype)
    return torch.stack(rows)


def kl_per_token(logprobs: Tensor, ref_logprobs: Tensor, estimator: str = "k1") -> Tensor:
    """Per-token estimate of KL(policy || reference) from sampled tokens.

    * ``"k1"``: ``logp - logp_ref``. Unbiased, can be negative per token.
    * ``"k3"``: ``(r - 1) - log r`` with ``r = exp(logp_ref - logp)`` (Schulman,
      "Approximating KL divergence"). Unbiased and never negative.

    Args:
        logprobs: ``(B, T)`` float, log-probs of the sampled tokens under the policy.
        ref_logprobs: ``(B, T)`` float, the same tokens under the reference model.
        estimator: ``"k1"`` or ``"k3"``.

    Returns:
        ``(B, T)`` float. Masked positions are not zeroed here (no mask is taken).
    """
    if estimator == "k1":
        return logprobs - ref_logprobs
    if estimator == "k3":
        d = ref_logprobs - logprobs
        # expm1(d) - d == (e^d - 1) - d, accurate near d = 0; clamp only removes rounding.
        return (torch.expm1(d) - d).clamp_min(0)
    raise ValueError(f"unknown KL estimator {estimator!r}; expected 'k1' or 'k3'")


# ------------------------------------------------------------------ stop tokens, scores


def response_mask_after_stop(
    response_ids: Tensor,
    stop_token_ids: int | Sequence[int] | Tensor,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Mask out everything after the first stop token of each response.

    Args:
        response_ids: ``(B, T)`` long, generated tokens (prompt excluded).
        stop_token_ids: one id or several (e.g. EOS and an end-of-turn token).
        mask: optional ``(B, T)`` bool of positions the generator actually produced
            (for right-padded variable-length generations). Stop ids outside it are
            ignored. ``None`` means every position was generated.

    Returns:
        ``(mask, has_stop)``: ``mask`` is ``(B, T)`` bool, true up to and *including* the
        first stop token; ``has_stop`` is ``(B,)`` bool, whether a stop token was produced.
    """
    valid = torch.ones_like(response_ids, dtype=torch.bool) if mask is None else _as_bool(mask)
    stops = torch.as_tensor(stop_token_ids, dtype=response_ids.dtype, device=response_ids.device).reshape(-1)
    is_stop = torch.isin(response_ids, stops) & valid
    # Stops strictly before position t; the stop token itself stays real.
    stops_before = is_stop.long().cumsum(dim=1) - is_stop.long()
    out = valid & (stops_before == 0)
    return out, is_stop.any(dim=1)


def truncate_after_stop(response_ids: Tensor, mask: Tensor, pad_id: int) -> Tensor:
    """Replace masked positions with ``pad_id`` (so a reward model never sees text after
    the stop token).

    Args:
        response_ids: ``(B, T)`` long.
        mask: ``(B, T)`` bool, e.g. from ``response_mask_after_stop``.
        pad_id: id written at masked positions.

    Returns:
        ``(B, T)`` long, a new tensor.
    """
    return torch.where(_as_bool(mask), response_ids, torch.full_like(response_ids, pad_id))


def last_token_index(mask: Tensor) -> Tensor:
    """Index of the last real token of each row.

    Args:
        mask: ``(B, T)`` bool or 0/1 float.

    Returns:
        ``(B,)`` long. A row with no real token returns 0 (check ``mask.any(1)`` if that
        case matters; ``place_score`` does).
    """
    m = _as_bool(mask)
    if m.shape[1] == 0:
        return torch.zeros(m.shape[0], dtype=torch.long, device=m.device)
    # 1-based positions so that "no real token" (all zeros) maps to -1, then to 0.
    positions = torch.arange(1, m.shape[1] + 1, device=m.device).expand_as(m)
    return (torch.where(m, positions, 0).amax(dim=1) - 1).clamp_min(0)


def place_score(scores: Tensor, mask: Tensor) -> Tensor:
    """Put each sequence-level score on its last real token.

    The position comes from ``mask``, never from pad ids: with ``pad_id == eos_id`` the
    "last non-pad token" would be the wrong one (cf. TRL issue #3750).

    Args:
        scores: ``(B,)`` float.
        mask: ``(B, T)`` bool or 0/1 float.

    Returns:
        ``(B, T)`` of ``scores.dtype``: zeros except the score at the last real token.
        A row with no real token stays all zeros.
    """
    m = _as_bool(mask)
    out = torch.zeros(m.shape, dtype=scores.dtype, device=scores.device)
    idx = last_token_index(m).unsqueeze(1)
    # Rows without a real token get nothing instead of a reward on a padded position.
    vals = torch.where(m.any(dim=1), scores, torch.zeros_like(scores)).unsqueeze(1)
    return out.scatter(1, idx, vals)


def token_rewards(
    scores: Tensor,
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kl_coef: float | Tensor,
    estimator: str = "k1",
) -> tuple[Tensor, Tensor]:
    """Per-token PPO rewards: a KL penalty on every real token plus the score at the end.

    ``rewards[b, t] = -kl_coef * kl[b, t] + (score[b] if t is the last real token)``.

    Args:
        scores: ``(B,)`` float, reward-model scores (after any missing-stop penalty).
        logprobs: ``(B, T)`` float, rollout policy log-probs.
        ref_logprobs: ``(B, T)`` float, reference-model log-probs.
        mask: ``(B, T)`` bool or 0/1 float.
        kl_coef: KL penalty coefficient (e.g. ``controller.value``).
        estimator: ``"k1"`` or ``"k3"``, see ``kl_per_token``.

    Returns:
        ``(rewards, kl)``, both ``(B, T)`` float and 0 at masked positions.
    """
    m = _as_bool(mask)
    raw = kl_per_token(logprobs, ref_logprobs, estimator)
    kl = torch.where(m, raw, torch.zeros((), dtype=raw.dtype, device=raw.device))
    rewards = -kl_coef * kl + place_score(scores.to(kl.dtype), m)
    return rewards, kl


def apply_missing_stop_penalty(scores: Tensor, has_stop: Tensor, penalty: float | None) -> Tensor:
    """Subtract ``penalty`` (positive, e.g. ``1.0``: TRL's ``missing_eos_penalty``) from the
    score of responses that never produced a stop token (they hit the length limit).

    Args:
        scores: ``(B,)`` float.
        has_stop: ``(B,)`` bool, from ``response_mask_after_stop``.
        penalty: amount subtracted; ``None`` returns ``scores`` unchanged.

    Returns:
        ``(B,)`` float, a new tensor (``scores`` is not modified).
    """
    if penalty is None:
        return scores
    return torch.where(_as_bool(has_stop), scores, scores - penalty)


# ------------------------------------------------------------------- advantages, losses


def gae(
    rewards: Tensor,
    values: Tensor,
    mask: Tensor,
    gamma: float,
    lam: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    ``delta_t = r_t + gamma * V_{t+1} - V_t`` and ``A_t = delta_t + gamma*lam*A_{t+1}``,
    where ``V_{t+1}`` and ``A_{t+1}`` are 0 past the last real token (the episode ends
    there, so there is nothing to bootstrap from). Inputs are detached: advantages and
    returns are targets, not part of the graph.

    Args:
        rewards: ``(B, T)`` float, e.g. from ``token_rewards``.
        values: ``(B, T)`` float, critic values at rollout time.
        mask: ``(B, T)`` bool or 0/1 float; each row a prefix of real tokens.
        gamma: discount.
        lam: GAE lambda.

    Returns:
        ``(advantages, returns)``, both ``(B, T)``; ``returns = advantages + values`` at
        real positions. Both are 0 at masked positions.
    """
    m = _as_bool(mask)
    dtype = torch.promote_types(rewards.dtype, values.dtype)
    zero = torch.zeros((), dtype=dtype, device=rewards.device)
    r = torch.where(m, rewards.detach().to(dtype), zero)
    v = torch.where(m, values.detach().to(dtype), zero)
    T = r.shape[1]
    adv = torch.zeros_like(r)
    next_value = r.new_zeros(r.shape[0])
    next_adv = r.new_zeros(r.shape[0])
    for t in reversed(range(T)):
        delta = r[:, t] + gamma * next_value - v[:, t]
        a_t = torch.where(m[:, t], delta + gamma * lam * next_adv, zero)
        adv[:, t] = a_t
        # A masked position passes zeros backwards, so the last real token never bootstraps.
        next_value, next_adv = v[:, t], a_t
    returns = torch.where(m, adv + v, zero)
    return adv, returns


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate loss, averaged over real tokens.

    ``loss = masked_mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))`` with
    ``ratio = exp(logp - logp_old)``.

    Args:
        logprobs: ``(B, T)`` float, current policy (with grad).
        old_logprobs: ``(B, T)`` float, rollout policy (no grad).
        advantages: ``(B, T)`` float, usually whitened.
        mask: ``(B, T)`` bool or 0/1 float.
        clip_range: ``eps``.

    Returns:
        ``(loss, stats)``: ``loss`` is a 0-dim tensor; ``stats`` holds detached 0-dim
        tensors ``clipfrac`` (fraction of tokens where the clipped term is the active one,
        i.e. whose gradient is cut), ``approx_kl`` (``mean(0.5 * (logp - logp_old)**2)``,
        the "k2" estimator of KL(old || new)) and ``ratio_mean``.
    """
    m = _as_bool(mask)
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Zero the log-ratio at padding before exp(): garbage there would give inf, and
    # inf * 0 in the backward pass is NaN.
    log_ratio = torch.where(m, logprobs - old_logprobs.detach(), zero)
    ratio = torch.exp(log_ratio)
    adv = advantages.detach()
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), m)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).to(ratio.dtype), m),
            "approx_kl": masked_mean(0.5 * log_ratio**2, m),
            "ratio_mean": masked_mean(ratio, m),
        }
    return loss, stats


def value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range_value: float | None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss: ``0.5 * masked_mean(max((v - R)**2, (v_clip - R)**2))`` with
    ``v_clip = v_old + clip(v - v_old, -c, c)``.

    Args:
        values: ``(B, T)`` float, current critic (with grad).
        old_values: ``(B, T)`` float, critic at rollout time.
        returns: ``(B, T)`` float, from ``gae``.
        mask: ``(B, T)`` bool or 0/1 float.
        clip_range_value: ``c``; ``None`` disables clipping (plain 0.5 * MSE).

    Returns:
        ``(loss, stats)``: ``loss`` is a 0-dim tensor; ``stats["vf_clipfrac"]`` is the
        detached fraction of tokens where the clipped term is the active one.
    """
    m = _as_bool(mask)
    target = returns.detach()
    err_unclipped = (values - target) ** 2
    if clip_range_value is None:
        loss = 0.5 * masked_mean(err_unclipped, m)
        return loss, {"vf_clipfrac": torch.zeros((), dtype=loss.dtype, device=loss.device)}
    old = old_values.detach()
    v_clipped = old + torch.clamp(values - old, -clip_range_value, clip_range_value)
    err_clipped = (v_clipped - target) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err_unclipped, err_clipped), m)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((err_clipped > err_unclipped).to(values.dtype), m)}
    return loss, stats


# -------------------------------------------------------------------- KL controllers


class FixedKLController:
    """Constant KL coefficient. ``update`` does nothing."""

    def __init__(self, kl_coef: float):
        if kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """No-op (same signature as ``AdaptiveKLController.update``)."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient of Ziegler et al. 2019 ("Fine-Tuning Language Models from
    Human Preferences"), steering the observed KL towards ``target``.

    ``err = clip(current_kl / target - 1, -0.2, 0.2)``;
    ``value *= 1 + err * n_steps / horizon``.

    ``current_kl`` is whatever KL the trainer reports, conventionally the batch mean of
    per-sequence summed KL (nats), and ``target`` must be in the same units.
    ``state_dict`` holds only the current ``value``; ``target``/``horizon`` come from the
    config on resume.
    """

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if init_kl_coef < 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if not target > 0 or not horizon > 0:
            raise ValueError(f"target and horizon must be > 0, got {target}, {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float | Tensor, n_steps: int) -> None:
        """Adjust ``value`` after ``n_steps`` samples (or steps) that produced ``current_kl``."""
        current = float(current_kl)
        if not math.isfinite(current):
            raise ValueError(f"current_kl must be finite, got {current}")
        err = min(max(current / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])
