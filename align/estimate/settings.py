"""How a model is trained or run: the one settings object every memory estimate takes, and the
engine (DDP, DeepSpeed ZeRO, FSDP) that decides what each process holds."""

from __future__ import annotations

import dataclasses
from typing import Iterable

from align.estimate.params import PlanError, dtype_bytes

#: Bytes of optimizer state per trainable parameter, as (number of states, bytes per state or
#: ``None`` for "fp32, or the parameter dtype without mixed precision"). AdamW keeps two moments
#: (m, v); Lion one; SGD without momentum none. bitsandbytes 8-bit optimizers keep both moments
#: in 1 byte each (blockwise, block 2048 with one fp32 absmax per block: +0.2 %, ignored).
#: Adafactor's factored second moment is O(rows+cols) per matrix and it keeps no first moment by
#: default: ~0 bytes per parameter.
OPTIMIZERS: dict[str, tuple[int, int | None]] = {
    "adamw": (2, None), "adam": (2, None), "adamw_torch": (2, None),
    "adamw_torch_fused": (2, None), "paged_adamw_32bit": (2, None),
    "adamw_8bit": (2, 1), "adamw_bnb_8bit": (2, 1), "paged_adamw_8bit": (2, 1),
    "lion": (1, None), "sgd_momentum": (1, None),
    "sgd": (0, None), "adafactor": (0, None),
}

#: What each engine shards across processes: 0 nothing (DDP: every process holds everything),
#: 1 optimizer states, 2 + gradients, 3 + weights (ZeRO stages, Rajbhandari et al. 2020; FSDP
#: FULL_SHARD shards like ZeRO-3).
ENGINES: dict[str, int] = {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3, "fsdp": 3}

METHODS = ("full", "lora", "qlora")
ATTENTION = ("sdpa", "flash", "flash_attention_2", "eager")


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything a memory estimate needs besides the model config.

    ``batch_size`` is the per-device micro-batch and ``seq_len`` its tokens per sequence;
    ``dtype`` holds the weights; ``mixed_precision`` adds fp32 master weights and fp32 optimizer
    states when ``dtype`` is 16-bit; ``engine`` and ``processes`` decide what one device holds.
    """

    method: str = "full"
    r: int = 16
    target_modules: str | Iterable[str] = "all-linear"
    lora_dropout: float = 0.0
    dtype: str = "bf16"
    mixed_precision: bool = True
    optimizer: str = "adamw"
    batch_size: int = 1
    seq_len: int = 2048
    gradient_checkpointing: bool = False
    engine: str = "ddp"
    processes: int = 1
    attention: str = "sdpa"
    double_quant: bool = True

    def __post_init__(self):
        object.__setattr__(self, "method", str(self.method).lower())
        if self.method not in METHODS:
            raise PlanError(f"unknown method {self.method!r}; expected full, lora or qlora")
        dtype_bytes(self.dtype)
        if self.optimizer.lower() not in OPTIMIZERS:
            raise PlanError(f"unknown optimizer {self.optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
        if self.engine not in ENGINES:
            raise PlanError(f"unknown engine {self.engine!r}; expected one of {', '.join(ENGINES)}")
        if self.attention not in ATTENTION:
            raise PlanError(f"unknown attention implementation {self.attention!r}")
        if self.batch_size < 1 or self.seq_len < 1 or self.processes < 1:
            raise PlanError("batch_size, seq_len and processes must be positive")

    @property
    def bytes(self) -> int:
        """Bytes per weight of ``dtype``."""
        return dtype_bytes(self.dtype)

    @property
    def shards(self) -> int:
        """Highest ZeRO stage in effect (0 on one process: nothing to shard across)."""
        return ENGINES[self.engine] if self.processes > 1 else 0

    def with_(self, **fields) -> "Settings":
        return dataclasses.replace(self, **fields) if fields else self


def settings(base: Settings | None = None, **fields) -> Settings:
    """``base`` (or the defaults) with ``fields`` replaced: ``settings(dtype="fp32", batch_size=8)``."""
    return (base or Settings()).with_(**fields)
