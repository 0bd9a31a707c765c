"""Estimates before spending compute: parameters, memory per device, FLOPs and time.

Pure functions of a ``transformers`` config plus a :class:`Settings` (how the model is trained),
so the planner and the recipe loader call them without building a model:

    params.py       parameters counted on the meta device (any architecture), LoRA adapters
    settings.py     the Settings object; engines (DDP, ZeRO-1/2/3, FSDP) and what they shard
    activations.py  activation memory of a micro-batch, the KV cache
    memory.py       memory per device of one model, and of the PPO and RLOO/GRPO layouts
    compute.py      FLOPs, and the rate a device runs them at (measured on a CPU)
    table.py        plain-text tables
"""

from align.estimate.activations import ADAPTER_BYTES, activation_bytes, kv_cache_bytes
from align.estimate.compute import (
    PEAK_FLOPS, chinchilla_tokens, compute_optimal, estimate_time, flops, matmul_rate, model_matmul_rate,
    ppo_flops,
)
from align.estimate.memory import (
    estimate_memory, estimate_online_memory, estimate_ppo_memory, nf4_bytes_per_param, shard,
)
from align.estimate.params import (
    DTYPE_BYTES, GiB, MiB, PlanError, count_parameters, lora_parameters, lora_target_names, score_parameters,
    value_head_parameters,
)
from align.estimate.settings import ENGINES, OPTIMIZERS, Settings, settings
from align.estimate.table import fmt_bytes, fmt_count, fmt_flops, fmt_time, format_plan

__all__ = [
    "ADAPTER_BYTES", "DTYPE_BYTES", "ENGINES", "GiB", "MiB", "OPTIMIZERS", "PEAK_FLOPS", "PlanError", "Settings",
    "activation_bytes", "chinchilla_tokens", "compute_optimal", "count_parameters", 
    "estimate_memory", "estimate_online_memory", "estimate_ppo_memory", "estimate_time", "flops", "fmt_bytes",
    "fmt_count", "fmt_flops", "fmt_time", "format_plan", "kv_cache_bytes", "lora_parameters",
    "lora_target_names", "matmul_rate", "model_matmul_rate", "nf4_bytes_per_param", "ppo_flops",
    "score_parameters", "settings", "shard", "value_head_parameters",
]
