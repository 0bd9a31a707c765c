"""Shared fixtures: tiny data on disk, a tiny initialised model, and a helper to run `align`.

Models here are a few hundred thousand parameters so the whole suite runs on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
torch.set_num_threads(1)

TINY_MODEL = {"vocab_size": 300, "hidden_size": 64, "intermediate_size": 128,
              "num_hidden_layers": 2, "num_attention_heads": 2}


def reverse_rows(n: int, seed: int = 0):
    """'reverse abc' -> 'cba': learnable by a tiny model in a few dozen steps."""
    rng = random.Random(seed)
    for _ in range(n):
        word = "".join(rng.choice("abcdef") for _ in range(rng.randint(2, 5)))
        yield f"reverse {word}", word[::-1]


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("data")
    pairs = list(reverse_rows(400))
    write_jsonl(d / "messages.jsonl", ({"messages": [{"role": "user", "content": p},
                                                     {"role": "assistant", "content": c}]} for p, c in pairs))
    write_jsonl(d / "prompt_completion.jsonl", ({"prompt": p, "completion": " " + c} for p, c in pairs))
    write_jsonl(d / "text.jsonl", ({"text": f"{p} = {c}."} for p, c in pairs))
    write_jsonl(d / "prompts.jsonl", ({"prompt": [{"role": "user", "content": p}]} for p, _ in pairs[:64]))
    write_jsonl(d / "prefs.jsonl", ({"prompt": [{"role": "user", "content": p}],
                                     "chosen": [{"role": "assistant", "content": c}],
                                     "rejected": [{"role": "assistant", "content": "I do not know"}]}
                                    for p, c in pairs))
    return d


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, data_dir) -> Path:
    """An initialised tiny Llama + tokenizer trained on the test data (the `init` stage)."""
    out = tmp_path_factory.mktemp("tiny")
    recipe = write_recipe(out / "init.yaml", out / "run", {
        "init": {"dataset": {"path": str(data_dir / "messages.jsonl")}, **TINY_MODEL}})
    run_align(["run", str(recipe)], check=True)
    return out / "run" / "init"


def write_recipe(path: Path, output_dir: Path, stages: dict, **top) -> Path:
    import yaml

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"name": "test", "seed": 0, "output_dir": str(output_dir), **top,
                                    "stages": stages}, sort_keys=False))
    return path


def run_align(args, *, check=False, launcher=None, env=None, timeout=900):
    """Run the real CLI in a subprocess, as a user would."""
    cmd = (launcher or [sys.executable, "-m", "align"]) + [str(a) for a in args]
    full_env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", **(env or {})}
    result = subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=REPO, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def read_metrics(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "metrics.json").read_text())


@pytest.fixture(scope="session")
def pretrained_model(tmp_path_factory, tiny_model, data_dir) -> Path:
    """The tiny model after a short causal-LM `pretrain` stage on plain text: a stand-in for a
    pretrained base (LoRA cannot move a randomly initialised LM head much)."""
    out = tmp_path_factory.mktemp("pretrained")
    recipe = write_recipe(out / "pretrain.yaml", out / "run", {"pretrain": {
        "model": str(tiny_model), "dataset": {"path": str(data_dir / "text.jsonl")}, "learning_rate": 3e-3,
        "max_steps": 60, "per_device_train_batch_size": 16, "save_strategy": "no", "logging_steps": 10}})
    run_align(["run", str(recipe)], check=True)
    return out / "run" / "pretrain"
