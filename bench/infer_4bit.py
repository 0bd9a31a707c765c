"""nf4 (bitsandbytes 4-bit) against fp32 for inference: weight memory and greedy decoding speed.

Builds a ~100M-parameter Llama-style model from a config (random init, nothing from the Hub),
saves it to a temporary folder, loads it twice in this process through `align.models.load_model`
(fp32, then nf4 exactly as `align chat/generate --load-in-4bit` does) and prints:

    weight_memory_ratio_nf4_vs_fp32      bytes of weights, quantization state included
    tokens_per_second_ratio_nf4_vs_fp32  greedy decoding of --new-tokens tokens, batch 1, KV cache

Embeddings (tied with the LM head) stay unquantised, so the config keeps the linear layers
dominant: vocab 8000, hidden 768, 12 layers. On CPU, bitsandbytes' 4-bit matmul runs in bf16
through its own kernel; it saves memory, it is not expected to be faster there.

    python bench/infer_4bit.py [--new-tokens 64] [--layers 12] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from align import infer, models  # noqa: E402


def build(folder: Path, args) -> int:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                         max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=0, eos_token_id=1,
                         bos_token_id=None)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = None  # decode exactly --new-tokens tokens
    model.save_pretrained(folder, safe_serialization=True)
    return sum(p.numel() for p in model.parameters())


def weight_bytes(model) -> int:
    """Bytes of every parameter and buffer (tied tensors once) plus 4-bit quantization state."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = (tensor.data_ptr(), tensor.nbytes)
        if key in seen:
            continue
        seen.add(key)
        total += tensor.nbytes
        state = getattr(tensor, "quant_state", None)
        while state is not None:  # absmax and code; nested with double quantization
            total += sum(t.nbytes for t in (getattr(state, "absmax", None), getattr(state, "code", None))
                         if isinstance(t, torch.Tensor))
            state = getattr(state, "state2", None)
    return total


@torch.no_grad()
def decode_seconds(model, prompt, new_tokens: int) -> float:
    start = time.perf_counter()
    out = model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                         pad_token_id=0, eos_token_id=None)
    assert out.shape[1] == prompt.shape[1] + new_tokens
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: steady numbers on a shared machine)")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()

    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with tempfile.TemporaryDirectory(prefix="align-bench-4bit-") as tmp:
        params = build(Path(tmp), args)
        prompt = torch.randint(2, args.vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
        probe = torch.randint(2, args.vocab, (2, 64), generator=torch.Generator().manual_seed(1))
        loaded, results = {}, {}
        for name, quant in (("fp32", None), ("nf4", infer._nf4_config())):
            start = time.perf_counter()
            model = models.load_model(tmp, dtype="float32", quantization=quant).eval()
            if device == "cuda" and quant is None:
                model = model.cuda()
            load_s = time.perf_counter() - start
            with torch.no_grad():
                logits = model(input_ids=probe.to(model.device)).logits.float().cpu()
            decode_seconds(model, prompt.to(model.device), 4)  # warm-up
            loaded[name] = model
            results[name] = dict(bytes=weight_bytes(model), footprint=model.get_memory_footprint(), load_s=load_s,
                                 logits=logits, times=[])
        for _ in range(args.repeats):  # interleaved, so both see the same machine load
            for name, model in loaded.items():
                results[name]["times"].append(decode_seconds(model, prompt.to(model.device), args.new_tokens))
        for r in results.values():
            r["tps"] = args.new_tokens / statistics.median(r["times"])
        del loaded

    fp32, nf4 = results["fp32"], results["nf4"]
    cosine = torch.nn.functional.cosine_similarity(nf4["logits"].flatten(1), fp32["logits"].flatten(1)).mean()
    print(f"model: Llama {params / 1e6:.1f}M parameters (vocab {args.vocab}, hidden {args.hidden}, "
          f"{args.layers} layers, tied embeddings); device {device}, {torch.get_num_threads()} threads")
    for name, r in results.items():
        print(f"{name}: weights {r['bytes'] / 2**20:.1f} MiB (get_memory_footprint {r['footprint'] / 2**20:.1f} MiB), "
              f"load {r['load_s']:.1f}s, greedy {r['tps']:.1f} tokens/s")
    print(f"weight_memory_ratio_nf4_vs_fp32: {nf4['bytes'] / fp32['bytes']:.3f}")
    print(f"memory_footprint_ratio_nf4_vs_fp32: {nf4['footprint'] / fp32['footprint']:.3f}")
    print(f"tokens_per_second_ratio_nf4_vs_fp32: {nf4['tps'] / fp32['tps']:.2f}  "
          f"(median of {args.repeats} interleaved runs of {args.new_tokens} greedy tokens, batch 1)")
    print(f"logits_cosine_nf4_vs_fp32: {cosine:.4f}")


if __name__ == "__main__":
    main()
