"""PPO with a critic and a KL penalty to the SFT policy: the RL step of InstructGPT.

    ppo:
      dataset: {path: data/prompts.jsonl}    # prompt-only rows: text or chat messages
      model: ${sft}                          # default: the latest earlier policy stage
      reward_model: ${reward}                # any one-logit sequence classifier (or adapter)
      reward_funcs: align.task:judge_reward  # and/or Python functions (TRL's signature)
      reward_weights: [1.0, 0.5]             # reward_model first, then reward_funcs in order
      value_model: ${reward}                 # what the critic starts from (default: reward_model)
      value_head_on_policy: false            # true: the critic is a head on the policy (one pass)
      peft: {r: 16, lora_alpha: 32}          # LoRA: one base model serves every role
      learning_rate: 1.0e-5                  # any PPOConfig field (align/ppo/config.py)

Outputs in the stage folder: the policy (a LoRA adapter or a full model) and its tokenizer,
loadable like an SFT output; the critic in `critic/` (loadable as a reward model);
`log_history.jsonl` (one JSON line per step), `samples.md` (sample generations) and
`checkpoints/checkpoint-N` (resumed from automatically).
"""

from __future__ import annotations

import importlib
import os
import sys

from align import data, models
from align.errors import AlignError
from align.ppo.config import PPOConfig as Config  # noqa: F401  (the stage's config class)
from align.training import check_training_fields, peft_config

OPTIONS = {"model", "dataset", "peft", "quantization", "reward_model", "reward_funcs", "value_model"}
DATA_KIND = "prompt"


def validate(stage, model):
    where = f"stages.{stage.name}"
    check_training_fields(stage)
    try:
        stage.config()
    except (ValueError, TypeError) as e:
        raise AlignError(f"{where}.{models.first_line(e)}") from None
    peft = stage.options.get("peft")
    if isinstance(peft, dict) and str(peft.get("method", "lora")).lower() != "lora":
        raise AlignError(f"{where}.peft.method: PPO shares one base model between its roles through LoRA "
                         f"adapters; use method: lora (got {peft['method']})")
    specs = reward_func_specs(stage)
    if stage.options.get("value_model") and stage.args.get("value_head_on_policy"):
        raise AlignError(f"{where}.value_model: with value_head_on_policy: true the critic is a head on the policy; "
                         f"remove value_model or set value_head_on_policy: false")
    for key in ("reward_model", "value_model", "model"):
        value = stage.options.get(key)
        if value is not None and (not isinstance(value, str) or not value):
            raise AlignError(f"{where}.{key}: expected a model path or Hub id, got {value!r}")
    if not stage.options.get("reward_model") and not specs:
        raise AlignError(f"{where}.reward_model: PPO needs a reward: set `reward_model: ${{reward}}` (a sequence "
                         f"classifier) and/or `reward_funcs: module:function`")
    for spec in specs:
        import_reward_func(spec, f"{where}.reward_funcs")
    weights = stage.args.get("reward_weights")
    sources = int(bool(stage.options.get("reward_model"))) + len(specs)
    if weights is not None and len(weights) != sources:
        raise AlignError(f"{where}.reward_weights: {len(weights)} weights for {sources} reward sources "
                         f"(reward_model first, then reward_funcs in order)")


def reward_func_specs(stage) -> list[str]:
    value = stage.options.get("reward_funcs")
    if value is None:
        return []
    specs = [value] if isinstance(value, str) else value
    if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
        raise AlignError(f"stages.{stage.name}.reward_funcs: expected 'module:function' or a list of them")
    return specs


def import_reward_func(spec: str, where: str):
    """`package.module:function` -> the function."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AlignError(f"{where}: '{spec}' is not 'module:function' (e.g. align.task:judge_reward)")
    try:
        module = _import(module_name)
    except ImportError as e:
        raise AlignError(f"{where}: cannot import '{module_name}': {models.first_line(e)}") from None
    func = getattr(module, attr, None)
    if not callable(func):
        raise AlignError(f"{where}: '{module_name}' has no function '{attr}'")
    return func


def _import(module_name: str):
    """Import a module, also from the current directory (the `align` console script does
    not put it on sys.path, `python -m align` does)."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        cwd = os.getcwd()
        if e.name is None or not module_name.startswith(e.name) or cwd in sys.path or "" in sys.path:
            raise
        sys.path.append(cwd)
        return importlib.import_module(module_name)


def build_trainer(stage, ctx):
    """Load data and models and build the PPOTrainer (without training)."""
    from align.ppo.layouts import LoadOptions, load_roles
    from align.ppo.trainer import PPOTrainer, make_accelerator

    where = f"stages.{stage.name}"
    config = stage.config()
    train, _ = data.load(stage.options["dataset"], DATA_KIND, f"{where}.dataset", ctx.seed)
    policy_path = stage.options.get("model") or ctx.default_model(stage)
    trust = bool(ctx.model.get("trust_remote_code", False))
    tokenizer = models.load_tokenizer(policy_path, trust_remote_code=trust)
    peft = stage.options.get("peft")
    lora = peft_config(peft, task_type="CAUSAL_LM", where=f"{where}.peft") if peft else None
    funcs = {spec: import_reward_func(spec, f"{where}.reward_funcs") for spec in reward_func_specs(stage)}
    accelerator = make_accelerator(config, stage.dir)
    with accelerator.main_process_first():  # a merged adapter copy is written once, then read by all
        roles = load_roles(
            policy_path=policy_path, tokenizer=tokenizer, reward_path=stage.options.get("reward_model"),
            value_path=stage.options.get("value_model"), peft_config=lora,
            options=LoadOptions(dtype=ctx.model.get("dtype", "auto"), quantization=stage.options.get("quantization"),
                                trust_remote_code=trust, gradient_checkpointing=config.gradient_checkpointing,
                                value_head_on_policy=config.value_head_on_policy))
    for line in roles.description:
        ctx.log(f"[{stage.name}] {line}")
    return PPOTrainer(config, roles, tokenizer, train, output_dir=stage.dir, reward_funcs=funcs,
                      accelerator=accelerator, log=ctx.log, seed=ctx.seed)


def run(stage, ctx):
    trainer = build_trainer(stage, ctx)
    metrics = trainer.train()
    trainer.save(stage.dir)
    return metrics
