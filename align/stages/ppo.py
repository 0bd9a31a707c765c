"""PPO with a critic and a KL penalty to the SFT policy: the RL step of InstructGPT.

    ppo:
      dataset: {path: data/prompts.jsonl}    # prompt-only rows: text or chat messages
      model: ${sft}                          # default: the latest earlier policy stage
      reward_model: ${reward}                # any one-logit sequence classifier (or adapter)
      reward_funcs: align.task:judge_reward  # and/or Python functions (TRL's signature)
      reward_weights: [1.0, 0.5]             # reward_model first, then reward_funcs in order
      value_model: ${reward}                 # what the critic starts from (default: reward_model)
      value_head_on_policy: false            # true: the critic is a head on the policy (one pass)
      eval_dataset: {path: data/eval.jsonl}  # held-out prompts, scored every eval_steps (align/heldout.py)
      judge: align.task:gold_score           # optional gold judge of the held-out completions
      eval_steps: 10
      peft: {r: 16, lora_alpha: 32}          # LoRA: one base model serves every role
      learning_rate: 1.0e-5                  # any PPOConfig field (align/ppo/config.py)

Outputs in the stage folder: the policy (a LoRA adapter or a full model) and its tokenizer,
loadable like an SFT output; the critic in `critic/` (loadable as a reward model);
`log_history.jsonl` (one JSON line per step, with the held-out metrics and the compute so far at
evaluation steps), `samples.md` (sample generations) and `checkpoints/checkpoint-N` (resumed from
automatically).
"""

from __future__ import annotations

from align import distributed, heldout, models, render
from align.errors import AlignError, first_line
from align.functions import check_specs, load_reward_function
from align.ppo.config import PPOConfig as Config  # noqa: F401  (the stage's config class)
from align.stages import Traits
from align.training import check_training_fields, load_datasets, peft_config

OPTIONS = {"model", "dataset", "eval_dataset", "judge", "peft", "quantization", "reward_model", "reward_funcs",
           "value_model"}
TRAITS = Traits(produces="policy", data="prompt", chat=True, online=True)


def validate(stage, model):
    where = f"stages.{stage.name}"
    check_training_fields(stage)
    try:
        stage.config()
    except (ValueError, TypeError) as e:
        raise AlignError(f"{where}.{first_line(e)}") from None
    peft = stage.options.get("peft")
    if isinstance(peft, dict) and str(peft.get("method", "lora")).lower() != "lora":
        raise AlignError(f"{where}.peft.method: PPO shares one base model between its roles through LoRA "
                         f"adapters; use method: lora (got {peft['method']})")
    specs = check_specs(stage.options.get("reward_funcs"), f"{where}.reward_funcs")
    heldout.check_judge(stage)
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
    weights = stage.args.get("reward_weights")
    sources = int(bool(stage.options.get("reward_model"))) + len(specs)
    if weights is not None and len(weights) != sources:
        raise AlignError(f"{where}.reward_weights: {len(weights)} weights for {sources} reward sources "
                         f"(reward_model first, then reward_funcs in order)")


def build_trainer(stage, ctx):
    """Load data and models and build the PPOTrainer (without training)."""
    from align.ppo.layouts import LoadOptions, load_roles
    from align.ppo.trainer import PPOTrainer, make_accelerator

    where = f"stages.{stage.name}"
    config = stage.config()
    train, evals = load_datasets(stage, ctx)
    policy_path = ctx.recipe.start_model(stage)
    trust = bool(ctx.model.get("trust_remote_code", False))
    tokenizer = models.load_tokenizer(policy_path, trust_remote_code=trust)
    train = render.fit_prompts(train, tokenizer, config.max_prompt_length, f"{where}.dataset")
    peft = stage.options.get("peft")
    lora = peft_config(peft, task_type="CAUSAL_LM", where=f"{where}.peft") if peft else None
    funcs = {spec: load_reward_function(spec, f"{where}.reward_funcs")
             for spec in check_specs(stage.options.get("reward_funcs"), f"{where}.reward_funcs")}
    accelerator = make_accelerator(config, stage.dir)
    # A merged adapter copy is written once, then read by all; weights load whole (align.distributed).
    with accelerator.main_process_first(), distributed.whole_weights():
        roles = load_roles(
            policy_path=policy_path, tokenizer=tokenizer, reward_path=stage.options.get("reward_model"),
            value_path=stage.options.get("value_model"), peft_config=lora,
            options=LoadOptions(dtype=ctx.model.get("dtype", "auto"), quantization=stage.options.get("quantization"),
                                trust_remote_code=trust, gradient_checkpointing=config.gradient_checkpointing,
                                value_head_on_policy=config.value_head_on_policy))
    for line in roles.description:
        ctx.log(f"[{stage.name}] {line}")
    held = heldout.for_stage(stage, ctx, evals, max_new_tokens=config.response_length,
                             batch_size=config.per_device_eval_batch_size) if config.eval_strategy != "no" else None
    return PPOTrainer(config, roles, tokenizer, train, output_dir=stage.dir, reward_funcs=funcs,
                      accelerator=accelerator, log=ctx.log, seed=ctx.seed,
                      callbacks=[heldout.PPOHeldOut(held, config)] if held else [])


def run(stage, ctx):
    trainer = build_trainer(stage, ctx)
    metrics = trainer.train()
    metrics.update(heldout.last_point(trainer.read_log()))
    trainer.save(stage.dir)
    return metrics
