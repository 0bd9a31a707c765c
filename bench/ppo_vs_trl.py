"""align's PPO against TRL 1.12's PPOTrainer: time per PPO step, and peak memory of the layouts.

1. Speed. TRL dropped its PPOTrainer after 1.12, so TRL 1.12 is installed into a throw-away
   virtualenv OUTSIDE the project (default /tmp/align-bench-trl112; reused when it already
   imports `trl.experimental.ppo`): `python -m venv` + `pip install torch==2.13.0 "trl==1.12.*"`,
   pip resolving the transformers / accelerate / datasets versions TRL 1.12 accepts. It is never
   a project dependency. Needs PyPI unless the virtualenv exists.
   On one tiny Llama-style policy (built here with `align.models.train_tokenizer` +
   `init_model`), the same text prompts, rollout batch, response length, temperature, PPO
   epochs (4) and minibatches (1), fp32 on CPU, one torch thread each, it times PPO steps
   (one rollout batch + its 4 optimizer steps) of
       trl     TRL 1.12 PPOTrainer (subprocess in the TRL virtualenv): policy, reference, value
               model and reward model, four separate full models; gradient checkpointing off
               (TRL's PPOConfig defaults it on; align's default is off) and stop at EOS
       lora    align's PPO stage, shared-base layout (`peft: {r: 16, lora_alpha: 32}`, the
               stage docs' example); the reward model is a SEQ_CLS LoRA adapter on the same
               base (what align's reward stage with `peft:` writes), so one base serves all roles
       lora_vhp  the same with `value_head_on_policy: true`: the critic is a value head on the
               policy adapter's hidden states (TRL 0.x's AutoModelForCausalLMWithValueHead
               design), so one pass per micro-batch serves policy and critic
       full    align's PPO stage, separate layout (no `peft:`), the same full reward model as TRL
   Each is its own subprocess; a step's time is measured between the ends of consecutive
   steps (the same way in both), the first step (warm-up) is dropped and the median is taken,
   in wall time and in process CPU time (the machine's cores are shared with other jobs).

2. Memory. For a bigger model (~45M parameters, so weights dominate), align's PPO stage runs one
   PPO step in a fresh subprocess per layout and reads its own peak RSS (`VmHWM` in
   /proc/self/status): the shared-base LoRA layout against align's separate layout, which holds
   four full models (policy + Adam, reference, critic + Adam, reward). TRL 1.12's peak for the
   same step (its four separate models) is printed too, for information.

    python bench/ppo_vs_trl.py [--steps 5] [--batch 8] [--response-length 53] [--skip-trl]
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
TRL_VENV = Path("/tmp/align-bench-trl112")
TRL_PINS = ["torch==2.13.0", "trl==1.12.*"]
WORDS = ("the a river stone cloud green orange quick slow bright dark north south seven eleven tell me "
         "about story write poem why how what when kind small large old new happy sad").split()


def peak_rss_mb() -> tuple[float, float]:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value.strip()
    return int(fields["VmHWM"].split()[0]) / 1024, int(fields["VmRSS"].split()[0]) / 1024


class Phases:
    """Step-end marks (wall, CPU) and the wall time of wrapped phases within each step: the same
    bookkeeping in both children."""

    def __init__(self):
        self.marks: list[tuple[float, float]] = []
        self.current: dict[str, float] = {}
        self.per_step: list[dict[str, float]] = []

    def mark(self, first: bool = False):
        self.marks.append((time.perf_counter(), time.process_time()))
        if not first:
            self.per_step.append(self.current)
        self.current = {}

    def wrap(self, owner, attr: str, label, grad_split: bool = False):
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            name = label
            if grad_split:
                import torch

                name = label + ("_grad" if torch.is_grad_enabled() else "_nograd")
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.current[name] = self.current.get(name, 0.0) + time.perf_counter() - t

        setattr(owner, attr, timed)

    def result(self) -> dict:
        return {"marks": self.marks, "phases": self.per_step}


# --------------------------------------------------------------------------- building (project venv)


def build_models(work: Path, args) -> dict:
    """Tokenizer, prompts, and for each size: policy, a full reward model and a LoRA reward adapter."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification

    from align import models

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) for _ in range(3000)]
    tokenizer = models.train_tokenizer(texts, vocab_size=2048)
    prompts = work / "prompts.jsonl"
    with open(prompts, "w") as f:
        for text in texts[:256]:
            f.write(json.dumps({"prompt": text}) + "\n")
    paths = {"prompts": str(prompts)}
    sizes = {"small": (args.hidden, args.layers), "big": (args.mem_hidden, args.mem_layers)}
    for size, (hidden, layers) in sizes.items():
        torch.manual_seed(0)
        policy = models.init_model({"hidden_size": hidden, "intermediate_size": 4 * hidden,
                                    "num_hidden_layers": layers, "num_attention_heads": hidden // 64}, tokenizer)
        policy_dir = work / f"{size}-policy"
        policy.save_pretrained(policy_dir, safe_serialization=True)
        tokenizer.save_pretrained(policy_dir)
        n = sum(p.numel() for p in policy.parameters())
        del policy
        # Reward model: a one-logit classifier on the policy's body (random head), saved both as a
        # full model (TRL, align's separate layout) and as a SEQ_CLS LoRA adapter on the policy
        # (align's shared layout): identical weights, the adapter's lora_B being zero.
        torch.manual_seed(1)
        reward = AutoModelForSequenceClassification.from_pretrained(str(policy_dir), num_labels=1)
        reward.config.pad_token_id = tokenizer.pad_token_id
        reward_full = work / f"{size}-reward-full"
        reward.save_pretrained(reward_full, safe_serialization=True)
        tokenizer.save_pretrained(reward_full)
        adapter = get_peft_model(reward, LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32))
        reward_lora = work / f"{size}-reward-lora"
        adapter.save_pretrained(reward_lora)
        tokenizer.save_pretrained(reward_lora)
        del reward, adapter
        paths[size] = {"policy": str(policy_dir), "reward_full": str(reward_full), "reward_lora": str(reward_lora),
                       "parameters": n, "hidden": hidden, "layers": layers}
    return paths


# --------------------------------------------------------------------------- align child (project venv)


def align_child(spec: dict):
    import torch

    torch.set_num_threads(spec["threads"])
    import align.ppo.trainer as ppo_trainer
    import align.run
    from align.ppo.rollout import Sampler
    from align.recipe import build_recipe

    phases = Phases()
    cls = ppo_trainer.PPOTrainer
    train, write_log = cls.train, cls._write_log

    def timed_train(self, *a, **kw):
        phases.mark(first=True)
        return train(self, *a, **kw)

    def marked_write_log(self, record):  # called once at the end of every step
        phases.mark()
        return write_log(self, record)

    cls.train, cls._write_log = timed_train, marked_write_log
    phases.wrap(Sampler, "generate", "generate")
    phases.wrap(cls, "rollout", "rollout")
    phases.wrap(cls, "ppo_update", "update")
    stage = {"model": spec["policy"], "dataset": {"path": spec["prompts"]}, "reward_model": spec["reward"],
             **spec["ppo"]}
    if spec.get("peft"):
        stage["peft"] = spec["peft"]
    recipe = build_recipe({"name": "bench-ppo", "seed": 0, "output_dir": spec["out"], "stages": {"ppo": stage}})
    align.run.run(recipe)
    hwm, rss = peak_rss_mb()
    history = [json.loads(x) for x in (Path(spec["out"]) / "ppo" / "log_history.jsonl").read_text().splitlines()]
    print("RESULT " + json.dumps({**phases.result(), "peak_rss_mb": hwm, "rss_mb": rss,
                                  "response_length": statistics.mean(h["response_length"] for h in history),
                                  "optimizer_steps": sum(h["optimizer_steps"] for h in history)}), flush=True)


# --------------------------------------------------------------------------- TRL child (TRL 1.12 venv)


def trl_child(spec: dict):
    import torch

    torch.set_num_threads(spec["threads"])
    import warnings

    warnings.filterwarnings("ignore")
    from datasets import load_dataset
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              TrainerCallback)
    import trl.experimental.ppo.ppo_trainer as ppo_module
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    phases = Phases()
    lengths: list[float] = []
    phases.wrap(ppo_module, "batch_generation", "generate")
    phases.wrap(ppo_module, "get_reward", "score")
    phases.wrap(ppo_module, "forward", "forward", grad_split=True)

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            phases.mark(first=True)

        def on_step_end(self, args, state, control, **kw):
            phases.mark()

    tok = AutoTokenizer.from_pretrained(spec["policy"])
    tok.padding_side = "left"
    ds = load_dataset("json", data_files=spec["prompts"], split="train")
    ds = ds.map(lambda row: {"input_ids": tok(row["prompt"])["input_ids"]}, remove_columns=["prompt"])
    policy = AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    peft_config = None
    if spec.get("peft"):  # TRL's own LoRA path: the reference is the policy with its adapter disabled
        from peft import LoraConfig

        peft_config = LoraConfig(task_type="CAUSAL_LM", **spec["peft"])
    ref = None if peft_config else AutoModelForCausalLM.from_pretrained(spec["policy"], dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(spec["reward"], num_labels=1, dtype=torch.float32)
    p = spec["ppo"]
    config = PPOConfig(
        output_dir=spec["out"], per_device_train_batch_size=p["per_device_train_batch_size"],
        gradient_accumulation_steps=1, num_mini_batches=p["num_mini_batches"], num_ppo_epochs=p["num_ppo_epochs"],
        response_length=p["response_length"], temperature=p["temperature"], kl_coef=p["kl_coef"],
        learning_rate=p["learning_rate"], total_episodes=p["num_train_steps"] * p["per_device_train_batch_size"],
        local_rollout_forward_batch_size=p["per_device_train_batch_size"], stop_token="eos",
        num_sample_generations=0, save_strategy="no", report_to="none", use_cpu=True, bf16=False,
        gradient_checkpointing=False, logging_steps=1, seed=0, disable_tqdm=True)

    class Lengths(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "val/num_eos_tokens" in logs:
                lengths.append(logs["val/num_eos_tokens"])

    trainer = PPOTrainer(args=config, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         train_dataset=ds, value_model=value, callbacks=[StepTimer(), Lengths()],
                         peft_config=peft_config)
    trainer.train()
    hwm, rss = peak_rss_mb()
    print("RESULT " + json.dumps({**phases.result(), "peak_rss_mb": hwm, "rss_mb": rss,
                                  "eos_per_step": statistics.mean(lengths) if lengths else None}), flush=True)


# --------------------------------------------------------------------------- parent


def ensure_trl_venv(venv: Path) -> tuple[Path | None, str]:
    """The TRL 1.12 interpreter, or (None, why not)."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import trl, transformers; assert trl.__version__.startswith('1.12'), trl.__version__; "
             "from trl.experimental.ppo import PPOTrainer; print(trl.__version__, transformers.__version__)"]
    env = {**os.environ, "TRL_EXPERIMENTAL_SILENCE": "1"}
    if python.exists():
        ok = subprocess.run(probe, capture_output=True, text=True, env=env)
        if ok.returncode == 0:
            return python, f"reusing {venv} (trl, transformers = {ok.stdout.strip()})"
    print(f"creating {venv} and installing {' '.join(TRL_PINS)} (PyPI) ...", flush=True)
    steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
             [str(python), "-m", "pip", "install", "--quiet", *TRL_PINS]]
    for cmd in steps:
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return None, f"`{' '.join(cmd)}` did not finish in 15 minutes"
        if done.returncode != 0:
            err = [line for line in (done.stderr or done.stdout).splitlines() if line.strip()
                   and not line.startswith("WARNING: Location")]
            return None, f"`{' '.join(cmd)}` failed ({done.returncode}): " + " | ".join(err[-5:])
    ok = subprocess.run(probe, capture_output=True, text=True, env=env)
    if ok.returncode != 0:
        return None, "TRL 1.12 installed but `from trl.experimental.ppo import PPOTrainer` fails: " + \
            (ok.stderr.strip().splitlines() or ["?"])[-1]
    return python, f"installed into {venv} (trl, transformers = {ok.stdout.strip()})"


def run_child(python: Path, mode: str, spec: dict, work: Path, env: dict) -> dict:
    spec_path = work / f"spec-{spec['name']}.json"
    spec_path.write_text(json.dumps(spec))
    t = time.perf_counter()
    proc = subprocess.run([str(python), str(Path(__file__).resolve()), f"--{mode}-child", str(spec_path)],
                          capture_output=True, text=True, env=env, cwd=REPO)
    (work / f"{spec['name']}.log").write_text(proc.stdout + "\n" + proc.stderr)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = [x for x in proc.stderr.splitlines() if x.strip()][-8:]
        raise RuntimeError(f"{spec['name']} failed ({proc.returncode}): " + "\n".join(tail))
    result = json.loads(lines[-1][len("RESULT "):])
    result["wall"] = time.perf_counter() - t
    marks = result["marks"]
    result["steps_wall"] = [b[0] - a[0] for a, b in zip(marks, marks[1:])]
    result["steps_cpu"] = [b[1] - a[1] for a, b in zip(marks, marks[1:])]
    measured = slice(1, None) if len(marks) > 2 else slice(0, None)  # drop the warm-up step
    result["step_wall"] = statistics.median(result["steps_wall"][measured])
    result["step_cpu"] = statistics.median(result["steps_cpu"][measured])
    # Per step: generation, the rollout's no-grad forward passes (policy/critic, reference,
    # reward), and the PPO update (forward + backward + optimizer, 4 epochs); medians.
    steps = result["phases"][measured]
    wall = result["steps_wall"][measured]
    if mode == "align":
        parts = [(p.get("generate", 0), p.get("rollout", 0) - p.get("generate", 0), p.get("update", 0)) for p in steps]
    else:
        parts = [(p.get("generate", 0), p.get("score", 0) + p.get("forward_nograd", 0),
                  w - p.get("generate", 0) - p.get("score", 0) - p.get("forward_nograd", 0))
                 for p, w in zip(steps, wall)]
    result["split"] = [statistics.median(x[i] for x in parts) for i in range(3)]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="PPO steps per speed run (the first is dropped)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per rollout batch (8: both trainers' default)")
    parser.add_argument("--response-length", type=int, default=53, help="53: the default of both trainers")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--mem-hidden", type=int, default=512)
    parser.add_argument("--mem-layers", type=int, default=11)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--trl-venv", default=str(TRL_VENV))
    parser.add_argument("--skip-trl", action="store_true")
    parser.add_argument("--no-memory", action="store_true", help="speed runs only")
    parser.add_argument("--workdir", help="keep files here (default: a temporary folder)")
    parser.add_argument("--align-child", help=argparse.SUPPRESS)
    parser.add_argument("--trl-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.align_child:
        return align_child(json.loads(Path(args.align_child).read_text()))
    if args.trl_child:
        return trl_child(json.loads(Path(args.trl_child).read_text()))

    tmp = None
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="align-bench-ppo-")
        work = Path(tmp.name)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(work / "hf-datasets-cache"), "OMP_NUM_THREADS": str(args.threads),
           "MKL_NUM_THREADS": str(args.threads), "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore",
           "TRL_EXPERIMENTAL_SILENCE": "1", "MPLBACKEND": "Agg"}
    os.environ.update({k: env[k] for k in ("TOKENIZERS_PARALLELISM", "TRANSFORMERS_VERBOSITY", "HF_HUB_OFFLINE")})
    sys.path.insert(0, str(REPO))
    import warnings

    warnings.filterwarnings("ignore")
    import transformers

    transformers.utils.logging.disable_progress_bar()

    # Start with TRL's virtualenv: if it must be installed, that is the slow part.
    trl_python, trl_note = (None, "skipped (--skip-trl)") if args.skip_trl else ensure_trl_venv(Path(args.trl_venv))
    print(f"TRL 1.12: {trl_note}", flush=True)

    paths = build_models(work, args)
    small, big = paths["small"], paths["big"]
    ppo = {"per_device_train_batch_size": args.batch, "num_mini_batches": 1, "gradient_accumulation_steps": 1,
           "num_ppo_epochs": 4, "response_length": args.response_length, "temperature": 0.7, "kl_coef": 0.05,
           "learning_rate": 3e-6, "num_train_steps": args.steps, "save_steps": 0, "sample_generations_every": 0,
           "logging_steps": 1}
    lora = {"r": 16, "lora_alpha": 32}
    print(f"speed model: {small['parameters'] / 1e6:.1f}M parameters (hidden {small['hidden']}, {small['layers']} "
          f"layers)  batch {args.batch} prompts  response_length {args.response_length}  4 PPO epochs x 1 minibatch  "
          f"{args.steps} steps (first dropped)  torch threads {args.threads}", flush=True)

    def spec(name, model, reward, steps_cfg, peft=None):
        return {"name": name, "threads": args.threads, "out": str(work / name), "policy": model["policy"],
                "reward": model[reward], "prompts": paths["prompts"], "ppo": steps_cfg, "peft": peft}

    speed = {}
    if trl_python is not None:
        try:
            speed["trl"] = run_child(trl_python, "trl", spec("trl", small, "reward_full", ppo), work, env)
        except RuntimeError as e:
            trl_note = f"TRL 1.12 PPOTrainer could not run here: {e}"
            print(trl_note, flush=True)
        try:
            speed["trl_lora"] = run_child(trl_python, "trl", spec("trl-lora", small, "reward_full", ppo, lora), work,
                                          env)
        except RuntimeError as e:
            print(f"TRL 1.12 PPOTrainer with peft_config could not run here: {e}", flush=True)
    speed["lora"] = run_child(Path(sys.executable), "align", spec("align-lora", small, "reward_lora", ppo, lora),
                              work, env)
    speed["lora_vhp"] = run_child(Path(sys.executable), "align", spec("align-lora-vhp", small, "reward_lora",
                                                                      {**ppo, "value_head_on_policy": True}, lora),
                                  work, env)
    speed["full"] = run_child(Path(sys.executable), "align", spec("align-full", small, "reward_full", ppo), work, env)
    labels = {"trl": "TRL 1.12 PPOTrainer (4 full models)", "trl_lora": "TRL 1.12 PPOTrainer, LoRA policy", "lora": "align PPO, shared-base LoRA",
              "lora_vhp": "align PPO, LoRA, value_head_on_policy", "full": "align PPO, separate full models"}
    for key, r in speed.items():
        extra = (f"mean response length {r['response_length']:.1f}, optimizer steps {r['optimizer_steps']}"
                 if "response_length" in r else f"EOS tokens per step {r['eos_per_step']}")
        g, f, u = r["split"]
        print(f"{labels[key]:<38} step wall {r['step_wall']:6.2f}s  step cpu {r['step_cpu']:6.2f}s  "
              f"[generate {g:5.2f}s  rollout forwards {f:5.2f}s  update {u:5.2f}s]  "
              f"(all steps wall {[round(s, 2) for s in r['steps_wall']]})  {extra}", flush=True)

    mem = {}
    if not args.no_memory:  # one PPO step of the big model per layout, each in a fresh process
        mem_ppo = {**ppo, "per_device_train_batch_size": 4, "response_length": 16, "num_train_steps": 1}
        print(f"\nmemory model: {big['parameters'] / 1e6:.1f}M parameters (hidden {big['hidden']}, {big['layers']} layers, "
              f"{big['parameters'] * 4 / 2**20:.0f} MiB of fp32 weights); one PPO step, batch 4, response 16", flush=True)
        mem = {"lora": run_child(Path(sys.executable), "align", spec("mem-lora", big, "reward_lora", mem_ppo, lora),
                                 work, env),
               "lora_vhp": run_child(Path(sys.executable), "align",
                                     spec("mem-lora-vhp", big, "reward_lora", {**mem_ppo, "value_head_on_policy": True},
                                          lora), work, env),
               "full": run_child(Path(sys.executable), "align", spec("mem-full", big, "reward_full", mem_ppo), work, env)}
        if "trl" in speed:  # for information: TRL's four separate models on the same big model
            try:
                mem["trl"] = run_child(trl_python, "trl", spec("mem-trl", big, "reward_full", mem_ppo), work, env)
            except RuntimeError as e:
                print(f"TRL 1.12 memory run failed: {e}", flush=True)
        for key, r in mem.items():
            print(f"{labels[key]:<38} peak RSS (VmHWM) {r['peak_rss_mb']:8.0f} MiB", flush=True)

    print()
    goals = {"lora": 0.5, "lora_vhp": 0.5, "full": 0.7}
    if "trl" in speed:
        for key in ("lora", "lora_vhp", "full"):
            wall = speed[key]["step_wall"] / speed["trl"]["step_wall"]
            cpu = speed[key]["step_cpu"] / speed["trl"]["step_cpu"]
            print(f"ppo_step_time_ratio ({labels[key]} / TRL 1.12): wall {wall:.2f}  cpu {cpu:.2f}  "
                  f"(goal <= {goals[key]})")
    else:
        print(f"ppo_step_time_ratio (align / TRL 1.12): not measured: {trl_note}")
    if "trl_lora" in speed:
        for key in ("lora", "lora_vhp"):
            wall = speed[key]["step_wall"] / speed["trl_lora"]["step_wall"]
            cpu = speed[key]["step_cpu"] / speed["trl_lora"]["step_cpu"]
            print(f"ppo_step_time_ratio ({labels[key]} / TRL 1.12 with LoRA): wall {wall:.2f}  cpu {cpu:.2f}  "
                  f"(goal <= 0.6)")
    if not mem:
        return tmp.cleanup() if tmp is not None else None
    print(f"ppo_peak_rss_ratio (shared-base LoRA / four separate full models, {big['parameters'] / 1e6:.0f}M params): "
          f"{mem['lora']['peak_rss_mb'] / mem['full']['peak_rss_mb']:.2f}  (goal <= 0.4)")
    print(f"ppo_peak_rss_ratio (LoRA with value_head_on_policy / four separate full models): "
          f"{mem['lora_vhp']['peak_rss_mb'] / mem['full']['peak_rss_mb']:.2f}")
    if "trl" in mem:
        print(f"ppo_peak_rss_ratio_vs_trl (shared-base LoRA / TRL 1.12's four models, for information): "
              f"{mem['lora']['peak_rss_mb'] / mem['trl']['peak_rss_mb']:.2f}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
