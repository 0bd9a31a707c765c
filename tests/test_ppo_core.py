"""Hand-checked tests for align.ppo.core (pure PPO math)."""

import math
import threading

import pytest
import torch

from align.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    apply_missing_stop_penalty,
    entropy_from_logits,
    gae,
    kl_per_token,
    last_token_index,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    place_score,
    policy_loss,
    response_mask_after_stop,
    token_rewards,
    truncate_after_stop,
    value_loss,
)

T_ = torch.tensor
B_ = lambda rows: torch.tensor(rows, dtype=torch.bool)  # noqa: E731


def close(a, b, atol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), atol=atol, rtol=0)


# ------------------------------------------------------------------ masked statistics


def test_masked_mean_and_var_by_hand():
    x = T_([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = B_([[1, 1, 0], [1, 0, 0]])
    # real entries 1, 2, 4 -> mean 7/3
    close(masked_mean(x, mask), 7 / 3)
    close(masked_mean(x, mask, dim=1), [1.5, 4.0])
    # squared deviations: (4/3)^2 + (1/3)^2 + (5/3)^2 = 42/9 = 14/3
    close(masked_var(x, mask), (14 / 3) / 2)  # unbiased: / (n - 1)
    close(masked_var(x, mask, unbiased=False), (14 / 3) / 3)
    # float 0/1 masks behave like bool masks
    close(masked_mean(x, mask.float()), 7 / 3)


def test_masked_mean_ignores_garbage_and_empty_rows():
    x = T_([[1.0, float("inf")], [float("nan"), 0.0]])
    mask = B_([[1, 0], [0, 0]])
    close(masked_mean(x, mask), 1.0)
    close(masked_mean(x, mask, dim=1), [1.0, 0.0])  # empty row -> 0, not NaN
    close(masked_var(x, mask), 0.0)  # a single real entry -> 0, not NaN


def test_whiten_mean0_var1_and_ignores_masked():
    x = T_([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -7.0, 1e6]])
    mask = B_([[1, 1, 1, 0], [1, 1, 0, 0]])
    w = masked_whiten(x, mask)
    # real entries 1..5: mean 3, unbiased var (4+1+0+1+4)/4 = 2.5
    s = math.sqrt(2.5)
    close(w, [[-2 / s, -1 / s, 0.0, 0.0], [1 / s, 2 / s, 0.0, 0.0]], atol=1e-5)
    close(masked_mean(w, mask), 0.0)
    close(masked_var(w, mask), 1.0, atol=1e-5)
    # changing masked entries changes nothing
    x2 = x.clone()
    x2[~mask] = T_([-3.0, 42.0, float("nan")])
    close(masked_whiten(x2, mask), w)
    # shift_mean=False keeps the mean, only rescales
    close(masked_whiten(x, mask, shift_mean=False), torch.where(mask, w + 3.0, 0.0), atol=1e-5)


def test_whiten_bf16_input_keeps_dtype():
    x = T_([[1.0, 2.0, 3.0, 4.0]], dtype=torch.bfloat16)
    w = masked_whiten(x, torch.ones(1, 4, dtype=torch.bool))
    assert w.dtype == torch.bfloat16
    close(w.float(), masked_whiten(x.float(), torch.ones(1, 4, dtype=torch.bool)), atol=2e-2)


class _TwoProcessSum:
    """Two 'processes' (threads) whose all_reduce returns own + other shard's tensor."""

    def __init__(self):
        self.barrier = threading.Barrier(2, timeout=5)
        self.slots = [None, None]
        self.calls = [0, 0]

    def for_rank(self, rank):
        def all_reduce(t):
            self.calls[rank] += 1
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = self.slots[rank] + self.slots[1 - rank]
            self.barrier.wait()  # nobody overwrites a slot before both have read it
            return total

        return all_reduce


def test_whiten_all_reduce_matches_concatenated_shards():
    # Shards have different shapes, as they may on different processes.
    xa = T_([[1.0, 2.0, 9.0], [3.0, -1.0, 8.0]])
    ma = B_([[1, 1, 0], [1, 1, 1]])
    xb = T_([[10.0, 0.5, 7.0, 123.0]])
    mb = B_([[1, 1, 1, 0]])

    # Reference: whiten the real entries of both shards together in one tensor.
    flat = torch.cat([xa[ma], xb[mb]]).unsqueeze(0)
    ref = masked_whiten(flat, torch.ones_like(flat, dtype=torch.bool))[0]
    n_a = int(ma.sum())
    ref_a, ref_b = ref[:n_a], ref[n_a:]

    comm = _TwoProcessSum()
    results = {}

    def run(rank, x, m):
        results[rank] = masked_whiten(x, m, all_reduce=comm.for_rank(rank))

    thread = threading.Thread(target=run, args=(1, xb, mb))
    thread.start()
    run(0, xa, ma)
    thread.join(timeout=10)

    close(results[0][ma], ref_a, atol=1e-5)
    close(results[1][mb], ref_b, atol=1e-5)
    assert (results[0][~ma] == 0).all() and (results[1][~mb] == 0).all()
    # Local stats differ, so the all_reduce path really used the other shard.
    assert not torch.allclose(masked_whiten(xa, ma)[ma], ref_a, atol=1e-3)
    # An identity all_reduce (single process) equals the local path.
    close(masked_whiten(xa, ma, all_reduce=lambda t: t), masked_whiten(xa, ma))


# --------------------------------------------------------------------- logits helpers


def test_logprobs_from_logits_by_hand_with_temperature():
    ln3 = math.log(3.0)
    logits = T_([[[0.0, ln3], [0.0, ln3]]])  # p = [1/4, 3/4] at both positions
    ids = T_([[1, 0]])
    close(logprobs_from_logits(logits, ids), [[math.log(3 / 4), math.log(1 / 4)]])
    # T=2: logits [0, ln3 / 2] -> p = [1, sqrt3] / (1 + sqrt3)
    s3 = math.sqrt(3.0)
    close(logprobs_from_logits(logits, ids, temperature=2.0), [[math.log(s3 / (1 + s3)), math.log(1 / (1 + s3))]])
    with pytest.raises(ValueError):
        logprobs_from_logits(logits, ids, temperature=0.0)


def test_logprobs_from_logits_bf16_and_grad():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 11, generator=g)
    ids = torch.randint(0, 11, (2, 3), generator=g)
    ref = torch.log_softmax(logits / 0.7, -1).gather(-1, ids[..., None])[..., 0]
    close(logprobs_from_logits(logits, ids, 0.7), ref, atol=1e-5)
    out = logprobs_from_logits(logits.bfloat16(), ids, 0.7)
    assert out.dtype == torch.float32
    close(out, ref, atol=5e-2)
    leaf = logits.clone().requires_grad_()
    logprobs_from_logits(leaf, ids).sum().backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all()


