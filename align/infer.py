"""Inference: resolve a target (run folder, stage output, checkpoint or Hub id), load it (an
adapter onto its base, optionally in 4-bit nf4), and generate in batches with the chat template.

The `align chat`, `align generate` and `align merge` commands live here too:

* `chat_command`: a terminal chat that streams tokens, keeps the history (`/reset` clears it,
  `/quit` or end of input exits) and works with stdin from a pipe.
* `generate_command`: completions for a prompt file, written as jsonl rows {prompt, completion}.
* `merge_command` / `merge_adapter`: a LoRA adapter folded into its base, saved as safetensors.
  A QLoRA adapter was trained against the *quantized* base, so its base is quantized the same
  way and dequantized before the merge: the merged model computes what the trained one did.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from align import data, models
from align.errors import AlignError

POLICY_TYPES = ("ppo", "rloo", "grpo", "dpo", "sft", "pretrain", "init")


def resolve_target(target: str) -> str:
    """A run folder means its last finished policy stage; anything else is used as given."""
    path = Path(target)
    if (path / "recipe.yaml").is_file() and not (path / "config.json").is_file():
        from align.run import MARKER

        finished = []
        for marker in path.glob(f"*/{MARKER}"):
            info = json.loads(marker.read_text())
            if info.get("type") in POLICY_TYPES:
                finished.append((marker.stat().st_mtime, marker.parent))
        if not finished:
            raise AlignError(f"{target}: the run has no finished policy stage yet")
        return str(max(finished)[1])
    if not path.exists() and data.looks_local(target):
        raise AlignError(f"{target}: no such folder")
    return target


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
    if torch.cuda.is_available() and not load_in_4bit:
        model = model.cuda()
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the right edge
    return model, tokenizer


def prompt_text(tokenizer, prompt) -> str:
    """A prompt (string or list of messages) rendered with the chat template, ready to continue."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def sampling_kwargs(temperature=0.0, top_p=1.0, top_k=0) -> dict:
    """`generate` keyword arguments: temperature 0 is greedy; top_k 0 and top_p 1 switch those
    filters off (explicitly, so a model's generation_config cannot switch them back on)."""
    if temperature is None or temperature <= 0:
        return dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    return dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or 0)


def stop_token_ids(model, tokenizer) -> list[int]:
    """The end-of-turn token (the tokenizer's eos) plus any eos ids of the model's generation config."""
    ids = [tokenizer.eos_token_id]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in extra if isinstance(extra, (list, tuple)) else [extra]:
        if isinstance(i, int) and i not in ids:
            ids.append(i)
    return ids


def _cut_at_stop(row: list[int], stop_ids) -> list[int]:
    """The tokens up to and including the first stop token."""
    for i, token in enumerate(row):
        if token in stop_ids:
            return row[: i + 1]
    return row


def _seed(seed):
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)


@torch.no_grad()
def generate(model, tokenizer, prompts, *, max_new_tokens=64, temperature=0.0, top_p=1.0, top_k=0,
             batch_size=32, seed=None, return_ids=False):
    """Complete each prompt; temperature 0 is greedy. Returns the decoded completions (and the
    prompt/completion token ids when `return_ids`), cut at the end-of-turn token."""
    _seed(seed)
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
            row = _cut_at_stop(row, stops)
            out_texts.append(tokenizer.decode(row, skip_special_tokens=True).strip())
            out_ids.append((prompt_ids[prompt_mask.bool()].tolist(), row))
    return (out_texts, out_ids) if return_ids else out_texts


def _check_sampling_args(args):
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


# ---------------------------------------------------------------------------------------------
# align chat


def _streamer(tokenizer, out):
    """A TextStreamer that writes new tokens (prompt skipped, special tokens hidden) to `out`."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _fit_history(tokenizer, history: list[dict], budget: int | None) -> list[dict]:
    """The latest turns that fit in `budget` prompt tokens (the newest user turn always stays)."""
    if not budget:
        return history
    kept = list(history)
    while len(kept) > 1 and len(tokenizer(prompt_text(tokenizer, kept), add_special_tokens=False)["input_ids"]) > budget:
        kept = kept[2:] if len(kept) > 2 else kept[1:]  # drop the oldest user/assistant pair
    return kept


@torch.no_grad()
def chat_reply(model, tokenizer, history: list[dict], *, out=None, max_new_tokens=256, temperature=0.0,
               top_p=1.0, top_k=0) -> str:
    """Generate the assistant's next turn for `history`, streaming it to `out`; returns the text.

    Generation stops at the end-of-turn token. The oldest turns are dropped when the
    conversation no longer fits the model's context."""
    out = out or sys.stdout
    context = getattr(model.config, "max_position_embeddings", None)
    budget = context - max_new_tokens if context and context > max_new_tokens else None
    messages = _fit_history(tokenizer, history, budget)
    enc = tokenizer(prompt_text(tokenizer, messages), return_tensors="pt", add_special_tokens=False)
    if budget and enc["input_ids"].shape[1] > budget:  # one message longer than the context: keep its end
        enc = {k: v[:, -budget:] for k, v in enc.items()}
    enc = {k: v.to(model.device) for k, v in enc.items()}
    stops = stop_token_ids(model, tokenizer)
    gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=stops, streamer=_streamer(tokenizer, out),
                         **sampling_kwargs(temperature, top_p, top_k))
    row = _cut_at_stop(gen[0, enc["input_ids"].shape[1]:].tolist(), stops)
    return tokenizer.decode(row, skip_special_tokens=True).strip()


