"""align's SFT stage against the same training written as a plain TRL SFTTrainer script.

Builds a small Llama-style model and tokenizer with align's `init` stage (offline, from generated
data), then trains it for --steps steps on generated chat data, alternately

    align   `align.run.run(load_recipe(recipe.yaml))`: a one-stage recipe (`type: sft`), what
            `align run recipe.yaml` does after its imports
    plain   datasets.load_dataset + AutoTokenizer + AutoModelForCausalLM + SFTConfig + SFTTrainer
            + train() + save_model() + tokenizer.save_pretrained(): what a user would write

with the same model folder, the same data file and the same SFTConfig arguments (use_cpu,
bf16=False, batch, max_steps, max_length, learning rate, seed, save/log settings,
assistant_only_loss: every align default is spelled out so neither side gets one the other lacks).

Fairness:
  * each side runs in its own long-lived worker process with the same environment (torch
    threads, offline flags, one datasets cache); a worker imports its libraries, says READY and
    then runs on command, so interpreter and import start-up are excluded from both (they are
    shown separately); the idle worker blocks on stdin and uses no CPU;
  * one untimed warm-up run per worker (datasets cache, page cache, first-call costs, align's
    lazy imports such as matplotlib for the report);
  * --rounds rounds alternate which side goes first; medians are compared;
  * the machine's cores are shared with other jobs, so wall time is noisy: besides wall time
    (train_runtime) the workers also report the median wall time of one optimizer step and the
    CPU time of the training call, which bursts of foreign load disturb much less.

Ratios (align / plain):
    trainer   train_runtime (transformers' timing of the training loop)
    step      median wall time of one training step (a callback in both)
    cpu       process CPU time of trainer.train()
    stage     align: stage_seconds (align's timing of the stage: data, model, trainer, train,
              save); plain: the whole script body (load data/model, build trainer, train, save)
    run       align: the whole `run()` call (adds PartialState, preflight data check, recipe
              and metrics files, report.md + plots); plain: its whole script body

    python bench/sft_overhead.py [--rounds 3] [--steps 40] [--batch 16] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega apple river stone cloud "
         "green orange purple silver quick slow bright dark north south east west seven eleven").split()


# --------------------------------------------------------------------------- data and model


def make_data(path: Path, n: int, seed: int = 0):
    """Chat rows: 'reverse: w1 w2 ... wk' -> 'wk ... w2 w1' (a few dozen tokens each)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
            row = {"messages": [{"role": "user", "content": "reverse: " + " ".join(words)},
                                {"role": "assistant", "content": " ".join(reversed(words))}]}
            f.write(json.dumps(row) + "\n")


def write_yaml(path: Path, obj: dict):
    import yaml

    path.write_text(yaml.safe_dump(obj, sort_keys=False))


