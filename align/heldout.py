"""Held-out curves during RL: the PPO, RLOO and GRPO stages score their policy on held-out prompts
(`eval_dataset`, or the `test_size` split of `dataset`) every `eval_steps`, with the same code as
`align eval` (`align.evaluate.policy_metrics`): mean reward-model score, the judge's score x 100
when the stage names a `judge`, KL to the reference (nats per sequence, sampled at T=1) and
response length (words); completions are greedy, so the points are not sampling noise.

Each point is logged to the stage's history (`log_history.jsonl`) and to its trackers (as
`eval/<metric>`) with the training compute spent so far: `flops`, counted the way `align plan`
counts them (align.plan) for the tokens actually processed, and `train_seconds`, wall time
without the evaluations. `align forecast` fits these curves (align/forecast.py).

    eval_gold_score, eval_reward, eval_kl_to_ref, eval_response_length, flops, train_seconds

PPO (align's own trainer) calls `PPOHeldOut` after every step; TRL's RLOO/GRPO trainers keep
their own evaluation schedule (`eval_strategy`, `eval_steps`, `eval_on_start`) with
`trainer_class`, whose `evaluate` is this one. The main process evaluates; the training
random streams are left exactly as they were.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from contextlib import contextmanager
from types import SimpleNamespace

import numpy as np
import torch

from align import evaluate, infer
from align.estimate import count_parameters, flops, ppo_flops, score_parameters
from align.errors import AlignError
from align.functions import check_spec, load_function

KEYS = ("gold_score", "reward", "kl_to_ref", "response_length")  # logged as eval_<key>


# ---------------------------------------------------------------------------------------------
# The held-out set and one evaluation


@dataclasses.dataclass
class HeldOut:
    """Held-out prompts and how to score a live policy on them."""

    prompts: list
    judge: object | None  # module:function(prompt, response) -> [0, 1]
    max_new_tokens: int
    batch_size: int
    seed: int
    reference_path: str | None = None  # loaded only when the trainer holds no reference
    _reference: object = dataclasses.field(default=None, init=False, repr=False)

    def evaluate(self, policy, tokenizer, *, reference=None, reward=None) -> dict:
        """{eval_<metric>: value} for the policy as it is now; `reward` is (model, tokenizer)."""
        if reference is None and self.reference_path:
            if self._reference is None:
                self._reference = infer.load(self.reference_path)[0].to(policy.device)
            reference = self._reference
        with _isolated(policy, tokenizer, reward[1] if reward else None):
            metrics, _ = evaluate.policy_metrics(policy, tokenizer, self.prompts, rm=reward, ref_model=reference,
                                                 judge=self.judge, max_new_tokens=self.max_new_tokens,
                                                 batch_size=self.batch_size, seed=self.seed)
        return {f"eval_{k}": v for k, v in metrics.items() if k in KEYS}


@contextmanager
def _isolated(policy, *tokenizers):
    """Evaluate in eval mode without touching training: generation reseeds the random generators
    (which would make the steps after every evaluation draw the same numbers) and sets padding
    sides; both are put back."""
    was_training = policy.training
    sides = [(t, t.padding_side) for t in tokenizers if t is not None]
    python, numpy = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        policy.eval()
        try:
            yield
        finally:
            policy.train(was_training)
            for tokenizer, side in sides:
                tokenizer.padding_side = side
            random.setstate(python)
            np.random.set_state(numpy)


class Under:
    """A model called inside a context (another adapter active, adapters disabled): the reference
    of a LoRA run is the policy's own base."""

    def __init__(self, model, context):
        self.model, self.context = model, context

    @property
    def device(self):
        return self.model.device

    def __call__(self, **kwargs):
        with self.context():
            return self.model(**kwargs)


class Scorer:
    """A function of (input_ids, attention_mask) -> scores (B,), called like a one-logit sequence
    classifier (`model(**enc).logits[:, 0]`), as align.evaluate.reward_scores calls one."""

    def __init__(self, scores, device):
        self.scores, self.device = scores, device

    def __call__(self, input_ids, attention_mask, **_):
        return SimpleNamespace(logits=self.scores(input_ids, attention_mask)[:, None])


def steps_between(eval_steps, logging_steps: int, total_steps: int) -> int:
    """TrainingArguments' rule: unset means logging_steps, below 1 a share of the run."""
    if eval_steps is None:
        return logging_steps
    return max(1, math.ceil(eval_steps * total_steps)) if eval_steps < 1 else int(eval_steps)


def has_held_out(stage) -> bool:
    """Whether the stage has held-out prompts: `eval_dataset` or a `test_size` split of `dataset`."""
    spec = stage.options.get("dataset")
    first = spec[0] if isinstance(spec, list) and spec else spec
    return bool(stage.options.get("eval_dataset")) or (isinstance(first, dict) and bool(first.get("test_size")))


