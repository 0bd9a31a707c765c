"""Divergence: a loss, gradient norm or weight that is no longer a finite number.

A diverged stage stops at once with one line naming the step: it is never marked finished, no
checkpoint is written after the divergence (the last one kept is finite), and nothing later in
the recipe trains on it. The TRL stages check through a callback (`align.training`), PPO in its
loop (`align.ppo.trainer`).
"""

from __future__ import annotations

import math

from align.errors import AlignError


class Diverged(AlignError):
    """Training produced a non-finite value; the run loop adds the stage's name."""


def nonfinite_value(values: dict) -> str | None:
    """"key nan" for the first number in `values` that is not finite, else None."""
    for key, value in values.items():
        if isinstance(value, (int, float)) and not math.isfinite(value):
            return f"{key} {value}"
    return None


def nonfinite_weight(named_parameters) -> str | None:
    """The name of the first trainable floating-point parameter holding a NaN or inf, else None."""
    import torch

    for name, param in named_parameters:
        local = param.to_local() if hasattr(param, "to_local") else param  # FSDP2: this process's shard
        if param.requires_grad and local.is_floating_point() and local.numel() and not torch.isfinite(local).all():
            return name
    return None


def diverged(step: int, what: str, checkpoints) -> Diverged:
    """The error for a divergence at `step`; `checkpoints` are the complete ones kept."""
    kept = f"its last checkpoint ({checkpoints[-1].name}) is finite and kept" if checkpoints else "no checkpoint was kept"
    return Diverged(f"training diverged at step {step} ({what}); the stage is not marked finished and {kept}. "
                    f"Lower learning_rate (or add warmup_steps) and run again")