def build_model(work: Path, data: Path, env: dict) -> Path:
    """align's init stage (in a subprocess, like a user's `align run`)."""
    recipe = work / "init.yaml"
    write_yaml(recipe, {"name": "bench-init", "seed": 0, "output_dir": str(work / "init-run"), "stages": {
        "init": {"dataset": {"path": str(data)}, "vocab_size": 1024, "hidden_size": 192,
                 "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4}}})
    subprocess.run([sys.executable, "-m", "align", "run", str(recipe)], check=True, env=env, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    return work / "init-run" / "init"


# --------------------------------------------------------------------------- workers


class Clock:
    """Wall time of wrapped functions, per run (the same instrumentation on both sides)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def wrap(self, owner, attr: str, label: str):
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[label] = self.seconds.get(label, 0.0) + time.perf_counter() - t

        setattr(owner, attr, timed)


def worker(kind: str, threads: int):
    t_start = time.perf_counter()
    import torch

    torch.set_num_threads(threads)
    # The libraries both sides use, imported before any clock starts.
    import accelerate  # noqa: F401
    import datasets
    import transformers
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    clock = Clock()
    steps: list[float] = []
    cpu = {"train": 0.0}

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            steps.append(time.perf_counter() - self.t)

    init, train = SFTTrainer.__init__, SFTTrainer.train

    def init_with_timer(self, *a, **kw):
        init(self, *a, **kw)
        self.add_callback(StepTimer())

    def train_with_cpu(self, *a, **kw):
        c = time.process_time()
        try:
            return train(self, *a, **kw)
        finally:
            cpu["train"] += time.process_time() - c

    SFTTrainer.__init__, SFTTrainer.train = init_with_timer, train_with_cpu
    clock.wrap(SFTTrainer, "__init__", "trainer_init")
    clock.wrap(SFTTrainer, "train", "train_call")
    clock.wrap(SFTTrainer, "save_model", "save_model")
    if kind == "align":
        # What `python -m align run` has imported before it starts a run, plus the stage module.
        import align.cli  # noqa: F401
        import align.data
        import align.report
        import align.run
        import align.stages.sft
        from align.recipe import load_recipe

        clock.wrap(align.run, "_preflight", "preflight")
        clock.wrap(align.data, "load", "data_load")
        clock.wrap(align.stages.sft, "load_policy", "load_model")
        clock.wrap(align.report, "write_report", "report")
    print(f"READY {time.perf_counter() - t_start:.2f}", flush=True)

    for line in sys.stdin:
        spec = json.loads(line)
        clock.seconds.clear()
        steps.clear()
        cpu["train"] = 0.0
        out = Path(spec["out"])
        t0 = time.perf_counter()
        if kind == "align":
            align.run.run(load_recipe(spec["recipe"]))
            body = time.perf_counter() - t0
            metrics = json.loads((out / "sft" / "metrics.json").read_text())
            result = {"train_runtime": metrics["train_runtime"], "stage": metrics["stage_seconds"], "run": body,
                      "global_step": metrics["global_step"], "train_loss": metrics["train_loss"]}
        else:
            t = time.perf_counter()
            ds = datasets.load_dataset("json", data_files=spec["data"], split="train")
            clock.seconds["data_load"] = time.perf_counter() - t
            t = time.perf_counter()
            tokenizer = transformers.AutoTokenizer.from_pretrained(spec["model"])
            model = transformers.AutoModelForCausalLM.from_pretrained(spec["model"], dtype="auto")
            clock.seconds["load_model"] = time.perf_counter() - t
            args = SFTConfig(output_dir=str(out / "checkpoints"), **spec["sft_args"])
            trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
            res = trainer.train()
            trainer.save_model(str(out))
            tokenizer.save_pretrained(str(out))
            body = time.perf_counter() - t0
            result = {"train_runtime": res.metrics["train_runtime"], "stage": body, "run": body,
                      "global_step": trainer.state.global_step, "train_loss": res.training_loss}
        result["step"] = statistics.median(steps) if steps else float("nan")
        result["cpu"] = cpu["train"]
        result["parts"] = {k: round(v, 3) for k, v in clock.seconds.items()}
        result["threads"] = torch.get_num_threads()
        print("RESULT " + json.dumps(result), flush=True)


class Worker:
    def __init__(self, kind: str, threads: int, env: dict, log: Path):
        self.kind = kind
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", kind,
                                      "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True, env=env, cwd=REPO)
        self.startup = float(self._expect("READY "))

    def _expect(self, prefix: str) -> str:
        for line in self.proc.stdout:
            if line.startswith(prefix):
                return line[len(prefix):].strip()
        self.log.flush()
        sys.exit(f"{self.kind} worker died ({self.proc.wait()}); its stderr is in {self.log.name}:\n"
                 + Path(self.log.name).read_text()[-4000:])

    def run(self, spec: dict) -> dict:
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._expect("RESULT "))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()
        self.log.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in both workers (same for both)")
    parser.add_argument("--workdir", help="keep files here (default: a temporary folder)")
    parser.add_argument("--worker", choices=["align", "plain"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.threads)

    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="align-bench-sft-")
        work = Path(tmp.name)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(work / "hf-datasets-cache"), "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore",
           "MPLBACKEND": "Agg"}
    data = work / "sft.jsonl"
    make_data(data, args.rows)
    model = build_model(work, data, env)

    sft_args = {"use_cpu": True, "bf16": False, "seed": 0, "report_to": "none", "disable_tqdm": True,
                "per_device_train_batch_size": args.batch, "max_steps": args.steps, "learning_rate": 1e-3,
                "max_length": 128, "logging_steps": 5, "save_strategy": "steps", "save_steps": args.steps,
                "save_total_limit": 2, "ddp_find_unused_parameters": False, "assistant_only_loss": True}
    print(f"model {model}  data {data} ({args.rows} chat rows)  steps {args.steps}  batch {args.batch}  "
          f"torch threads {args.threads}  rounds {args.rounds}", flush=True)

    workers = {}
    for kind in ("align", "plain"):
        workers[kind] = Worker(kind, args.threads, env, work / f"{kind}-worker.log")
        print(f"{kind} worker start-up (interpreter + imports, not counted): {workers[kind].startup:.2f}s", flush=True)

    counter = [0]

    def once(kind: str) -> dict:
        counter[0] += 1
        out = work / f"{kind}-{counter[0]}"
        spec = {"out": str(out), "model": str(model), "data": str(data), "sft_args": sft_args}
        if kind == "align":
            recipe = work / f"align-{counter[0]}.yaml"
            write_yaml(recipe, {"name": "bench-sft", "seed": 0, "output_dir": str(out),
                                "stages": {"sft": {"model": str(model), "dataset": {"path": str(data)},
                                                   **sft_args}}})
            spec["recipe"] = str(recipe)
        return workers[kind].run(spec)

    def show(label: str, kind: str, r: dict):
        print(f"{label} {kind:<5}  train_runtime {r['train_runtime']:6.2f}s  step {r['step'] * 1000:6.1f}ms  "
              f"cpu {r['cpu']:6.2f}s  stage {r['stage']:6.2f}s  run {r['run']:6.2f}s  steps {r['global_step']}  "
              f"loss {r['train_loss']:.4f}  parts {r['parts']}", flush=True)

    for kind in ("align", "plain"):  # warm-up: not counted
        show("warm-up", kind, once(kind))
    runs = {"align": [], "plain": []}
    for i in range(args.rounds):
        for kind in (("align", "plain") if i % 2 == 0 else ("plain", "align")):
            r = once(kind)
            runs[kind].append(r)
            show(f"round {i + 1}", kind, r)
    for w in workers.values():
        w.close()

    def med(kind, key):
        return statistics.median(r[key] for r in runs[kind])

    print()
    for key, unit in (("train_runtime", "s"), ("step", "s"), ("cpu", "s"), ("stage", "s"), ("run", "s")):
        a, b = med("align", key), med("plain", key)
        print(f"median {key:<13}  align {a:8.3f}{unit}   plain TRL {b:8.3f}{unit}   difference {a - b:+7.3f}{unit}")
    for p in sorted({p for kind in runs for r in runs[kind] for p in r["parts"]}):
        a = statistics.median(r["parts"].get(p, 0.0) for r in runs["align"])
        b = statistics.median(r["parts"].get(p, 0.0) for r in runs["plain"])
        print(f"median part {p:<13} align {a:7.3f}s   plain TRL {b:7.3f}s")
    print()
    ratio = {key: med("align", key) / med("plain", key) for key in ("train_runtime", "step", "cpu", "stage", "run")}
    print(f"sft_trainer_time_ratio (align / plain TRL, train_runtime): {ratio['train_runtime']:.3f}  (goal <= 1.03)")
    print(f"sft_step_time_ratio (align / plain TRL, median step wall time): {ratio['step']:.3f}  (goal <= 1.03)")
    print(f"sft_train_cpu_ratio (align / plain TRL, CPU time of train()): {ratio['cpu']:.3f}  (goal <= 1.03)")
    print(f"sft_stage_ratio (align stage_seconds / plain script body): {ratio['stage']:.3f}  (goal <= 1.03)")
    print(f"sft_run_ratio (align whole run() incl. preflight + report / plain script body): {ratio['run']:.3f}  "
          f"(goal <= 1.03)")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
