"""How `accelerate launch` spreads a run over processes: which engine it asked for (DDP,
DeepSpeed ZeRO-n, FSDP) and the process group that carries it, also without CUDA.

accelerate picks the process group from the device: with no GPU, a plain `PartialState()`
stays single-process (each launched process trains alone), `PartialState(cpu=True)` starts
gloo but turns DeepSpeed off, and only `PartialState(backend="gloo")` gives DeepSpeed a real
process group on CPU. `process_state` and `trainer_device_args` choose the right one.
"""

from __future__ import annotations

import os
from contextlib import contextmanager


def _flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")


def engine() -> str | None:
    """"deepspeed", "fsdp" or None (DDP or one process), as `accelerate launch` set it."""
    if _flag("ACCELERATE_USE_DEEPSPEED"):
        return "deepspeed"
    if _flag("ACCELERATE_USE_FSDP"):
        return "fsdp"
    return None


def zero_stage() -> int | None:
    """The DeepSpeed ZeRO stage of the launch (None without DeepSpeed)."""
    if engine() != "deepspeed":
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    return int(stage) if stage and stage.isdigit() else None


def sharding() -> str | None:
    """'zero3' or 'fsdp' when the launch shards the weights themselves across processes."""
    if engine() == "fsdp":
        return "fsdp"
    if zero_stage() == 3:
        return "zero3"
    return None


def on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def deepspeed_on_cpu() -> bool:
    """A DeepSpeed launch on a machine without CUDA: it needs gloo, and no CPU flag."""
    return engine() == "deepspeed" and "LOCAL_RANK" in os.environ and not on_gpu()


def process_state():
    """The PartialState of this launch, with a real process group on CPU too."""
    from accelerate import PartialState

    if on_gpu():
        return PartialState()
    if deepspeed_on_cpu():
        return PartialState(backend="gloo")
    return PartialState(cpu=True)


def reset_process_state():
    """Forget the AcceleratorState an earlier stage left (its mixed precision, plugins), and
    make sure the current one spans every launched process."""
    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and PartialState().num_processes == 1:
        AcceleratorState._reset_state(reset_partial_state=True)
        process_state()
    AcceleratorState._reset_state()


def trainer_device_args() -> dict:
    """TrainingArguments fields that put a TRL trainer on this machine's devices. Without CUDA:
    fp32 (TRL defaults to bf16), and the CPU flag, except under DeepSpeed, which that flag
    would silently turn off; DeepSpeed then gets gloo."""
    if on_gpu():
        return {}
    if deepspeed_on_cpu():
        return {"ddp_backend": "gloo", "bf16": False}
    return {"use_cpu": True, "bf16": False}


@contextmanager
def whole_weights():
    """Load models whole on every process; DeepSpeed partitions them when its engine starts.

    Once a ZeRO-3 engine has been configured, transformers loads every later model under
    `deepspeed.zero.Init`, which makes loading a collective call: a load on the main process
    first (a merged adapter copy written once) would then wait forever for the others."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:
        yield
        return
    saved = hf_deepspeed._hf_deepspeed_config_weak_ref
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def in_use() -> str:
    """What the last stage really ran under, read from accelerate's state (not the launch
    flags, which accelerate may have ignored): "zero2", "zero3", "fsdp", "ddp" or "single"."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    kind = AcceleratorState._shared_state.get("distributed_type")
    if kind == DistributedType.DEEPSPEED and AcceleratorState._shared_state.get("deepspeed_plugins"):
        return f"zero{AcceleratorState().deepspeed_plugin.zero_stage}"
    if kind == DistributedType.FSDP:
        return "fsdp"
    return "ddp" if PartialState().num_processes > 1 else "single"