def test_entropy_from_logits_by_hand():
    ln3 = math.log(3.0)
    logits = T_([[[0.0, 0.0, 0.0, 0.0], [0.0, ln3, float("-inf"), float("-inf")]]])
    # uniform over 4 -> ln 4;  p = [1/4, 3/4] -> ln4 - (3/4) ln3
    close(entropy_from_logits(logits), [[math.log(4.0), math.log(4.0) - 0.75 * ln3]])
    # a large common offset changes nothing (entropy is shift-invariant)
    close(entropy_from_logits(torch.full((1, 1, 4), -1e9)), [[math.log(4.0)]])


# --------------------------------------------------------------------------------- KL


def test_kl_k1_k3_by_hand():
    logp = T_([[math.log(0.5), math.log(0.25), math.log(0.3)]])
    ref = T_([[math.log(0.25), math.log(0.5), math.log(0.3)]])
    ln2 = math.log(2.0)
    close(kl_per_token(logp, ref, "k1"), [[ln2, -ln2, 0.0]])
    # r = exp(ref - logp) = 0.5 -> -0.5 + ln2;  r = 2 -> 1 - ln2;  r = 1 -> 0
    close(kl_per_token(logp, ref, "k3"), [[-0.5 + ln2, 1 - ln2, 0.0]])
    close(kl_per_token(logp, ref), kl_per_token(logp, ref, "k1"))
    with pytest.raises(ValueError):
        kl_per_token(logp, ref, "k2")


def test_k3_nonnegative():
    g = torch.Generator().manual_seed(1)
    logp = torch.randn(64, 33, generator=g) * 3
    ref = logp + torch.randn(64, 33, generator=g) * torch.logspace(-6, 0, 33)
    assert (kl_per_token(logp, ref, "k3") >= 0).all()


# ------------------------------------------------------------- stop tokens and scores


