"""`PPOConfig`: every knob of align's PPO trainer, with the default it has in the literature.

References for the defaults:

* [Schulman17]  Schulman et al. 2017, "Proximal Policy Optimization Algorithms".
* [Ziegler19]   Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences",
                and its code (openai/lm-human-preferences).
* [Stiennon20]  Stiennon et al. 2020, "Learning to summarize from human feedback".
* [Huang24]     Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO".
* [TRL]         TRL's PPOConfig (the trainer TRL shipped until v0.x), itself modelled on
                lm-human-preferences.
* [TrainingArguments]  transformers' TrainingArguments: the same field with the same meaning
                as in the TRL stages.

A recipe stage block sets any of these fields verbatim:

    ppo:
      dataset: {path: data/prompts.jsonl}
      reward_model: ${reward}
      peft: {r: 16, lora_alpha: 32}
      learning_rate: 1.0e-5
      kl_coef: 0.05
"""

from __future__ import annotations

import dataclasses
import math


@dataclasses.dataclass
class PPOConfig:
    """Fields of a `type: ppo` stage. One *step* is one rollout batch followed by its PPO update."""

    # ------------------------------------------------------------------ batch and schedule
    per_device_train_batch_size: int = 8
    """Prompts per process per rollout batch (the global batch is this x processes) [TRL: 8]."""
    num_mini_batches: int = 1
    """Minibatches a rollout batch is split into; one optimizer step each [Ziegler19, TRL: 1]."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per minibatch whose gradients are summed before the optimizer step."""
    num_ppo_epochs: int = 4
    """Passes over each rollout batch [Ziegler19, Stiennon20, TRL: 4]. Each rollout batch gets
    exactly num_ppo_epochs x num_mini_batches optimizer steps."""
    num_train_steps: int | None = None
    """Rollout batches to train for. Wins over total_episodes and num_train_epochs."""
    total_episodes: int | None = None
    """Prompts (episodes) to train on, over all processes; rounded up to whole global batches."""
    num_train_epochs: float = 1.0
    """Passes over the prompt dataset when neither num_train_steps nor total_episodes is set."""

    # ------------------------------------------------------------------ optimizer
    learning_rate: float = 3e-6
    """Policy learning rate [TRL: 3e-6]."""
    critic_learning_rate: float | None = None
    """Critic learning rate; None uses learning_rate. With value_head_on_policy it applies to
    the value head only (the shared weights train at learning_rate)."""
    lr_scheduler_type: str = "linear"
    """transformers scheduler name, stepped once per rollout batch (linear decay to 0 over
    the run, as in [Ziegler19] and [TRL])."""
    warmup_steps: int = 0
    """Scheduler warm-up, in rollout batches."""
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-5
    """Adam epsilon of lm-human-preferences (TensorFlow's default) [Huang24]."""
    max_grad_norm: float | None = 1.0
    """Gradient-norm clip, applied to the policy's and the critic's parameters separately
    [TRL: 1.0]; None disables clipping."""

    # ------------------------------------------------------------------ sampling
    response_length: int = 53
    """Most tokens generated per response [TRL's TL;DR default: 53]."""
    max_prompt_length: int | None = None
    """Prompts longer than this many tokens (with the chat template) are dropped, with a count;
    never cut, which would lose the chat header or the question (align/render.py). None keeps
    them all."""
    temperature: float = 0.7
    """Sampling temperature; every log-prob (policy, old policy, reference) is recomputed at
    the same temperature [Ziegler19 code, TRL: 0.7]. No top-k / top-p."""
    stop_strings: list[str] | None = None
    """Extra strings that end a response (besides the EOS token); text after them is masked."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of responses that hit response_length without stopping, e.g.
    1.0; a negative value is refused (TRL's sign) [TRL: None]."""
    rollout_forward_batch_size: int | None = None
    """Rows per no-grad forward pass during the rollout (policy, reference, critic, reward);
    None does the whole rollout batch at once."""

    # ------------------------------------------------------------------ reward and KL penalty
    reward_weights: list[float] | None = None
    """Weights of the reward sources, reward_model first then reward_funcs in order; None
    gives every source weight 1."""
    kl_coef: float = 0.05
    """KL penalty coefficient beta (the initial one with adaptive_kl) [Stiennon20, TRL: 0.05]."""
    kl_estimator: str = "k1"
    """Per-token KL estimator added to the reward: "k1" (log-ratio, unbiased) or "k3"
    (non-negative, unbiased) [TRL: k1]."""
    adaptive_kl: bool = False
    """Adapt kl_coef towards kl_target with the proportional controller of [Ziegler19]."""
    kl_target: float = 6.0
    """Target KL (nats per response) of the adaptive controller [Ziegler19: 6]."""
    kl_horizon: float = 10000
    """Horizon (in episodes) of the adaptive controller [Ziegler19: 10000]."""
    whiten_rewards: bool = False
    """Rescale the per-token rewards to unit variance over the rollout batch (all processes),
    keeping their mean [TRL: False]."""

    # ------------------------------------------------------------------ advantages and losses
    gamma: float = 1.0
    """Discount [Ziegler19: 1]."""
    lam: float = 0.95
    """GAE lambda [Ziegler19: 0.95]."""
    whiten_advantages: bool = True
    """Normalise advantages over the valid tokens of the rollout batch, statistics from every
    process [Ziegler19, TRL]."""
    cliprange: float = 0.2
    """Policy ratio clip epsilon [Schulman17: 0.2]."""
    cliprange_value: float | None = 0.2
    """Value clip around the rollout values [Ziegler19, TRL: 0.2]; None disables it."""
    vf_coef: float = 0.1
    """Value-loss weight [Ziegler19, TRL: 0.1]."""
    value_head_on_policy: bool = False
    """Make the critic a value head on the policy's own last hidden states (the design of
    TRL 0.x's AutoModelForCausalLMWithValueHead and of [Ziegler19]'s code) instead of a
    separate critic network or adapter: one forward/backward pass per micro-batch serves
    both, roughly halving the update's compute, and no critic weights or optimizer state
    are held. The value loss (x vf_coef) then also trains the policy's weights."""

    # ------------------------------------------------------------------ held-out evaluation
    eval_strategy: str = "steps"
    """"steps": score the policy on the held-out prompts (the stage's `eval_dataset`, or its
    dataset's `test_size` split) every eval_steps and at the last step; "no": never
    [TrainingArguments]. Without held-out prompts nothing is evaluated (align/heldout.py)."""
    eval_steps: float | None = None
    """Steps between held-out evaluations; below 1, a share of the run; None: logging_steps
    [TrainingArguments]."""
    eval_on_start: bool = True
    """Also evaluate before the first step: the curve's starting point [TrainingArguments; align: on]."""
    per_device_eval_batch_size: int = 8
    """Held-out prompts per generation batch [TrainingArguments: 8]."""

    # ------------------------------------------------------------------ engineering
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass (less memory, about 30% slower)."""
    seed: int | None = None
    """Seed for sampling and shuffling; None uses the recipe's seed."""
    save_steps: int = 50
    """Write a checkpoint every this many steps (0 never)."""
    save_total_limit: int = 2
    """Checkpoints kept (the newest ones)."""
    bf16: bool | None = None
    """bfloat16 mixed precision: accelerate autocasts every forward pass (the weights keep the
    model's `dtype`) [TrainingArguments]. Unset: on with CUDA unless fp16 is set, off without
    CUDA (align's default for every stage; TRL's is on)."""
    fp16: bool = False
    """float16 mixed precision, with loss scaling [TrainingArguments]."""

    # ------------------------------------------------------------------ logging
    logging_steps: int = 1
    """Print a progress line every this many steps (log_history.jsonl gets every step)."""
    report_to: str | list[str] = "none"
    """Trackers that also get every step's record, through accelerate: "none", "all" (every
    installed one), a name ("tensorboard", "trackio", "wandb", ...) or a list of names
    [TrainingArguments; align: none]. TensorBoard writes to checkpoints/runs/<date>_<host>,
    as the other stages do."""
    run_name: str | None = None
    """The run's name in trackio and wandb [TrainingArguments]."""
    project: str = "huggingface"
    """The trackio and wandb project [TrainingArguments: huggingface]."""
    disable_tqdm: bool = False
    """No progress bar (there is one on the main process only) [TrainingArguments]."""
    sample_generations_every: int = 10
    """Add a table of sample generations to samples.md every this many steps (0 never)."""
    num_sample_generations: int = 4
    """Rows in each sample table."""

    def __post_init__(self):
        if self.bf16 is None:  # align's default for TRL stages (align.training.trainer_config)
            import torch

            self.bf16 = torch.cuda.is_available() and not self.fp16
        self.check()

    def check(self):
        """Raise ValueError naming the first bad field."""
        positive_ints = ("per_device_train_batch_size", "num_mini_batches", "gradient_accumulation_steps",
                         "num_ppo_epochs", "response_length", "save_total_limit", "logging_steps",
                         "num_sample_generations", "per_device_eval_batch_size")
        for name in positive_ints:
            if not getattr(self, name) >= 1:
                raise ValueError(f"{name}: must be at least 1, got {getattr(self, name)}")
        for name in ("num_train_steps", "total_episodes", "max_prompt_length", "rollout_forward_batch_size"):
            value = getattr(self, name)
            if value is not None and not value >= 1:
                raise ValueError(f"{name}: must be at least 1 (or unset), got {value}")
        for name in ("save_steps", "sample_generations_every", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be 0 or more, got {getattr(self, name)}")
        for name in ("learning_rate", "temperature", "num_train_epochs", "cliprange", "kl_target", "kl_horizon"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}: must be a positive number, got {value}")
        for name in ("critic_learning_rate", "cliprange_value", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                raise ValueError(f"{name}: must be a positive number (or unset), got {value}")
        penalty = self.missing_eos_penalty
        if penalty is not None and not (penalty >= 0 and math.isfinite(penalty)):
            raise ValueError(f"missing_eos_penalty: must be 0 or more: it is subtracted from the score of responses "
                             f"that never stop, as in TRL (got {penalty}; write {-penalty} to penalise them)")
        for name in ("kl_coef", "vf_coef", "weight_decay"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name}: must be 0 or more, got {getattr(self, name)}")
        for name in ("gamma", "lam"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}: must be in [0, 1], got {getattr(self, name)}")
        if self.eval_strategy not in ("no", "steps"):
            raise ValueError(f"eval_strategy: expected 'steps' or 'no', got {self.eval_strategy!r}")
        if self.eval_steps is not None and not (self.eval_steps > 0 and math.isfinite(self.eval_steps)):
            raise ValueError(f"eval_steps: must be a positive number (or unset), got {self.eval_steps}")
        if self.kl_estimator not in ("k1", "k3"):
            raise ValueError(f"kl_estimator: expected 'k1' or 'k3', got {self.kl_estimator!r}")
        per_step = self.num_mini_batches * self.gradient_accumulation_steps
        if self.per_device_train_batch_size % per_step:
            raise ValueError(
                f"per_device_train_batch_size: {self.per_device_train_batch_size} does not split into "
                f"num_mini_batches ({self.num_mini_batches}) x gradient_accumulation_steps "
                f"({self.gradient_accumulation_steps}) equal micro-batches")
        if self.stop_strings is not None and (not isinstance(self.stop_strings, list)
                                              or not all(isinstance(s, str) and s for s in self.stop_strings)):
            raise ValueError(f"stop_strings: expected a list of non-empty strings, got {self.stop_strings!r}")
        if self.reward_weights is not None and (
                not isinstance(self.reward_weights, list)
                or not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in self.reward_weights)):
            raise ValueError(f"reward_weights: expected a list of numbers, got {self.reward_weights!r}")
        if self.bf16 and self.fp16:
            raise ValueError("bf16: bf16 and fp16 are both true; choose one mixed precision (set the other false)")
        self.trackers()
        from transformers import SchedulerType

        names = [s.value for s in SchedulerType]
        if self.lr_scheduler_type not in names:
            raise ValueError(f"lr_scheduler_type: unknown scheduler {self.lr_scheduler_type!r} (one of {', '.join(names)})")

    @property
    def mixed_precision(self) -> str | None:
        """accelerate's `mixed_precision`; None leaves it to `accelerate launch` (its config or
        --mixed_precision), as TrainingArguments do."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else None

    def trackers(self) -> list[str]:
        """`report_to` as tracker names, read as TrainingArguments read it ("none": none, "all":
        every installed tracker accelerate supports). ValueError for an unknown or missing one."""
        names = [self.report_to] if isinstance(self.report_to, str) else self.report_to
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError(f"report_to: expected a tracker name or a list of them, got {self.report_to!r}")
        if names in ([], ["none"]):
            return []
        from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

        installed = [str(t) for t in get_available_trackers()]
        if names == ["all"]:
            return installed
        for name in names:
            if name not in LOGGER_TYPE_TO_CLASS:
                raise ValueError(f"report_to: unknown tracker {name!r} (one of none, all, "
                                 f"{', '.join(LOGGER_TYPE_TO_CLASS)})")
            if name not in installed:
                raise ValueError(f"report_to: {name} is not installed (pip install {name})")
        return list(dict.fromkeys(names))

    @property
    def micro_batch_size(self) -> int:
        return self.per_device_train_batch_size // (self.num_mini_batches * self.gradient_accumulation_steps)