def check_judge(stage):
    """At recipe load: a `judge` scores held-out completions, so the stage needs held-out prompts."""
    if stage.options.get("judge") is None:
        return
    check_spec(stage.options["judge"], f"stages.{stage.name}.judge")
    if not has_held_out(stage):
        raise AlignError(f"stages.{stage.name}.judge: scores held-out prompts, and the stage has none; add "
                         f"`eval_dataset: {{path: ...}}` (or `test_size` in its dataset)")


def for_stage(stage, ctx, evals, *, max_new_tokens: int, batch_size: int) -> HeldOut | None:
    """The stage's held-out set (None without held-out prompts)."""
    from align.distributed import sharding

    if evals is None or not len(evals):
        return None
    where = f"stages.{stage.name}"
    if sharding():
        raise AlignError(f"{where}: held-out evaluation generates on the main process, which cannot run with "
                         f"{sharding()} sharding the weights; set eval_strategy: no")
    judge = stage.options.get("judge")
    return HeldOut(prompts=[row["prompt"] for row in evals], judge=load_function(judge, f"{where}.judge")
                   if judge else None, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=ctx.seed,
                   reference_path=ctx.recipe.start_model(stage))


def last_point(history: list[dict]) -> dict:
    """The held-out metrics of the last evaluation in a stage's history ({} when none)."""
    point = next((r for r in reversed(history) if any(k.startswith("eval_") for k in r)), {})
    return {k: v for k, v in point.items() if k.startswith("eval_")}


def _line(stage: str, step: int, point: dict) -> str:
    shown = " ".join(f"{k[5:]} {point[k]:.4g}" for k in (f"eval_{k}" for k in KEYS) if k in point)
    return f"[{stage}] held-out at step {step}: {shown} (after {point['flops']:.3g} training FLOPs)"


# ---------------------------------------------------------------------------------------------
# PPO: a callback of align's trainer


class PPOHeldOut:
    """PPOTrainer callback: adds `flops` and `train_seconds` to every step's record and the
    held-out metrics at the start (`eval_on_start`), every `eval_steps` and at the last step."""

    def __init__(self, held: HeldOut, config):
        self.held, self.config = held, config
        self.flops = self.seconds = 0.0
        self.every = 1
        self.counts = None

    def on_train_begin(self, trainer) -> dict | None:
        """The point before training (step 0), or, on resume, the totals carried on from the log."""
        self.every = steps_between(self.config.eval_steps, self.config.logging_steps, trainer.total_steps)
        self.counts = self._parameter_counts(trainer.roles)
        if trainer.step:
            last = next((r for r in reversed(trainer.read_log()) if "flops" in r), {})
            self.flops, self.seconds = last.get("flops", 0.0), last.get("train_seconds", 0.0)
            return None
        return {"step": 0, **self._point(trainer)} if self.config.eval_on_start else None

    def on_step_end(self, trainer, batch, record: dict):
        self.flops += self.step_flops(trainer, batch)
        self.seconds += record["seconds"]
        record.update(flops=self.flops, train_seconds=round(self.seconds, 3))
        if trainer.step % self.every == 0 or trainer.step == trainer.total_steps:
            record.update(self._point(trainer))

    def _point(self, trainer) -> dict:
        point = {}
        if trainer.is_main:
            roles, ac = trainer.roles, trainer.unwrapped
            ac.switch.use("policy")
            reference = roles.ref_model if roles.ref_model is not None else Under(ac.policy, lambda: _role(ac.switch))
            reward = (Scorer(roles.reward_scores, trainer.device), roles.reward_tokenizer or trainer.tokenizer) \
                if roles.has_reward_model else None
            point = self.held.evaluate(ac.policy, trainer.tokenizer, reference=reference, reward=reward)
        trainer.accelerator.wait_for_everyone()
        point.update(flops=self.flops, train_seconds=round(self.seconds, 3))
        if trainer.is_main:
            trainer.log(_line("ppo", trainer.step, point))
        return point

    @staticmethod
    def _parameter_counts(roles) -> dict:
        """Parameters of each role as `align plan` counts them (LoRA: the shared base's)."""
        ac = roles.actor_critic
        base = ac.lm.config
        reward_config = roles.reward_model.config if roles.reward_model is not None else base
        critic_config = ac.critic.config if ac.critic is not None else base
        return {"policy": count_parameters(base)["total"],
                "reward": score_parameters(reward_config) if roles.has_reward_model else 0.0,
                "critic": 0.0 if ac.on_policy else score_parameters(critic_config),
                "train_per_param_token": 4.0 if roles.layout == "shared" else 6.0}

    def step_flops(self, trainer, batch) -> float:
        """One step's FLOPs by align.plan.ppo_flops, over the real prompt and response tokens of
        every process."""
        cfg, n = self.config, self.counts
        prompt = batch.input_ids.shape[1] - batch.response.shape[1]
        tokens = torch.stack([batch.attention_mask[:, :prompt].sum(), batch.mask.sum()]).double()
        prompt_tokens, response_tokens = trainer._sum_all(tokens).tolist()
        episodes = trainer.global_batch
        reuse = cfg.num_mini_batches * cfg.gradient_accumulation_steps == 1 and \
            (cfg.rollout_forward_batch_size or cfg.per_device_train_batch_size) >= cfg.per_device_train_batch_size
        return ppo_flops(n["policy"], episodes=episodes, prompt_len=prompt_tokens / episodes,
                         response_len=response_tokens / episodes, ppo_epochs=cfg.num_ppo_epochs,
                         n_reference=n["policy"], n_reward=n["reward"], n_critic=n["critic"],
                         train_per_param_token=n["train_per_param_token"], reuse_rollout_pass=reuse)["total"]


