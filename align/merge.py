"""`align merge`: a LoRA adapter folded into its base and saved as safetensors.

A QLoRA adapter was trained against the *quantized* base, so its base is quantized the same way
and dequantized before the merge: the merged model computes what the trained one did.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from align import models
from align.errors import AlignError, first_line
from align.rundir import atomic_dir, read_recipe, resolve_target


def training_quantization(adapter_dir) -> dict | None:
    """The `quantization:` block the adapter's stage was trained with (QLoRA), from the run's
    recipe.yaml next to the stage folder; None when it was not quantized or nothing says so."""
    adapter_dir = Path(adapter_dir)
    try:
        block = read_recipe(adapter_dir.parent)["stages"].get(adapter_dir.name)
    except AlignError:
        return None
    quant = block.get("quantization") if isinstance(block, dict) else None
    return dict(quant) if isinstance(quant, dict) and quant else None


def _base_config(base: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise AlignError(f"merge: cannot read the base model '{base}': {first_line(e)}") from None


def _load_base_for_merge(adapter_dir: Path, base: str, kind: str, trust_remote_code: bool):
    """The adapter's base in float32; a QLoRA base is quantized as in training, then dequantized."""
    config = _base_config(base, trust_remote_code) if not models.is_adapter(base) else None
    pre_quantized = getattr(config, "quantization_config", None) is not None
    quant = None if pre_quantized else training_quantization(adapter_dir)
    model = models.load_model(base, kind=kind, dtype="float32", quantization=quant,
                              trust_remote_code=trust_remote_code)
    if quant or pre_quantized or getattr(model, "hf_quantizer", None) is not None:
        try:
            model = model.dequantize(dtype=torch.float32)
        except (ValueError, NotImplementedError, AttributeError) as e:
            raise AlignError(f"merge: cannot dequantize the base '{base}': {first_line(e)}") from None
    return model, config


def _save_dtype(config):
    """The dtype the base was stored in (a merged bf16 model stays bf16); float32 otherwise."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def check_out_dir(out: Path):
    """An output folder may be new, empty, or a model folder (which is then replaced)."""
    out = Path(out)
    if out.exists():
        if not out.is_dir():
            raise AlignError(f"--out: '{out}' is a file; give a folder")
        if any(out.iterdir()) and not (out / "config.json").is_file():
            raise AlignError(f"--out: '{out}' is not empty and holds no model; choose a new folder")


def merge_adapter(adapter_dir, out, *, trust_remote_code: bool = False, quiet: bool = False) -> Path:
    """Merge the LoRA adapter in `adapter_dir` into its base; save safetensors + tokenizer to `out`."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    if not models.is_adapter(adapter_dir):
        raise AlignError(f"merge: '{adapter_dir}' is not a LoRA adapter (no adapter_config.json); "
                         "it already holds full weights, so there is nothing to merge")
    out = Path(out)
    if out.resolve() == adapter_dir.resolve():
        raise AlignError("--out: must differ from the adapter folder")
    check_out_dir(out)  # before minutes of loading, not after
    adapter_cfg = json.loads((adapter_dir / models.ADAPTER_CONFIG).read_text())
    base = adapter_cfg.get("base_model_name_or_path")
    if not base:
        raise AlignError(f"merge: {adapter_dir}/adapter_config.json names no base_model_name_or_path")
    kind = "seq-cls" if adapter_cfg.get("task_type") == "SEQ_CLS" else "causal-lm"
    tokenizer = models.load_tokenizer(str(adapter_dir), trust_remote_code=trust_remote_code)
    model, config = _load_base_for_merge(adapter_dir, base, kind, trust_remote_code)
    models.fit_tokenizer(model, tokenizer)  # training may have added a pad / end-of-turn token
    try:
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise AlignError(f"merge: cannot apply the adapter {adapter_dir} to '{base}': {first_line(e)}") from None
    merged = merged.to(_save_dtype(config) if config is not None else torch.float32)
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    if not quiet:
        how = " (dequantized QLoRA base)" if training_quantization(adapter_dir) else ""
        print(f"merged {adapter_dir} into {base}{how}", file=sys.stderr)
    return out


def merge_command(args):
    path = resolve_target(args.target)
    if not Path(path).is_dir():
        raise AlignError(f"{args.target}: no such folder (merge takes a local adapter, stage or run folder)")
    print(merge_adapter(path, args.out))
