"""Inference: load a target (run folder, stage output, checkpoint or Hub id; an adapter onto its
base, optionally in 4-bit nf4) and generate in batches with the chat template. `align generate`
writes completions for a prompt file; `align chat` (align/chat.py) and `align eval` build on it.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from align import data, models
from align.errors import AlignError
from align.merge import merge_adapter
from align.render import completion_text, prompt_text
from align.rundir import resolve_target, write_jsonl


def _nf4_config() -> dict:
    return {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_compute_dtype": "bfloat16" if torch.cuda.is_available() else "float32"}


def load(target: str, *, load_in_4bit: bool = False, kind: str = "causal-lm", trust_remote_code: bool = False):
    """(model, tokenizer) in eval mode. With `load_in_4bit` the weights are nf4 (bitsandbytes).

    A 4-bit adapter is merged in full precision into a temporary folder first (bitsandbytes
    quantizes while loading), so nothing is written next to the adapter."""
    path = resolve_target(target)
    tokenizer = models.load_tokenizer(path, trust_remote_code=trust_remote_code)
    quant = _nf4_config() if load_in_4bit else None
    dtype = "float32" if not torch.cuda.is_available() else "auto"
    if load_in_4bit and models.is_adapter(path):
        with tempfile.TemporaryDirectory(prefix="align-merge-", ignore_cleanup_errors=True) as tmp:
            merged = merge_adapter(path, Path(tmp) / "merged", trust_remote_code=trust_remote_code, quiet=True)
            model = models.load_model(str(merged), kind=kind, dtype=dtype, quantization=quant,
                                      trust_remote_code=trust_remote_code)
    else:
        model = models.load_model(path, kind=kind, dtype=dtype, quantization=quant,
                                  trust_remote_code=trust_remote_code)
    models.fit_tokenizer(model, tokenizer)  # a base whose tokenizer gained a pad token here
    if torch.cuda.is_available() and not load_in_4bit:
        model = model.cuda()
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the right edge
    return model, tokenizer


def sampling_kwargs(temperature=0.0, top_p=1.0, top_k=0) -> dict:
    """`generate` keyword arguments: temperature 0 is greedy; top_k 0 and top_p 1 switch those
    filters off (explicitly, so a model's generation_config cannot switch them back on)."""
    if temperature is None or temperature <= 0:
        return dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    return dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or 0)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The tokens that end a reply (align.models.stop_token_ids)."""
    return models.stop_token_ids(tokenizer, model)


def cut_at_stop(row: list[int], stop_ids) -> list[int]:
    """The tokens up to and including the first stop token."""
    for i, token in enumerate(row):
        if token in stop_ids:
            return row[: i + 1]
    return row


def seed_all(seed):
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)


@torch.no_grad()
def generate(model, tokenizer, prompts, *, max_new_tokens=64, temperature=0.0, top_p=1.0, top_k=0,
             batch_size=32, seed=None, return_ids=False):
    """Complete each prompt (rendered by align.render: strings are user turns); temperature 0
    is greedy. Returns the decoded completions (and the prompt/completion token ids when
    `return_ids`), cut after the end-of-turn token, which the decoded text leaves out."""
    seed_all(seed)
    tokenizer.padding_side = "left"
    stops = stop_token_ids(model, tokenizer)
    sampling = sampling_kwargs(temperature, top_p, top_k)
    out_texts, out_ids = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = [prompt_text(tokenizer, p) for p in prompts[start:start + batch_size]]
        enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(model.device)
        gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=stops, **sampling)
        new = gen[:, enc["input_ids"].shape[1]:]
        for row, prompt_ids, prompt_mask in zip(new.tolist(), enc["input_ids"], enc["attention_mask"]):
            row = cut_at_stop(row, stops)
            out_texts.append(completion_text(tokenizer, row))
            out_ids.append((prompt_ids[prompt_mask.bool()].tolist(), row))
    return (out_texts, out_ids) if return_ids else out_texts


def check_sampling_args(args):
    if args.max_new_tokens <= 0:
        raise AlignError(f"--max-new-tokens: must be positive, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise AlignError(f"--temperature: must be 0 (greedy) or positive, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise AlignError(f"--top-p: must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        raise AlignError(f"--top-k: must be 0 (off) or positive, got {args.top_k}")
    if getattr(args, "batch_size", 1) <= 0:
        raise AlignError(f"--batch-size: must be positive, got {args.batch_size}")


def generate_command(args):
    check_sampling_args(args)
    out = Path(args.out)
    if out.is_dir():
        raise AlignError(f"--out: '{out}' is a folder; give a .jsonl file path")
    prompts = [r["prompt"] for r in data.read_rows(args.prompts, "prompt", "--prompts", limit=None)]
    path = resolve_target(args.target)
    model, tokenizer = load(path, load_in_4bit=args.load_in_4bit, trust_remote_code=args.trust_remote_code)
    seed_all(args.seed)
    completions = []
    for start in range(0, len(prompts), args.batch_size):
        completions += generate(model, tokenizer, prompts[start:start + args.batch_size],
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, batch_size=args.batch_size)
        print(f"generated {len(completions)}/{len(prompts)}", file=sys.stderr, flush=True)
    write_jsonl(out, ({"prompt": p, "completion": c} for p, c in zip(prompts, completions)))
    print(out)
