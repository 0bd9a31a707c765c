"""Timing probes on the planning machine's CPU.

FLOPs divided by a matmul rate (:func:`align.estimate.compute.model_matmul_rate`) predict large
models well: their time is matmuls. Small models are not: for the quickstart's 1.1M-parameter Llama
(hidden size 128) the matmuls are under half of a training step on a CPU and a small part of
generating a token; the rest is norms, activations, attention and the loss (memory-bound), the
Python and dispatch cost of every module call, LoRA's extra ops, and generate()'s per-token
sampling. Rather than a constant for each, :class:`ModelProbe` builds the model itself (random
weights, from its config) when it is small (:data:`PROBE_MAX_PARAMS`) and times the passes a stage
will run, at the stage's batch and sequence lengths, in this process with its thread setting:
a forward + backward, a no-grad forward, ``generate`` of n tokens, an AdamW step. Timings are
cached per process; each probe is repeated (:data:`PROBE_REPEATS`), each run counted as
:func:`align.estimate.compute.busy_seconds` (the machine's own speed, not its neighbours' load),
and the median kept.
"""

from __future__ import annotations

import statistics
from typing import Any

from align.estimate.compute import busy_seconds

#: Largest model (parameters) the probes build; beyond it FLOPs / measured matmul rate is used,
#: matmuls then being most of the time.
PROBE_MAX_PARAMS = 50_000_000
#: Timed runs per probe after one warm-up run; the median counts.
PROBE_REPEATS = 3

_MODELS: dict[tuple, Any] = {}
_TIMES: dict[tuple, float] = {}


def _median_seconds(fn, repeats: int = PROBE_REPEATS) -> float:
    fn()  # warm-up: lazily initialised kernels, allocator pools
    return statistics.median(busy_seconds(fn) for _ in range(repeats))


class ModelProbe:
    """A randomly initialised copy of a small model, timed at the shapes a stage will use.

    ``head="value"`` builds the one-logit sequence classifier (reward model, critic);
    ``checkpointing`` turns on gradient checkpointing as the stage will;
    ``adapters`` (a peft ``LoraConfig`` keyword dict, or None) wraps it with LoRA as the stage
    will, since adapters add their own ops to every targeted linear layer.
    """

    def __init__(self, config, *, head: str = "lm", adapters: dict | None = None, checkpointing: bool = False):
        self.key = (type(config).__name__, config.to_json_string(use_diff=False), head, repr(adapters), checkpointing)
        self.config, self.head, self.adapters, self.checkpointing = config, head, adapters, checkpointing

    @property
    def model(self):
        if self.key not in _MODELS:
            _MODELS[self.key] = self._build()
        return _MODELS[self.key]

    def _build(self):
        import copy

        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

        torch.manual_seed(0)
        config = copy.deepcopy(self.config)
        if self.head == "value":
            config.num_labels = 1
            config.pad_token_id = 0 if config.pad_token_id is None else config.pad_token_id
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
        model = model.float()
        if self.checkpointing:  # each layer's forward runs again during backward
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.adapters is not None:
            from peft import LoraConfig, get_peft_model

            model = get_peft_model(model, LoraConfig(**self.adapters))
        return model

    def _ids(self, batch: int, seq: int):
        import torch

        g = torch.Generator().manual_seed(0)
        return torch.randint(1, max(int(self.config.vocab_size) - 1, 2), (batch, seq), generator=g)

    def _cached(self, what: str, *shape, fn) -> float:
        k = (self.key, what, *shape)
        if k not in _TIMES:
            _TIMES[k] = _median_seconds(fn)
        return _TIMES[k]

    def train(self, batch: int, seq: int) -> float:
        """Seconds of one forward + backward over ``batch`` sequences of ``seq`` tokens (the loss
        included: next-token cross-entropy for an LM head, the score's mean for a value head)."""
        model = self.model.train()
        ids = self._ids(batch, seq)

        def step():
            out = model(input_ids=ids)
            loss = out.logits.float().log_softmax(-1).mean() if self.head == "lm" else out.logits.float().mean()
            loss.backward()
            model.zero_grad(set_to_none=True)

        return self._cached("train", batch, seq, fn=step)

    def forward(self, batch: int, seq: int) -> float:
        """Seconds of one no-grad forward (reference log-probs, reward scores, old values)."""
        import torch

        model = self.model.eval()
        ids = self._ids(batch, seq)

        def step():
            with torch.no_grad():
                model(input_ids=ids)

        return self._cached("forward", batch, seq, fn=step)

    def generate(self, batch: int, prompt: int, new_tokens: int) -> float:
        """Seconds of sampling ``new_tokens`` tokens for ``batch`` prompts of ``prompt`` tokens
        (prefill + one cached forward and one sampling step per token), as PPO and RLOO do."""
        import torch

        model = self.model.eval()
        ids = self._ids(batch, prompt)
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True, top_k=0,
                      pad_token_id=0, eos_token_id=None)

        def step():
            with torch.no_grad():
                model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs)

        return self._cached("generate", batch, prompt, new_tokens, fn=step)

    def optimizer_step(self) -> float:
        """Seconds of one AdamW step (torch's default, foreach) over the trainable parameters."""
        import torch

        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer = torch.optim.AdamW(params, lr=1e-6)
        seconds = self._cached("optimizer", fn=optimizer.step)
        for p in params:
            p.grad = None
        return seconds
