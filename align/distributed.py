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
from typing import Mapping


def launched(environ: Mapping[str, str] | None = None) -> tuple[str, int]:
    """(engine, processes) from what ``accelerate launch`` puts in the environment.

    DeepSpeed: ``ACCELERATE_USE_DEEPSPEED=true`` with ``ACCELERATE_DEEPSPEED_ZERO_STAGE`` (0 is
    plain data parallelism; without it, ``zero_optimization.stage`` of the JSON file in
    ``ACCELERATE_DEEPSPEED_CONFIG_FILE``). FSDP: ``ACCELERATE_USE_FSDP=true``; ``FSDP_SHARDING_STRATEGY``
    SHARD_GRAD_OP (FSDP1) or ``FSDP_RESHARD_AFTER_FORWARD=false`` (FSDP2) keep whole weights
    between forward and backward, which peaks like ZeRO-2; NO_SHARD is DDP. Processes:
    ``WORLD_SIZE``.
    """
    env = os.environ if environ is None else environ
    processes = int(env.get("WORLD_SIZE") or 1)
    if _flag("ACCELERATE_USE_DEEPSPEED", env):
        stage = env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE") or _zero_stage_of(env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE"))
        stage = int(stage or 0)  # DeepSpeed's own default is stage 0
        return ("ddp", "zero1", "zero2", "zero3")[min(max(stage, 0), 3)], processes
    if _flag("ACCELERATE_USE_FSDP", env):
        strategy = env.get("FSDP_SHARDING_STRATEGY", "").upper()
        if strategy in ("NO_SHARD", "3"):
            return "ddp", processes
        if strategy in ("SHARD_GRAD_OP", "2") or env.get("FSDP_RESHARD_AFTER_FORWARD", "").lower() == "false":
            return "zero2", processes
        return "fsdp", processes
    return "ddp", processes


def _zero_stage_of(path) -> int | None:
    import json

    try:
        with open(path) as f:
            return int(json.load(f)["zero_optimization"]["stage"])
    except (TypeError, OSError, ValueError, KeyError):
        return None


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
    return {"ddp": 0, "zero1": 1, "zero2": 2, "zero3": 3}[launched()[0]]


def sharding() -> str | None:
    """'zero3' or 'fsdp' when the launch shards the weights themselves across processes."""
    name = launched()[0]
    return name if name in ("zero3", "fsdp") else None


def _flag(name: str, environ: Mapping[str, str] | None = None) -> bool:
    return (os.environ if environ is None else environ).get(name, "").lower() in ("1", "true", "yes")


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
