"""Real (non-pad) tokens per second of padding-free and packed SFT batches against padded ones.

Builds a ~10M-parameter Llama-style model (hidden 256, 4 layers, untied 12k vocabulary; random
init) and a byte-level BPE tokenizer with `align.models.train_tokenizer` + `init_model`, then
writes plain-text SFT rows whose token lengths (the EOS TRL appends included) spread uniformly
from --min-len to --max-len (20 to 256). Every row is already at most --max-len tokens long, which
padding-free training without packing needs (`max_length: null`: TRL does not truncate then).

Each variant is one align SFT stage (`align.run.run` on a one-stage recipe, in this process),
same model, data, batch, steps, learning rate and seed:

    padded          the default: rows padded to the longest row of their batch
    padding_free    `padding_free: true, max_length: null`: a batch is one flat sequence,
                    position_ids restart at each row (no pad at all)
    packed_bfd      `packing: true, packing_strategy: bfd, max_length: 256`: rows best-fit into
                    256-token bins, padding-free inside the batch (no cross-row attention)
    packed_wrapped  `packing: true, packing_strategy: wrapped, max_length: 256`: the token stream
                    cut into 256-token blocks (attention crosses row boundaries)

Real tokens come from the trainer's own `num_tokens` (attention-mask sum when padded, flat length
when padding-free: pads never count); the expected count from the data is printed beside it.
Throughput = real tokens / train_runtime (wall). The cores are shared with other jobs, so the
tokens per CPU-second of `trainer.train()` (1 torch thread by default) are printed too, and
--rounds > 1 alternates the order of the variants and takes medians. A short untimed warm-up
run comes first.

    python bench/sft_padding.py [--steps 6] [--batch 16] [--rounds 2] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

VARIANTS = {
    "padded": {"max_length": 256},
    "padding_free": {"padding_free": True, "max_length": None},
    "packed_bfd": {"packing": True, "packing_strategy": "bfd", "max_length": 256},
    "packed_wrapped": {"packing": True, "packing_strategy": "wrapped", "max_length": 256},
}


def pseudo_words(n: int, rng: random.Random) -> list[str]:
    syllables = [c + v for c in "bcdfghjklmnprstvwz" for v in "aeiou"] + ["ing", "er", "ous", "tion", "al"]
    words = set()
    while len(words) < n:
        words.add("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))))
    return sorted(words)


def build(work: Path, args) -> tuple[Path, Path, list[int]]:
    """Tokenizer + model + data; returns (model folder, data file, token length of every row)."""
    import torch

    from align import models

    rng = random.Random(0)
    vocab = pseudo_words(20000, rng)
    weights = [1.0 / (i + 1) for i in range(len(vocab))]  # Zipf-like word frequencies

    def sentence(k):
        return " ".join(rng.choices(vocab, weights, k=k))

    tokenizer = models.train_tokenizer((sentence(60) for _ in range(6000)), vocab_size=args.vocab)
    torch.manual_seed(0)
    model = models.init_model({"hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
                               "num_hidden_layers": args.layers, "num_attention_heads": args.hidden // 64,
                               "tie_word_embeddings": False}, tokenizer)
    folder = work / "model"
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())

    # Byte-level BPE splits on spaces first, so a text's token count is the sum of its words'.
    first = {w: len(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in vocab}
    later = {w: len(tokenizer(" " + w, add_special_tokens=False)["input_ids"]) for w in vocab}
    data, lengths = work / "sft.jsonl", []
    with open(data, "w") as f:
        for _ in range(args.rows):
            # TRL appends the EOS token; a row may end up to 2 tokens short of its target
            target = rng.randint(args.min_len + 2, args.max_len) - 1
            words = [rng.choices(vocab, weights)[0]]
            count = first[words[0]]
            while True:
                w = rng.choices(vocab, weights)[0]
                if count + later[w] > target:
                    if target - count <= 2:
                        break
                    continue
                words.append(w)
                count += later[w]
            text = " ".join(words)
            n = len(tokenizer(text, add_special_tokens=False)["input_ids"]) + 1
            assert n <= args.max_len, (n, text)
            lengths.append(n)
            f.write(json.dumps({"text": text}) + "\n")
    print(f"model: {params / 1e6:.1f}M parameters (hidden {args.hidden}, {args.layers} layers, vocab "
          f"{len(tokenizer)}, untied)  data: {args.rows} rows, tokens per row min {min(lengths)} "
          f"mean {statistics.mean(lengths):.1f} max {max(lengths)}", flush=True)
    return folder, data, lengths


def instrument():
    """Record per-run CPU time of train() and the positions each training step computes."""
    from trl import SFTTrainer

    record = {"cpu": 0.0, "positions": 0, "steps": 0}
    train, step = SFTTrainer.train, SFTTrainer.training_step

    def timed_train(self, *a, **kw):
        c = time.process_time()
        try:
            return train(self, *a, **kw)
        finally:
            record["cpu"] += time.process_time() - c

    def counted_step(self, model, inputs, *a, **kw):
        record["positions"] += inputs["input_ids"].numel()
        record["steps"] += 1
        return step(self, model, inputs, *a, **kw)

    SFTTrainer.train, SFTTrainer.training_step = timed_train, counted_step
    return record


def run_variant(name: str, extra: dict, work: Path, model: Path, data: Path, args, record: dict, tag: str) -> dict:
    from align.recipe import build_recipe
    from align.run import run

    out = work / f"{name}-{tag}"
    stage = {"model": str(model), "dataset": {"path": str(data)}, "per_device_train_batch_size": args.batch,
             "max_steps": args.steps, "learning_rate": 1e-3, "logging_steps": args.steps, "save_strategy": "no",
             "disable_tqdm": True, **extra}
    recipe = build_recipe({"name": f"pad-{name}", "seed": 0, "output_dir": str(out), "stages": {"sft": stage}})
    record.update(cpu=0.0, positions=0, steps=0)
    with open(work / "runs.log", "a") as log, contextlib.redirect_stdout(log):
        run(recipe)
    metrics = json.loads((out / "sft" / "metrics.json").read_text())
    history = [json.loads(line) for line in (out / "sft" / "log_history.jsonl").read_text().splitlines()]
    tokens = int(max(e["num_tokens"] for e in history if "num_tokens" in e))
    return {"tokens": tokens, "runtime": metrics["train_runtime"], "cpu": record["cpu"],
            "positions": record["positions"], "steps": metrics["global_step"], "loss": metrics["train_loss"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--batch", type=int, default=16)  # at 8, removing every pad gains at most ~1.59x
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1500)
    parser.add_argument("--min-len", type=int, default=20)
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=12000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", help="keep files here (default: a temporary folder)")
    args = parser.parse_args()
    if args.max_len != 256:
        for extra in VARIANTS.values():
            if extra.get("max_length"):
                extra["max_length"] = args.max_len

    for key, value in {"TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                       "TRANSFORMERS_VERBOSITY": "error", "MPLBACKEND": "Agg"}.items():
        os.environ.setdefault(key, value)
    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="align-bench-pad-")
        work = Path(tmp.name)
    os.environ["HF_DATASETS_CACHE"] = str(work / "hf-datasets-cache")
    import warnings

    import torch

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()

    model, data, lengths = build(work, args)
    record = instrument()
    print(f"batch {args.batch}  steps {args.steps}  torch threads {args.threads}  rounds {args.rounds}  "
          f"expected real tokens per padded/padding-free step ~ {args.batch * statistics.mean(lengths):.0f}",
          flush=True)

    saved = args.steps
    args.steps = 2
    run_variant("padded", VARIANTS["padded"], work, model, data, args, record, "warmup")  # untimed warm-up
    args.steps = saved

    results = {name: [] for name in VARIANTS}
    names = list(VARIANTS)
    for r in range(args.rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            res = run_variant(name, VARIANTS[name], work, model, data, args, record, str(r))
            results[name].append(res)
            print(f"round {r + 1} {name:<15} real tokens {res['tokens']:6d}  computed positions {res['positions']:6d} "
                  f"({res['tokens'] / res['positions']:.0%} real)  train_runtime {res['runtime']:6.2f}s  "
                  f"cpu {res['cpu']:6.2f}s  -> {res['tokens'] / res['runtime']:7.1f} tok/s, "
                  f"{res['tokens'] / res['cpu']:7.1f} tok/cpu-s  loss {res['loss']:.3f}", flush=True)

    def tps(name, key):
        return statistics.median(r["tokens"] / r[key] for r in results[name])

    print()
    for name in VARIANTS:
        print(f"{name:<15} median real tokens/s {tps(name, 'runtime'):8.1f}   per CPU-second {tps(name, 'cpu'):8.1f}")
    print()
    best, best_cpu = 0.0, 0.0
    for name in list(VARIANTS)[1:]:
        ratio, ratio_cpu = tps(name, "runtime") / tps("padded", "runtime"), tps(name, "cpu") / tps("padded", "cpu")
        best, best_cpu = max(best, ratio), max(best_cpu, ratio_cpu)
        print(f"{name}_vs_padded_tokens_per_s_ratio: {ratio:.2f}  (per CPU-second: {ratio_cpu:.2f})")
    print(f"best_padding_free_or_packed_vs_padded_ratio: {best:.2f}  (per CPU-second: {best_cpu:.2f})  (goal >= 1.6)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