def test_response_mask_after_stop_first_middle_never():
    eos = 2
    ids = T_([[2, 5, 6, 7], [5, 2, 6, 2], [5, 6, 7, 8]])
    mask, has_stop = response_mask_after_stop(ids, eos)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert has_stop.tolist() == [True, True, False]
    # several stop ids: the first of any of them stops
    mask, has_stop = response_mask_after_stop(T_([[5, 9, 2, 1]]), [2, 9])
    assert mask.tolist() == [[1, 1, 0, 0]] and has_stop.tolist() == [True]
    # a generation mask: stop ids outside it do not count
    mask, has_stop = response_mask_after_stop(T_([[5, 6, 2, 2]]), eos, mask=B_([[1, 1, 0, 0]]))
    assert mask.tolist() == [[1, 1, 0, 0]] and has_stop.tolist() == [False]


def test_truncate_after_stop():
    ids = T_([[5, 2, 6, 7], [2, 8, 8, 8]])
    mask, _ = response_mask_after_stop(ids, 2)
    out = truncate_after_stop(ids, mask, pad_id=0)
    assert out.tolist() == [[5, 2, 0, 0], [2, 0, 0, 0]]
    assert ids.tolist() == [[5, 2, 6, 7], [2, 8, 8, 8]]  # input untouched


def test_last_token_index():
    mask = B_([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [1, 3, 0, 0]  # empty row -> 0 by convention


def test_place_score_uses_mask_not_pad_when_pad_equals_eos():
    eos = pad = 2
    ids = T_([[5, 6, 7, eos], [5, eos, pad, pad]])  # row 1 padded with pad == eos after EOS
    mask, has_stop = response_mask_after_stop(ids, eos)
    assert has_stop.tolist() == [True, True]
    placed = place_score(T_([0.7, -0.3]), mask)
    close(placed, [[0.0, 0.0, 0.0, 0.7], [0.0, -0.3, 0.0, 0.0]])
    # a row with no real token gets no score at all
    close(place_score(T_([1.0]), B_([[0, 0, 0]])), [[0.0, 0.0, 0.0]])


def test_token_rewards_by_hand():
    logp = T_([[-1.0, -2.0, -3.0]])
    ref = T_([[-1.5, -1.0, 0.0]])
    mask = B_([[1, 1, 0]])
    rewards, kl = token_rewards(T_([2.0]), logp, ref, mask, kl_coef=0.1)
    # k1 = [0.5, -1.0, (masked)]; rewards = [-0.1*0.5, -0.1*(-1.0) + 2.0, 0]
    close(kl, [[0.5, -1.0, 0.0]])
    close(rewards, [[-0.05, 2.1, 0.0]])
    # k3 at t0: r = exp(-0.5): (e^-0.5 - 1) + 0.5
    rewards3, kl3 = token_rewards(T_([2.0]), logp, ref, mask, kl_coef=0.1, estimator="k3")
    k3_0 = math.exp(-0.5) - 1 + 0.5
    k3_1 = math.exp(1.0) - 1 - 1.0
    close(kl3, [[k3_0, k3_1, 0.0]])
    close(rewards3, [[-0.1 * k3_0, -0.1 * k3_1 + 2.0, 0.0]])


def test_apply_missing_stop_penalty():
    """TRL's convention: a positive penalty is subtracted from responses that never stop."""
    scores = T_([1.0, 2.0])
    has_stop = B_([1, 0])
    close(apply_missing_stop_penalty(scores, has_stop, 1.0), [1.0, 1.0])
    assert apply_missing_stop_penalty(scores, has_stop, None) is scores
    close(scores, [1.0, 2.0])  # not modified in place


# -------------------------------------------------------------------------------- GAE


def test_gae_by_hand_1x3():
    # gamma = 0.9, lam = 0.8 (gamma*lam = 0.72), r = [0, 0, 1], V = [0.5, 0.4, 0.3]
    # delta2 = 1 - 0.3                 =  0.7    (no bootstrap after the last token)
    # delta1 = 0 + 0.9*0.3 - 0.4       = -0.13
    # delta0 = 0 + 0.9*0.4 - 0.5       = -0.14
    # A2 = 0.7
    # A1 = -0.13 + 0.72*0.7            =  0.374
    # A0 = -0.14 + 0.72*0.374          =  0.12928
    # R  = A + V                       = [0.62928, 0.774, 1.0]
    rewards = T_([[0.0, 0.0, 1.0]])
    values = T_([[0.5, 0.4, 0.3]])
    adv, ret = gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=0.9, lam=0.8)
    close(adv, [[0.12928, 0.374, 0.7]])
    close(ret, [[0.62928, 0.774, 1.0]])
    # Same row with a padded 4th position holding garbage: bootstrapping stops at t=2.
    adv_p, ret_p = gae(T_([[0.0, 0.0, 1.0, 5.0]]), T_([[0.5, 0.4, 0.3, 9.0]]), B_([[1, 1, 1, 0]]), 0.9, 0.8)
    close(adv_p, [[0.12928, 0.374, 0.7, 0.0]])
    close(ret_p, [[0.62928, 0.774, 1.0, 0.0]])


def test_gae_lambda1_gamma1_zero_values_is_reward_to_go():
    g = torch.Generator().manual_seed(2)
    rewards = torch.randn(3, 6, generator=g)
    mask = B_([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]])
    adv, ret = gae(rewards, torch.zeros(3, 6), mask, gamma=1.0, lam=1.0)
    masked_r = torch.where(mask, rewards, 0.0)
    to_go = masked_r.flip(1).cumsum(1).flip(1)
    close(adv, torch.where(mask, to_go, 0.0), atol=1e-5)
    close(ret, adv)
    # and one by hand: r = [1, 2, 3 | pad] -> [6, 5, 3, 0]
    adv, _ = gae(T_([[1.0, 2.0, 3.0, 4.0]]), torch.zeros(1, 4), B_([[1, 1, 1, 0]]), 1.0, 1.0)
    close(adv, [[6.0, 5.0, 3.0, 0.0]])


