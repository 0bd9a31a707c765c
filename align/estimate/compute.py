"""Compute: FLOPs (Kaplan et al. 2020 / Hoffmann et al. 2022) and the rate a device runs them at.

FLOPs: 2·N per token for a forward pass, 6·N for forward + backward; attention-score FLOPs are
ignored. On a GPU the rate is its datasheet peak times an assumed utilisation (MFU). On a CPU it
is measured: :func:`matmul_rate` times the model's own linear-layer matmuls in this process, with
its thread setting, so the estimate follows the machine rather than a constant.
"""

from __future__ import annotations

import math
import time

from align.estimate.params import PlanError, structure

#: Dense (no sparsity) bf16 tensor-core peak FLOP/s from NVIDIA datasheets, SXM parts.
PEAK_FLOPS: dict[str, float] = {"a100": 312e12, "h100": 989e12, "h200": 989e12}
#: Model FLOPs utilisation assumed on a GPU (well-tuned training reaches 0.3-0.5).
GPU_MFU = 0.4


def flops(n_params: float, tokens: float, *, per_param_token: float = 6.0) -> float:
    """Training compute ``C ≈ 6·N·D``: 2·N per token forward, 4·N backward.

    Use ``per_param_token=2`` for a forward pass only. For LoRA the backward skips the frozen
    weights' gradients, ≈ 4·N per token.
    """
    return per_param_token * n_params * tokens


def ppo_flops(n_params: float, *, episodes: int, prompt_len: int, response_len: int, ppo_epochs: int = 1,
              n_reference: float | None = None, n_reward: float | None = None, n_critic: float | None = None,
              train_per_param_token: float = 6.0, reuse_rollout_pass: bool = True) -> dict[str, float]:
    """FLOPs of PPO over ``episodes`` sequences of ``prompt_len + response_len`` tokens.

    With S = prompt_len + response_len and the role sizes defaulting to ``n_params``:

    * generation: the policy prefills the prompt and decodes each response token, 2·N per token:
      ``2·N_policy·S·episodes``;
    * scoring: reference and reward forwards over the full sequence, plus the policy's and the
      critic's (old log-probs and values) unless ``reuse_rollout_pass`` (one minibatch of one
      micro-batch: the first optimizer step reuses that pass, see align.ppo.trainer):
      ``2·(N_ref + N_reward [+ N_policy + N_critic])·S·episodes``;
    * training: policy and critic forward + backward for every PPO epoch:
      ``6·(N_policy + N_critic)·S·episodes·ppo_epochs`` (``train_per_param_token``; ≈ 4 for
      LoRA). With ``value_head_on_policy`` pass ``n_critic=0``.
    """
    S = prompt_len + response_len
    ref = n_params if n_reference is None else n_reference
    rew = n_params if n_reward is None else n_reward
    critic = n_params if n_critic is None else n_critic
    scored = ref + rew + (0.0 if reuse_rollout_pass else n_params + critic)
    out = {
        "generation": 2.0 * n_params * S * episodes,
        "scoring": 2.0 * scored * S * episodes,
        "training": train_per_param_token * (n_params + critic) * S * episodes * ppo_epochs,
    }
    out["total"] = sum(out.values())
    return out


def chinchilla_tokens(n_params: float, tokens_per_param: float = 20.0) -> float:
    """Compute-optimal training tokens, D ≈ 20·N (Hoffmann et al. 2022)."""
    return tokens_per_param * n_params


def compute_optimal(compute: float, tokens_per_param: float = 20.0) -> dict[str, float]:
    """Solve ``C = 6·N·D`` with ``D = 20·N``: ``N = sqrt(C / 120)``, ``D = 20·N``."""
    if compute <= 0:
        raise PlanError("compute must be positive")
    n = math.sqrt(compute / (6.0 * tokens_per_param))
    return {"params": n, "tokens": tokens_per_param * n, "flops": compute}


def estimate_time(flops_total: float, flops_per_second: float, mfu: float = 0.4, devices: int = 1) -> float:
    """Wall-clock seconds: ``flops / (FLOP/s per device · devices · MFU)``.

    MFU (model FLOPs utilisation) of 0.3–0.5 is typical for well-tuned GPU training; a measured
    CPU rate (:func:`matmul_rate`) is already achieved throughput: pass ``mfu=1``.
    """
    if flops_per_second <= 0 or not 0 < mfu <= 1 or devices < 1:
        raise PlanError("flops_per_second must be > 0, mfu in (0, 1], devices >= 1")
    return flops_total / (flops_per_second * devices * mfu)