CHAT_HELP = "/reset clears the history, /quit (or end of input) exits"


def chat_loop(model, tokenizer, *, stdin=None, out=None, interactive=None, **gen) -> int:
    """Read user turns from `stdin` until /quit or end of input; returns the number of replies."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    interactive = stdin.isatty() if interactive is None else interactive
    history: list[dict] = []
    replies = 0
    while True:
        try:
            if interactive:
                line = input("you> ")
            else:
                line = stdin.readline()
                if not line:
                    break  # end of input
        except EOFError:
            if interactive:
                out.write("\n")
            break
        except KeyboardInterrupt:
            out.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit", "/q"):
            break
        if text == "/reset":
            history.clear()
            out.write("(history cleared)\n")
            out.flush()
            continue
        if text in ("/help", "/?"):
            out.write(CHAT_HELP + "\n")
            continue
        if text.startswith("/") and " " not in text:
            out.write(f"unknown command {text}; {CHAT_HELP}\n")
            continue
        history.append({"role": "user", "content": text})
        out.write("assistant> ")
        out.flush()
        try:
            reply = chat_reply(model, tokenizer, history, out=out, **gen)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            history.pop()
            out.write("\n(stopped)\n")
            continue
        history.append({"role": "assistant", "content": reply})
        replies += 1
    return replies


def chat_command(args):
    _check_sampling_args(args)
    path = resolve_target(args.target)
    model, tokenizer = load(path, load_in_4bit=args.load_in_4bit, trust_remote_code=args.trust_remote_code)
    _seed(args.seed)
    size = model.get_memory_footprint() / 2**20
    print(f"chatting with {path} ({size:,.1f} MiB{', nf4' if args.load_in_4bit else ''}); {CHAT_HELP}",
          file=sys.stderr, flush=True)
    chat_loop(model, tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_p=args.top_p, top_k=args.top_k)


# ---------------------------------------------------------------------------------------------
# align generate


def generate_command(args):
    from align.evaluate import read_rows

    _check_sampling_args(args)
    out = Path(args.out)
    if out.is_dir():
        raise AlignError(f"--out: '{out}' is a folder; give a .jsonl file path")
    prompts = [r["prompt"] for r in read_rows(args.prompts, "prompt", "--prompts", limit=None)]
    path = resolve_target(args.target)
    model, tokenizer = load(path, load_in_4bit=args.load_in_4bit, trust_remote_code=args.trust_remote_code)
    _seed(args.seed)
    completions = []
    for start in range(0, len(prompts), args.batch_size):
        completions += generate(model, tokenizer, prompts[start:start + args.batch_size],
                                max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                top_p=args.top_p, top_k=args.top_k, batch_size=args.batch_size)
        print(f"generated {len(completions)}/{len(prompts)}", file=sys.stderr, flush=True)
    data.write_jsonl_atomic(out, ({"prompt": p, "completion": c} for p, c in zip(prompts, completions)))
    print(out)


# ---------------------------------------------------------------------------------------------
# align merge


def training_quantization(adapter_dir) -> dict | None:
    """The `quantization:` block the adapter's stage was trained with (QLoRA), from the run's
    recipe.yaml next to the stage folder; None when it was not quantized or nothing says so."""
    adapter_dir = Path(adapter_dir)
    recipe = adapter_dir.parent / "recipe.yaml"
    if not recipe.is_file():
        return None
    from align.recipe import parse_yaml

    try:
        stages = (parse_yaml(recipe.read_text(), str(recipe)) or {}).get("stages") or {}
    except (AlignError, OSError, AttributeError):
        return None
    block = stages.get(adapter_dir.name) if isinstance(stages, dict) else None
    quant = block.get("quantization") if isinstance(block, dict) else None
    return dict(quant) if isinstance(quant, dict) and quant else None


def _base_config(base: str, trust_remote_code: bool):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise AlignError(f"merge: cannot read the base model '{base}': {models.first_line(e)}") from None


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
            raise AlignError(f"merge: cannot dequantize the base '{base}': {models.first_line(e)}") from None
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


@contextlib.contextmanager
def atomic_dir(out: Path):
    """Yield a temporary folder next to `out`; on success it replaces `out` in one rename.

    An existing `out` is only replaced when it is empty or holds a model (config.json)."""
    out = Path(out)
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        old = out.with_name(f".{out.name}.old{os.getpid()}")
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))  # training added a pad / end-of-turn token
    try:
        merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise AlignError(f"merge: cannot apply the adapter {adapter_dir} to '{base}': {models.first_line(e)}") from None
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
