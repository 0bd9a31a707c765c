"""Critic-free online RL on TRL's RLOOTrainer (and, through `run_online`, GRPOTrainer): sample
`num_generations` completions per prompt, score them with the same reward model and/or Python
reward functions the PPO stage uses, and use the group as its own baseline.

    rloo:
      model: ${sft}
      dataset: {path: "${task}/prompts.jsonl"}
      reward_model: ${reward}                 # any one-logit sequence classifier (or adapter)
      reward_funcs: [align.task:judge_reward] # optional module:function rewards
      reward_weights: [1.0, 0.5]              # RLOOConfig field: model first, then functions
      num_generations: 4
      beta: 0.05                              # KL coefficient to the reference
      eval_dataset: {path: data/eval.jsonl}   # held-out prompts: align's evaluation (align/heldout.py)
      judge: align.task:gold_score            #   replaces TRL's, on TRL's schedule (eval_steps,
      eval_steps: 10                          #   eval_on_start: on by default here)
"""

from trl import RLOOConfig as Config
from trl import RLOOTrainer

from align import heldout, models
from align.errors import AlignError
from align.functions import check_specs, load_reward_function
from align.stages import Traits
from align.training import TRAINING_OPTIONS, build_trainer, check_training_fields, train_and_save

OPTIONS = TRAINING_OPTIONS | {"reward_model", "reward_funcs", "judge"}
TRAITS = Traits(produces="policy", data="prompt", chat=True, online=True)


def validate(stage, model):
    check_training_fields(stage)
    if not stage.options.get("reward_model") and not stage.options.get("reward_funcs"):
        raise AlignError(f"stages.{stage.name}: needs `reward_model:` (e.g. ${{reward}}) and/or "
                         f"`reward_funcs: [module:function]`")
    check_specs(stage.options.get("reward_funcs"), f"stages.{stage.name}.reward_funcs")
    heldout.check_judge(stage)


def reward_functions(stage, ctx):
    """[reward model, *functions] and their tokenizers (None for functions), in that order."""
    funcs, tokenizers = [], []
    path = stage.options.get("reward_model")
    if path:
        trust = bool(ctx.model.get("trust_remote_code", False))
        funcs.append(models.load_model(path, kind="seq-cls", dtype=ctx.model.get("dtype", "auto"),
                                       trust_remote_code=trust))
        tokenizers.append(models.load_tokenizer(path, trust_remote_code=trust))
    where = f"stages.{stage.name}.reward_funcs"
    for spec in check_specs(stage.options.get("reward_funcs"), where):
        funcs.append(load_reward_function(spec, where))
        tokenizers.append(None)
    return funcs, tokenizers


def run_online(stage, ctx, trainer_cls):
    funcs, reward_tokenizers = reward_functions(stage, ctx)
    # With held-out prompts, align's held-out evaluation runs on TRL's schedule: every eval_steps,
    # and before the first step (the curve's starting point).
    defaults = {"eval_strategy": "steps", "eval_on_start": True} if heldout.has_held_out(stage) else \
        {"eval_strategy": "no"}
    trainer = build_trainer(stage, ctx, heldout.trainer_class(trainer_cls), defaults=defaults, reward_funcs=funcs,
                            reward_processing_classes=reward_tokenizers)
    args = trainer.args
    if args.eval_strategy != "no":
        trainer.held = heldout.for_stage(stage, ctx, trainer.eval_dataset, batch_size=args.per_device_eval_batch_size,
                                         max_new_tokens=args.max_completion_length)
    metrics = train_and_save(trainer, stage, ctx)
    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    if rewards:
        metrics.update(reward_first=rewards[0], reward_last=rewards[-1], reward_mean=rewards[-1])
    return metrics


def run(stage, ctx):
    return run_online(stage, ctx, RLOOTrainer)
