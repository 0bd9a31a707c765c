"""A rollout batch: what it holds (`Rollout`) and the steps that make it before any gradient.

`PPOTrainer.rollout` runs them in order:

1. `Sampler.encode`: prompts to left-padded tokens, rendered by :mod:`align.render`;
2. `Sampler.generate`: responses sampled exactly from softmax(logits / temperature);
3. `Sampler.stop_mask`: where each response ends (first EOS or stop string; later tokens are
   padding);
4. `Rewards`: the weighted score of each response (reward model, reward functions);

then adds the policy, reference and critic passes and the math of :mod:`align.ppo.core`.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from align import models, render
from align.errors import AlignError
from align.ppo import core


@dataclasses.dataclass(kw_only=True)
class Rollout:
    """One rollout batch on this process. Tensors are (B, P) for the prompt, (B, T) for the
    response; everything after the first stop token is padding (``mask`` false)."""

    prompts: list
    completions: list[str]
    input_ids: torch.Tensor  # (B, P + T) prompt (left-padded) + response (pad after stop)
    attention_mask: torch.Tensor  # (B, P + T) long
    position_ids: torch.Tensor  # (B, P + T)
    response: torch.Tensor  # (B, T)
    mask: torch.Tensor  # (B, T) bool
    has_stop: torch.Tensor  # (B,) bool
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    scores: torch.Tensor  # (B,) after the missing-EOS penalty
    raw_scores: torch.Tensor  # (B,) weighted reward before the penalty
    source_scores: dict[str, torch.Tensor]
    rewards: torch.Tensor
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    entropy: torch.Tensor  # (B, T)
    first_pass: tuple[torch.Tensor, torch.Tensor] | None = None  # (log-probs, values) with their graph


def position_ids_from(mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens, as `generate` does for left-padded prompts."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def chunks(n: int, size: int | None) -> list[slice]:
    """Row slices of at most `size` rows (None: one slice of all `n`), for the no-grad passes."""
    size = size or n
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


# --------------------------------------------------------------------------- sampling


class Sampler:
    """Prompts to tokens, tokens to sampled responses, and where each response stops.

    Sampling is exactly from softmax(logits / temperature): no top-k, no top-p, nothing
    inherited from the checkpoint's generation_config (see ActorCritic.generate), so the
    log-probs PPO computes are those of the distribution that sampled.
    """

    def __init__(self, config, tokenizer, policy, device):
        from transformers import GenerationConfig

        self.config = config
        self.tokenizer = tokenizer
        self.policy = policy  # the ActorCritic itself (not a DDP wrapper): generation needs no sync
        self.device = device
        self.stop_ids = sorted(_stop_token_ids(tokenizer, policy.lm))
        self.generation_config = GenerationConfig(
            max_new_tokens=config.response_length, min_new_tokens=0, do_sample=True, temperature=config.temperature,
            top_k=0, top_p=1.0, eos_token_id=self.stop_ids, pad_token_id=tokenizer.pad_token_id,
            stop_strings=config.stop_strings, use_cache=True)

    def encode(self, prompts: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts (strings are user turns) through the chat template with its generation
        prompt (align.render). Left-padded, so every response starts at the same column."""
        tok = self.tokenizer
        encoded = []
        for prompt in prompts:
            ids = render.prompt_ids(tok, prompt)
            limit = self.config.max_prompt_length
            if limit and len(ids) > limit:  # the stage drops these before training (render.fit_prompts)
                raise AlignError(f"dataset: a prompt of {len(ids)} tokens is longer than max_prompt_length={limit}")
            if not ids:
                raise AlignError(f"dataset: empty prompt {prompt!r}")
            encoded.append(ids)
        width = max(len(ids) for ids in encoded)
        input_ids = torch.full((len(encoded), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, ids in enumerate(encoded):
            input_ids[i, width - len(ids):] = torch.tensor(ids)
            mask[i, width - len(ids):] = 1
        return input_ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def generate(self, query: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
        """Response tokens (B, T), T <= response_length; rows that stopped early are padded."""
        extra = {"tokenizer": self.tokenizer} if self.config.stop_strings else {}
        out = self.policy.generate(input_ids=query, attention_mask=query_mask,
                                   generation_config=self.generation_config, **extra)
        return out[:, query.shape[1]:]

    def stop_mask(self, response: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mask, has_stop): real tokens up to and including the first EOS or stop string."""
        mask, has_stop = core.response_mask_after_stop(response, self.stop_ids)
        if self.config.stop_strings:
            ends = self._stop_string_ends(response, mask)
            found = ends >= 0
            cols = torch.arange(response.shape[1], device=response.device)
            mask = mask & (~found.unsqueeze(1) | (cols.unsqueeze(0) <= ends.unsqueeze(1)))
            has_stop = has_stop | found
        return mask, has_stop

    def _stop_string_ends(self, response: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Index of the token that completes the first stop string in each row, else -1.
        "The decoded prefix contains a stop string" is monotone in the prefix length, so a
        binary search needs only log2(T) decodes per row."""
        ends = []
        for ids, row_mask in zip(response.tolist(), mask.tolist()):
            n = sum(row_mask)
            hit = lambda k: any(s in self.tokenizer.decode(ids[:k]) for s in self.config.stop_strings)  # noqa: E731
            if n == 0 or not hit(n):
                ends.append(-1)
                continue
            lo, hi = 1, n
            while lo < hi:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if hit(mid) else (mid + 1, hi)
            ends.append(lo - 1)
        return torch.tensor(ends, dtype=torch.long, device=response.device)


def _stop_token_ids(tokenizer, lm) -> set[int]:
    """The tokenizer's EOS, the chat template's end of turn and every EOS of the model's generation
    config (chat models often end a turn with a token of their own)."""
    ids = set(models.stop_token_ids(tokenizer, lm))
    if not ids:
        raise AlignError("model: the tokenizer has no eos_token; PPO needs one to end responses")
    return ids


# --------------------------------------------------------------------------- reward


class Rewards:
    """The reward of each response: the reward model first, then the reward functions (TRL's
    signature ``f(prompts, completions, **kw) -> list[float]``) in order, summed with
    ``config.reward_weights`` (1 each by default)."""

    def __init__(self, config, roles, tokenizer, reward_funcs: dict, accelerator):
        self.roles = roles
        self.tokenizer = tokenizer
        self.funcs = dict(reward_funcs)
        self.accelerator = accelerator
        self.device = accelerator.device
        self.forward_batch_size = config.rollout_forward_batch_size
        self.sources = (["reward_model"] if roles.has_reward_model else []) + list(self.funcs)
        weights = config.reward_weights or [1.0] * len(self.sources)
        # The recipe check (align.stages.ppo.validate) gives the user these messages.
        assert self.sources, "PPO needs a reward model or reward functions"
        assert len(weights) == len(self.sources), f"{len(weights)} reward_weights for sources {self.sources}"
        self.weights = [float(w) for w in weights]

    @torch.no_grad()
    def __call__(self, prompts, completions, response, mask, has_stop):
        """Weighted reward of every response -> (scores (B,), {source: scores})."""
        per_source = {}
        if self.roles.has_reward_model:
            per_source["reward_model"] = self.reward_model_scores(prompts, completions, has_stop.tolist())
        for name, func in self.funcs.items():
            if isinstance(prompts[0], list):
                comps = [[{"role": "assistant", "content": c}] for c in completions]
            else:
                comps = completions
            ids = [row[m].tolist() for row, m in zip(response, mask)]
            values = func(prompts=prompts, completions=comps, completion_ids=ids)
            if values is None or len(values) != len(prompts):
                raise AlignError(f"reward_funcs: {name} returned {0 if values is None else len(values)} rewards "
                                 f"for {len(prompts)} completions")
            per_source[name] = torch.tensor([math.nan if v is None else float(v) for v in values],
                                            dtype=torch.float32, device=self.device)
        total = torch.zeros(len(prompts), dtype=torch.float32, device=self.device)
        for (name, values), weight in zip(per_source.items(), self.weights):
            if not torch.isfinite(values).all():
                raise AlignError(f"reward_funcs: {name} returned a non-finite reward")
            total = total + weight * values
        return total, per_source

    def reward_model_scores(self, prompts, completions, finished=None):
        """The reward model's score of each (prompt, completion), read from the text
        `align.render.reward_text` gives (what the reward model was trained on, what align
        eval scores): the chat template (or plain text + EOS for a plain-text reward model),
        without the closing end of turn for an answer cut at response_length (finished
        false). Re-tokenising also covers a reward model with its own vocabulary."""
        tok = self.roles.reward_tokenizer or self.tokenizer
        finished = [True] * len(prompts) if finished is None else finished
        texts = [render.reward_text(tok, p, c, f) for p, c, f in zip(prompts, completions, finished)]
        scores = []
        for s in chunks(len(texts), self.forward_batch_size):
            enc = render.reward_inputs(tok, texts[s])
            ids, am = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
            with self.accelerator.autocast():
                scores.append(self.roles.reward_scores(ids, am))
        return torch.cat(scores)