@contextmanager
def _role(switch, name: str = "ref"):
    switch.use(name)
    try:
        yield
    finally:
        switch.use("policy")


# ---------------------------------------------------------------------------------------------
# RLOO / GRPO: TRL's evaluation schedule, align's evaluation


def online_flops_per_token(model, reward_model, *, beta: float, lora: bool, num_iterations: int) -> float:
    """FLOPs per generated-sequence token of RLOO/GRPO, as align plan counts them: generation,
    reward model and (with beta > 0) reference forwards, plus the policy's training passes."""
    n_policy = count_parameters(model.config)["total"]
    n_reward = score_parameters(reward_model.config) if reward_model is not None else 0.0
    forwards = flops(n_policy + n_reward + (n_policy if beta > 0 else 0.0), 1, per_param_token=2.0)
    return forwards + flops(n_policy, 1, per_param_token=(4.0 if lora else 6.0) * num_iterations)


def trainer_class(base):
    """`base` (TRL's RLOOTrainer or GRPOTrainer) whose `evaluate` scores the policy on the held-out
    prompts with align's evaluation, when and as often as TRL's own would run. Set `held` first."""

    class HeldOutTrainer(base):
        held: HeldOut | None = None

        def train(self, *args, **kwargs):
            self._clock = {"started": time.time(), "evaluating": 0.0, "before": None}
            return super().train(*args, **kwargs)

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
            if self.held is None:  # eval_strategy: no (the final evaluation of align.training)
                return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)
            return _evaluate_online(self)

    HeldOutTrainer.__name__ = HeldOutTrainer.__qualname__ = base.__name__
    return HeldOutTrainer


def _evaluate_online(trainer) -> dict:
    from peft import PeftModel
    from transformers import Trainer

    state = trainer.state
    points = [r for r in state.log_history if "flops" in r]
    if points and points[-1]["step"] == state.global_step:  # already evaluated here (final evaluate(), resume)
        return {k: v for k, v in points[-1].items() if k.startswith("eval_")}
    started = time.time()
    point = {}
    if trainer.accelerator.is_main_process:
        unwrap = trainer.accelerator.unwrap_model
        policy = unwrap(trainer.model)
        if trainer.ref_model is not None:
            reference = unwrap(trainer.ref_model)
        elif isinstance(policy, PeftModel):
            reference = Under(policy, policy.disable_adapter)
        else:
            reference = None  # beta 0, full fine-tuning: HeldOut loads the starting model
        models = [(unwrap(f), t) for f, t in zip(trainer.reward_funcs, trainer.reward_processing_classes)
                  if isinstance(f, torch.nn.Module)]
        reward = models[0] if models else None
        point = trainer.held.evaluate(policy, trainer.processing_class, reference=reference, reward=reward)
        per_token = online_flops_per_token(policy, reward[0] if reward else None, beta=trainer.beta,
                                           lora=isinstance(policy, PeftModel), num_iterations=trainer.num_iterations)
        clock = trainer._clock
        if clock["before"] is None:  # resumed: the earlier sessions' time, up to their last point
            clock["before"] = points[-1]["train_seconds"] if points and state.global_step else 0.0
        seconds = clock["before"] + time.time() - clock["started"] - clock["evaluating"] if state.global_step else 0.0
        point.update(flops=per_token * state.num_input_tokens_seen, train_seconds=round(seconds, 3))
        # transformers' own log(): TRL's would fold its pending training metrics into this record.
        Trainer.log(trainer, dict(point))
    trainer.accelerator.wait_for_everyone()
    if state.global_step == 0:  # the start point: training (and its clock) begins now
        trainer._clock.update(started=time.time(), evaluating=0.0)
    else:
        trainer._clock["evaluating"] += time.time() - started
    trainer.control = trainer.callback_handler.on_evaluate(trainer.args, state, trainer.control, point)
    return point