def test_constant_score_with_learned_critic_gives_zero_advantage():
    # Sequences of different lengths, pad == eos, a constant score per sequence, no KL
    # term. If the critic already predicts the discounted return exactly (V = R), every
    # TD error is 0, so advantages are 0 for any gamma/lambda: nothing left to learn.
    eos = pad = 2
    ids = T_([[5, 6, 7, eos, pad], [5, eos, pad, pad, pad], [5, 6, 7, 8, 9]])
    mask, _ = response_mask_after_stop(ids, eos)
    scores = T_([1.5, 1.5, 1.5])
    logp = torch.randn(3, 5, generator=torch.Generator().manual_seed(3))
    rewards, _ = token_rewards(scores, logp, logp + 0.3, mask, kl_coef=0.0)
    gamma, lam = 0.95, 0.9
    _, returns = gae(rewards, torch.zeros(3, 5), mask, gamma, 1.0)  # discounted returns
    # returns on row 1 (2 real tokens) by hand: [0.95 * 1.5, 1.5]
    close(returns[1], [1.425, 1.5, 0.0, 0.0, 0.0])
    adv, ret = gae(rewards, returns, mask, gamma, lam)
    close(adv, torch.zeros(3, 5), atol=1e-6)
    close(ret, returns, atol=1e-6)
    # Whereas a critic that knows nothing (V = 0) sees clearly positive advantages.
    adv0, _ = gae(rewards, torch.zeros(3, 5), mask, gamma, lam)
    assert (adv0[mask] > 0.5).all()


# ------------------------------------------------------------------------ PPO losses


def test_policy_loss_on_policy_ratio_exactly_one():
    logp = T_([[-1.0, -2.0, -3.0]], requires_grad=True)
    adv = T_([[1.0, -2.0, 100.0]])
    mask = B_([[1, 1, 0]])
    loss, stats = policy_loss(logp, logp.detach().clone(), adv, mask, clip_range=0.2)
    assert stats["ratio_mean"].item() == 1.0
    assert stats["clipfrac"].item() == 0.0
    assert stats["approx_kl"].item() == 0.0
    close(loss, -(1.0 - 2.0) / 2)  # -masked_mean(A) = 0.5
    loss.backward()
    close(logp.grad, [[-0.5, 1.0, 0.0]])  # d/dlogp of -A*ratio/2 at ratio 1


