"""Does `align plan` predict? Planned vs measured time per step and peak memory, per quickstart stage.

A copy of `recipes/quickstart.yaml` with fewer rows and few steps (sft and reward 30, dpo 20, ppo
and rloo 8; no eval stage) runs in a temporary folder:

  1. setup: the `task` and `init` stages (data, the 1.1M-parameter Llama and its tokenizer);
  2. plan: `align.plan.plan_recipe` in a fresh process, once the data and tokenizer exist (so the
     planner can read real sequence lengths), with `--flops-per-second` unset: on CPU the
     planner times a matmul probe itself;
  3. measure: each of sft, reward, ppo, dpo, rloo in a fresh `align run --stage` process.

Measured, per stage:
  time    the median time of one training step: the interval between consecutive step ends
          (the transformers Trainer's `on_step_end` callbacks for TRL stages: forward, backward,
          optimizer step, data collation, RLOO's generation and scoring; the PPO trainer's
          per-step log record: rollout + update), the first step dropped (lazy initialisation).
          Each interval counts as the smaller of its wall time and the process's CPU time per
          thread, as the planner's probes count (align.estimate.compute.busy_seconds): on this
          shared machine wall time mostly measures the other jobs (load averages of 5-9 on 2
          cores), CPU time the run's own work; with one thread on an idle machine they agree.
          The median wall time is printed too.
  memory  the peak resident set of the stage's process (`ru_maxrss` of that child, from
          os.wait4). The bench's own process imports nothing heavy, so the child's peak is its own.

Planned: the stage's `seconds` / steps and its `total` memory per device. On CPU the plan adds
`runtime`, the resident set of a process with the stage's libraries imported, which the planner
measures in its own process: process RSS is what the user sees, and the Python/torch/TRL runtime
(~0.5 GiB) is most of it for a small model.

Threads: every process gets OMP_NUM_THREADS (default 1, `--threads` to change): the machine is
shared, and the planner's probe must see the same thread setting as the training processes.

    python bench/plan_accuracy.py [--threads 1] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = {"sft": 30, "reward": 30, "ppo": 8, "dpo": 20, "rloo": 8}
MEASURED = ("sft", "reward", "ppo", "dpo", "rloo")


def bench_recipe(out: Path) -> dict:
    """The quickstart with fewer rows and STEPS steps per stage, no checkpoints, no eval."""
    import yaml

    recipe = yaml.safe_load((REPO / "recipes/quickstart.yaml").read_text())
    recipe["output_dir"] = str(out)
    stages = recipe["stages"]
    stages.pop("eval")
    stages["task"].update(n_sft=3000, n_pairs=1500, n_prompts=400, n_eval=50)
    for name, steps in STEPS.items():
        block = stages[name]
        block.pop("num_train_epochs", None)
        block["num_train_steps" if name == "ppo" else "max_steps"] = steps
        block["save_steps"] = 10_000
        block["logging_steps"] = 1
        block.pop("warmup_steps", None)
        for key in ("eval_dataset", "judge", "eval_steps", "per_device_eval_batch_size"):
            block.pop(key, None)  # held-out points are not training steps
    return recipe


def child_env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "TRANSFORMERS_VERBOSITY": "error", "PYTHONPATH": str(REPO)}


def run_child(args: list[str], env: dict, log: Path) -> tuple[int, int]:
    """(exit status, peak RSS in bytes) of one child process."""
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024  # Linux: KiB


# --------------------------------------------------------------------------- the child processes


def stage_worker(recipe: str, stage: str, times_file: str):
    """Run one stage with `align run --stage`, recording wall and CPU time when every step ends:
    the Trainer's `on_step_end` callbacks (TRL stages), the PPO trainer's per-step log record."""
    from transformers import trainer_callback

    from align.ppo.trainer import PPOTrainer

    ends: list[tuple[float, float]] = []

    def recording(original):
        def wrapper(*args, **kwargs):
            ends.append((time.perf_counter(), time.process_time()))
            return original(*args, **kwargs)
        return wrapper

    trainer_callback.CallbackHandler.on_step_end = recording(trainer_callback.CallbackHandler.on_step_end)
    PPOTrainer._write_log = recording(PPOTrainer._write_log)
    from align.cli import main

    try:
        main(["run", recipe, "--stage", stage])
    finally:
        Path(times_file).write_text(json.dumps([(b[0] - a[0], b[1] - a[1]) for a, b in zip(ends, ends[1:])]))


def plan_worker(recipe: str, out: str):
    from align.plan import plan_recipe
    from align.recipe import load_recipe

    rows = plan_recipe(load_recipe(recipe))
    keep = ("name", "seconds", "steps", "step_seconds", "total", "runtime", "flops", "seq_len", "notes")
    Path(out).write_text(json.dumps([{k: r.get(k) for k in keep} for r in rows], default=str))


# --------------------------------------------------------------------------- the bench


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", help="work in this folder and keep it")
    args = parser.parse_args()
    env = child_env(args.threads)
    work = Path(args.keep or tempfile.mkdtemp(prefix="plan-accuracy-"))
    work.mkdir(parents=True, exist_ok=True)
    import yaml

    recipe = work / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(bench_recipe(work / "run"), sort_keys=False))

    for stage in ("task", "init"):
        rc, _ = run_child(["-m", "align", "run", str(recipe), "--stage", stage], env, work / f"{stage}.log")
        if rc:
            sys.exit(f"setup stage {stage} failed: see {work / f'{stage}.log'}")

    rc, _ = run_child([__file__, "--plan-worker", str(recipe), str(work / "plan.json")], env, work / "plan.log")
    if rc:
        sys.exit(f"plan failed: see {work / 'plan.log'}")
    plan = {r["name"]: r for r in json.loads((work / "plan.json").read_text())}

    print(f"{'stage':<7} {'time':>5} {'memory':>7}   planned/measured: s/step (busy), MiB peak RSS")
    for stage in MEASURED:
        times = work / f"{stage}.times.json"
        rc, peak = run_child([__file__, "--stage-worker", str(recipe), stage, str(times)], env,
                             work / f"{stage}.log")
        if rc:
            sys.exit(f"stage {stage} failed: see {work / f'{stage}.log'}")
        steps = json.loads(times.read_text())  # (wall, CPU) seconds between step ends: the first step dropped
        wall = statistics.median(w for w, _ in steps)
        measured_step = statistics.median(min(w, c / args.threads) for w, c in steps)
        row = plan[stage]
        planned_step = row["seconds"] / row["steps"]
        planned_mem = row["total"] + (row.get("runtime") or 0)
        print(f"{stage:<7} {planned_step / measured_step:5.2f} {planned_mem / peak:7.2f}   "
              f"{planned_step:.3f}/{measured_step:.3f} s (wall {wall:.3f} s), "
              f"{planned_mem / 2**20:.0f}/{peak / 2**20:.0f} MiB", flush=True)
    print(f"work folder: {work}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--stage-worker"]:
        stage_worker(*sys.argv[2:5])
    elif sys.argv[1:2] == ["--plan-worker"]:
        plan_worker(*sys.argv[2:4])
    else:
        main()