def gpu_peak_flops() -> float | None:
    """Peak bf16 FLOP/s of the visible GPU (A100/H100/H200 datasheets; other GPUs are taken as
    A100-class), or None without CUDA."""
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0).lower()
            return next((v for k, v in PEAK_FLOPS.items() if k in name), PEAK_FLOPS["a100"])
    except Exception:  # noqa: BLE001  (a broken driver still gets a plan)
        pass
    return None


# --------------------------------------------------------------------------- measured CPU rates

_MEASURED: dict[tuple, float] = {}

#: Most FLOPs one probe matmul may take: ~10 ms at 50 GFLOP/s, so large models stay quick.
PROBE_FLOPS = 5e8
#: Time spent timing each shape (after one warm-up call).
PROBE_SECONDS = 0.03


def busy_seconds(fn) -> float:
    """Seconds ``fn`` takes on this machine when no other job competes: the smaller of its wall
    time and the process's CPU time per intra-op thread. On a shared machine the others' load
    only adds waiting (wall time), not work (CPU time); on an idle one the two agree, torch's
    threads spinning while they wait. Plans predict the machine's own speed; the bench
    (bench/plan_accuracy.py) measures runs the same way."""
    import torch

    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return min(wall, cpu / max(torch.get_num_threads(), 1))


def _timed(fn, seconds: float = PROBE_SECONDS) -> float:
    """Seconds per call of ``fn`` (:func:`busy_seconds`): the median of runs of a few calls each,
    until ``seconds`` are spent, after one warm-up call."""
    fn()
    runs, spent, calls = [], 0.0, 1
    while spent < seconds or len(runs) < 3:
        took = busy_seconds(lambda: [fn() for _ in range(calls)])
        runs.append(took / calls)
        spent += took
        calls = min(calls * 2, 64)
    return sorted(runs)[len(runs) // 2]


def matmul_rate(shapes, dtype: str = "fp32") -> float:
    """Measured FLOP/s of ``x @ W`` over ``shapes`` ((rows, in, out, times) tuples: ``times``
    such matmuls of ``rows`` × ``in`` by ``in`` × ``out``), FLOP-weighted.

    Each shape is timed once per process (cached) in the process's current thread setting
    (``torch.get_num_threads()``): rows are cut so one probe stays under :data:`PROBE_FLOPS`
    (matmul time is linear in rows once they fill the cores). The result is
    ``sum(flops) / sum(seconds)``: the rate a pass through exactly these matmuls runs at.
    """
    import torch

    torch_dtype = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                   "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[str(dtype)]
    total_flops = total_seconds = 0.0
    for rows, fin, fout, times in shapes:
        probe_rows = max(8, min(int(rows), int(PROBE_FLOPS // (2 * fin * fout)) or 1))
        key = (probe_rows, fin, fout, str(dtype), torch.get_num_threads())
        if key not in _MEASURED:
            x = torch.randn(probe_rows, fin, dtype=torch_dtype)
            w = torch.randn(fin, fout, dtype=torch_dtype)
            _MEASURED[key] = 2 * probe_rows * fin * fout / _timed(lambda: x @ w)
        f = 2.0 * rows * fin * fout * times
        total_flops += f
        total_seconds += f / _MEASURED[key]
    return total_flops / total_seconds


def model_matmul_rate(config, tokens: int, dtype: str = "fp32") -> float:
    """:func:`matmul_rate` over one forward pass of the model's linear layers (each decoder
    layer's and the output layer's) at ``tokens`` rows: the CPU's rate for this model."""
    info = structure(config)
    L = max(info["num_layers"], 1)
    shapes = [(tokens, fin, fout, L) for fin, fout in info["layer_linears"].values()]
    shapes += [(tokens, fin, fout, 1) for name, fin, fout in info["linears"] if name == "lm_head"]
    return matmul_rate(shapes or [(tokens, 256, 256, 1)], dtype)