def test_policy_loss_clipping_by_hand():
    eps = 0.2
    # token: A   ratio  unclipped -A*r   clipped -A*clip(r)  max (loss term)  clipped active?
    #   0   +1   1.5     -1.5             -1.2                -1.2             yes
    #   1   -1   0.5      0.5              0.8                 0.8             yes
    #   2   +1   0.5     -0.5             -0.8                -0.5             no (pessimistic)
    #   3   -1   1.5      1.5              1.2                 1.5             no
    # loss = (-1.2 + 0.8 - 0.5 + 1.5) / 4 = 0.15, clipfrac = 2/4
    ratio = T_([[1.5, 0.5, 0.5, 1.5, 7.0]])
    old = T_([[-1.0, -1.0, -2.0, -2.0, -1.0]])
    logp = (old + ratio.log()).requires_grad_()
    # 5th position is padding with a huge log-ratio: must not affect anything
    logp_in = torch.cat([logp[:, :4], T_([[1000.0]])], dim=1)
    adv = T_([[1.0, -1.0, 1.0, -1.0, 1.0]])
    mask = B_([[1, 1, 1, 1, 0]])
    loss, stats = policy_loss(logp_in, old, adv, mask, clip_range=eps)
    close(loss, 0.15)
    close(stats["clipfrac"], 0.5)
    close(stats["ratio_mean"], 1.0)
    ln15, ln05 = math.log(1.5), math.log(0.5)
    close(stats["approx_kl"], 0.5 * (2 * ln15**2 + 2 * ln05**2) / 4)
    loss.backward()
    # clipped tokens get no gradient; others: -A * ratio / 4
    close(logp.grad, [[0.0, 0.0, -0.125, 0.375, 0.0]])
    assert torch.isfinite(logp.grad).all()


def test_value_loss_clipping_by_hand():
    c = 0.2
    # token: v_old  v     R     (v-R)^2   v_clip  (v_clip-R)^2   max    clipped active?
    #   0     0    0.5    1.0    0.25      0.2     0.64          0.64   yes
    #   1     0    0.1    1.0    0.81      0.1     0.81          0.81   no (equal)
    #   2     0   -0.5   -1.0    0.25     -0.2     0.64          0.64   yes
    #   3     0    0.5    0.3    0.04      0.2     0.01          0.04   no
    # loss = 0.5 * (0.64 + 0.81 + 0.64 + 0.04) / 4 = 0.26625, vf_clipfrac = 0.5
    values = T_([[0.5, 0.1, -0.5, 0.5, 50.0]], requires_grad=True)
    old = torch.zeros(1, 5)
    returns = T_([[1.0, 1.0, -1.0, 0.3, 0.0]])
    mask = B_([[1, 1, 1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip_range_value=c)
    close(loss, 0.26625)
    close(stats["vf_clipfrac"], 0.5)
    loss.backward()
    # d/dv 0.5*(v-R)^2/4 = (v-R)/4 on unclipped tokens; 0 where the clipped term wins
    close(values.grad, [[0.0, -0.9 / 4, 0.0, 0.2 / 4, 0.0]])
    # no clipping: plain 0.5 * MSE = 0.5 * (0.25 + 0.81 + 0.25 + 0.04) / 4
    loss_nc, stats_nc = value_loss(values, old, returns, mask, clip_range_value=None)
    close(loss_nc, 0.5 * 1.35 / 4)
    close(stats_nc["vf_clipfrac"], 0.0)


# ------------------------------------------------------------------- KL controllers


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 512)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    # KL 9: err = 9/6 - 1 = 0.5 -> clipped to 0.2; coef *= 1 + 0.2*256/10000 = 1.00512
    ctl.update(9.0, n_steps=256)
    close(ctl.value, 0.1 * 1.00512, atol=1e-12)
    # KL 6.6: err = 0.1 (inside the clip); coef *= 1 + 0.1*256/10000 = 1.00256
    ctl.update(torch.tensor(6.6, dtype=torch.float64), n_steps=256)  # tensors accepted
    close(ctl.value, 0.1 * 1.00512 * 1.00256, atol=1e-12)
    # KL 0: err = -1 -> clipped to -0.2; coef *= 1 - 0.2*1000/10000 = 0.98
    ctl.update(0.0, n_steps=1000)
    close(ctl.value, 0.1 * 1.00512 * 1.00256 * 0.98, atol=1e-12)
    # KL on target: unchanged
    before = ctl.value
    ctl.update(6.0, n_steps=256)
    close(ctl.value, before, atol=1e-15)
    # checkpoint round trip
    restored = AdaptiveKLController(init_kl_coef=0.1, target=6.0, horizon=10000)
    restored.load_state_dict(ctl.state_dict())
    assert restored.value == ctl.value
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10000)
