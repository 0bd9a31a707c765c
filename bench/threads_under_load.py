"""The thread cliff: the first 60 quickstart SFT steps idle and beside a busy process.

Four runs of the same SFT stage (the quickstart's model and data, 60 steps), each a fresh
`align run` in a subprocess:

    torch default   2 threads spinning while they wait (OMP_NUM_THREADS=<cpus>, OMP_WAIT_POLICY unset)
    align           what align chooses (align/threads.py: passive waiting, free CPUs only)

each idle and beside one CPU-bound process (a Python busy loop). Prints the training time of each
and the ratios: align busy / align idle (goal <= 2.0), align idle / torch-default idle (goal <= 1,
no slower when idle), and the cliff it avoids (torch-default busy / idle).

    python bench/threads_under_load.py [--steps 60]

Needs a quiet machine for the idle runs: other load shows up as noise in every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def align_run(recipe: Path, env: dict) -> None:
    full = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    full.update(env)
    result = subprocess.run([sys.executable, "-m", "align", "run", str(recipe)], cwd=REPO, env=full,
                            capture_output=True, text=True)
    if result.returncode:
        sys.exit(f"align run {recipe} failed:\n{result.stderr[-3000:]}")


def write_recipe(path: Path, out: Path, stages: dict) -> Path:
    path.write_text(yaml.safe_dump({"name": "bench", "seed": 42, "output_dir": str(out), "stages": stages},
                                   sort_keys=False))  # stages run in the order written
    return path


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    quickstart = yaml.safe_load((REPO / "recipes" / "quickstart.yaml").read_text())["stages"]
    cpus = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="align-threads-") as tmp:
        tmp = Path(tmp)
        base = tmp / "base"
        align_run(write_recipe(tmp / "base.yaml", base, {"task": quickstart["task"], "init": quickstart["init"]}),
                  {"OMP_NUM_THREADS": "1"})
        sft = {**quickstart["sft"], "model": str(base / "init"), "dataset": {"path": str(base / "task" / "sft.jsonl")},
               "max_steps": args.steps, "save_strategy": "no", "logging_steps": args.steps}
        variants = {"torch default": {"OMP_NUM_THREADS": str(cpus), "OMP_WAIT_POLICY": ""}, "align": {}}
        seconds = {}
        for load in ("idle", "busy"):
            busy = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if load == "busy" else None
            try:
                for name, env in variants.items():
                    out = tmp / f"{name.replace(' ', '-')}-{load}"
                    align_run(write_recipe(tmp / f"{out.name}.yaml", out, {"sft": sft}), env)
                    seconds[name, load] = json.loads((out / "sft" / "metrics.json").read_text())["train_runtime"]
                    print(f"{name:<14} {load:<5} {args.steps} SFT steps: {seconds[name, load]:6.1f} s", flush=True)
            finally:
                if busy is not None:
                    busy.kill()
    print(f"threads_busy_idle_ratio (align, beside one busy process / idle): "
          f"{seconds['align', 'busy'] / seconds['align', 'idle']:.2f}  (goal <= 2.0)")
    print(f"threads_idle_ratio (align / torch default, idle): "
          f"{seconds['align', 'idle'] / seconds['torch default', 'idle']:.2f}  (goal <= 1.0)")
    print(f"the cliff avoided (torch default, busy / idle): "
          f"{seconds['torch default', 'busy'] / seconds['torch default', 'idle']:.2f}")


if __name__ == "__main__":
    main()
