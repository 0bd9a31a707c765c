"""Evaluate the run's policies on held-out prompts (gold score, reward-model score, KL to the
reference, win rate) and the reward model on held-out pairs; writes eval.json and eval.md into
the stage folder and prints the table.

    eval:
      prompts: ${task}/eval_prompts.jsonl      # prompt-only rows
      pairs: ${task}/eval_prefs.jsonl          # optional: reward-model pair accuracy
      judge: align.task:gold_score             # optional gold judge, module:function
      # policies / reward_model / reference default to this run's stages
"""

import dataclasses

from align import data, evaluate
from align.errors import AlignError
from align.functions import check_spec, load_function
from align.stages import Traits

OPTIONS = {"policies", "reward_model", "reference", "prompts", "pairs", "texts"}
TRAITS = Traits()


@dataclasses.dataclass
class Config:
    judge: str | None = None  # module:function(prompt, response) -> score in [0, 1]
    max_new_tokens: int = 48
    num_prompts: int = 200
    batch_size: int = 32
    num_samples: int = 5  # rows of the sample-generation table


def validate(stage, model):
    if not any(k in stage.options for k in ("prompts", "pairs", "texts")):
        raise AlignError(f"stages.{stage.name}: give at least one of prompts, pairs or texts")
    if stage.args.get("judge") is not None:
        check_spec(stage.args["judge"], f"stages.{stage.name}.judge")


def run(stage, ctx):
    cfg = stage.config()
    where = f"stages.{stage.name}"
    earlier = ctx.recipe.earlier(stage)
    policies = stage.options.get("policies") or {s.name: str(s.dir) for s in earlier if s.traits.chat}
    if isinstance(policies, list):
        policies = {p.rstrip("/").split("/")[-1]: p for p in policies}
    reward = stage.options.get("reward_model") or next(
        (str(s.dir) for s in reversed(earlier) if s.traits.produces == "reward_model"), None)
    reference = stage.options.get("reference") or next((str(s.dir) for s in earlier if s.traits.chat), None)
    results = {}
    if ctx.is_main:  # generation for evaluation is cheap; one process does it
        results = evaluate.evaluate(
            policies=policies,
            prompts=_rows(stage, "prompts", "prompt", cfg.num_prompts),
            pairs=_rows(stage, "pairs", "preference", cfg.num_prompts),
            texts=[r["text"] for r in _rows(stage, "texts", "text", cfg.num_prompts) or []] or None,
            reward_model=reward, reference=reference,
            judge=load_function(cfg.judge, f"{where}.judge") if cfg.judge else None,
            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size, seed=ctx.seed, num_samples=cfg.num_samples,
        )
        evaluate.write(results, stage.dir)
        print(evaluate.markdown(results), flush=True)
    flat = {f"{name}/{k}": v for name, m in results.get("policies", {}).items() for k, v in m.items()}
    flat.update(results.get("reward_model", {}))
    return flat


def _rows(stage, key, kind, limit):
    spec = stage.options.get(key)
    if not spec:
        return None
    rows = data.read_rows(spec, kind, f"stages.{stage.name}.{key}", limit)
    return [r["prompt"] for r in rows] if kind == "prompt" else rows
