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
"""

from trl import RLOOConfig as Config
from trl import RLOOTrainer

from align import evaluate, models
from align.errors import AlignError
from align.stages.sft import load_datasets
from align.training import TRAINING_OPTIONS, check_training_fields, load_policy, train_and_save, trainer_config

OPTIONS = TRAINING_OPTIONS | {"reward_model", "reward_funcs"}
DATA_KIND = "prompt"


def validate(stage, model):
    check_training_fields(stage)
    if not stage.options.get("reward_model") and not stage.options.get("reward_funcs"):
        raise AlignError(f"stages.{stage.name}: needs `reward_model:` (e.g. ${{reward}}) and/or "
                         f"`reward_funcs: [module:function]`")


def reward_functions(stage, ctx):
    """[reward model, *functions] and their tokenizers (None for functions), in that order."""
    funcs, tokenizers = [], []
    path = stage.options.get("reward_model")
    if path:
        trust = bool(ctx.model.get("trust_remote_code", False))
        funcs.append(models.load_model(path, kind="seq-cls", dtype=ctx.model.get("dtype", "auto"),
                                       trust_remote_code=trust))
        tokenizers.append(models.load_tokenizer(path, trust_remote_code=trust))
    specs = stage.options.get("reward_funcs") or []
    for spec in [specs] if isinstance(specs, str) else specs:
        funcs.append(evaluate.load_function(spec, f"stages.{stage.name}.reward_funcs"))
        tokenizers.append(None)
    return funcs, tokenizers


def run_online(stage, ctx, trainer_cls):
    train, evals = load_datasets(stage, ctx, DATA_KIND)
    model, tokenizer, peft_config = load_policy(stage, ctx)
    funcs, reward_tokenizers = reward_functions(stage, ctx)
    trainer = trainer_cls(
        model=model,
        reward_funcs=funcs,
        args=trainer_config(stage, ctx),
        train_dataset=train,
        eval_dataset=evals,
        processing_class=tokenizer,
        reward_processing_classes=reward_tokenizers,
        peft_config=peft_config,
    )
    metrics = train_and_save(trainer, stage, ctx)
    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    if rewards:
        metrics.update(reward_first=rewards[0], reward_last=rewards[-1], reward_mean=rewards[-1])
    return metrics


def run(stage, ctx):
    return run_online(stage, ctx, RLOOTrainer)
