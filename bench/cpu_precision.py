"""bf16 on a CPU: the quickstart in fp32, with bf16 autocast and in pure bf16, speed and scores side by side.

Three runs of `recipes/quickstart.yaml`, each a fresh `align run` in its own folder (same seed):

    fp32      as shipped (align's CPU default)
    autocast  `bf16: true` on every training stage: fp32 weights and optimizer, matmuls in bf16
              under torch.autocast (TrainingArguments' switch; PPO's field of the same name)
    pure      `model: {dtype: bfloat16}` as well: weights, gradients and AdamW states in bf16

Prints each training stage's time as a ratio to fp32's, and the eval stage's gold scores, RM
score and reward-model pair accuracy per variant. bf16 matmuls need AVX512-BF16 / AMX to be
fast (`grep -o 'amx_bf16\\|avx512_bf16' /proc/cpuinfo`); without them bf16 is emulated and slow.

    python bench/cpu_precision.py [--variants fp32,autocast,pure] [--threads 1] [--keep DIR]

Stage seconds include loading and saving; a busy machine makes every figure noisy, ratios less so.
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
TRAINED = ("sft", "reward", "ppo", "dpo", "rloo")


def variant_recipe(name: str, out: Path) -> dict:
    recipe = yaml.safe_load((REPO / "recipes/quickstart.yaml").read_text())
    recipe["output_dir"] = str(out)
    if name in ("autocast", "pure"):
        for stage in TRAINED:
            recipe["stages"][stage]["bf16"] = True
    if name == "pure":  # the init stage writes fp32; every later stage loads it as bf16
        recipe["model"] = {"dtype": "bfloat16"}
    return recipe


def run_variant(name: str, work: Path, threads: int) -> dict:
    out = work / name
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(variant_recipe(name, out), sort_keys=False))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    with open(work / f"{name}.log", "w") as log:
        rc = subprocess.run([sys.executable, "-m", "align", "run", str(path)], cwd=REPO, env=env, stdout=log,
                            stderr=subprocess.STDOUT).returncode
    if rc:
        sys.exit(f"{name}: align run failed, see {work / f'{name}.log'}")
    seconds = {s: json.loads((out / s / "metrics.json").read_text())["stage_seconds"] for s in TRAINED}
    results = json.loads((out / "eval" / "eval.json").read_text())
    return {"seconds": seconds, "policies": results["policies"], "reward_model": results.get("reward_model") or {}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="fp32,autocast,pure")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--keep", help="work in this folder and keep it")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp(prefix="cpu-precision-"))
    work.mkdir(parents=True, exist_ok=True)
    names = args.variants.split(",")
    runs = {}
    for name in names:
        runs[name] = run_variant(name, work, args.threads)
        print(f"{name}: done", flush=True)
    base = runs[names[0]]
    print(f"\ntime per stage, ratio to {names[0]} (seconds of {names[0]} in brackets)")
    print(f"{'variant':<9}" + "".join(f"{s:>14}" for s in TRAINED))
    for name in names:
        cells = [f"{runs[name]['seconds'][s] / base['seconds'][s]:.2f}" for s in TRAINED]
        if name == names[0]:
            cells = [f"1.00 ({base['seconds'][s]:.0f}s)" for s in TRAINED]
        print(f"{name:<9}" + "".join(f"{c:>14}" for c in cells))
    print("\ngold score (RM score) per policy; reward-model pair accuracy")
    policies = list(base["policies"])
    print(f"{'variant':<9}" + "".join(f"{p:>16}" for p in policies) + f"{'RM acc':>9}")
    for name in names:
        pol = runs[name]["policies"]
        cells = [f"{pol[p].get('gold_score', float('nan')):.1f} ({pol[p].get('reward', float('nan')):+.2f})"
                 for p in policies]
        acc = runs[name]["reward_model"].get("pair_accuracy", float("nan"))
        print(f"{name:<9}" + "".join(f"{c:>16}" for c in cells) + f"{acc:>9.3f}")
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()
