"""Memory per device: one model in one role, and the PPO / RLOO layouts of several models.

Conventions
-----------
* Numbers are **bytes per device**. ``batch_size`` is the per-device micro-batch; data-parallel
  replicas each hold their own activations.
* ``dtype`` holds the weights. With ``"bf16"``/``"fp16"`` and ``mixed_precision=True`` (the
  default) trainable parameters also get an fp32 master copy, as in DeepSpeed/Megatron mixed
  precision (Rajbhandari et al. 2020, "ZeRO"): 2 bytes weight + 2 gradient + 4 master + 8 AdamW
  = 16 bytes per trainable parameter.
* LoRA adapters are held in fp32 (peft's default ``autocast_adapter_dtype=True``): each adapter
  parameter costs 4 (weight) + 4 (gradient) + optimizer states, no master copy.
* ``total`` is the plain sum of the parts. It assumes gradients and activations coexist, which is
  exact under gradient accumulation (``.grad`` buffers persist across micro-batches) and an upper
  bound otherwise (by up to ``min(gradients, activations)``).
"""

from __future__ import annotations

from typing import Any

from align.estimate.activations import ADAPTER_BYTES, activation_bytes, kv_cache_bytes
from align.estimate.params import PlanError, count_parameters, lora_parameters, lora_target_names, \
    value_head_parameters
from align.estimate.settings import OPTIMIZERS, Settings, settings

#: bitsandbytes NF4: 4-bit codes, one absmax per block of 64 weights.
NF4_BLOCKSIZE = 64
#: Double quantisation quantises those absmax values to 8 bits in blocks of 256.
NF4_NESTED_BLOCKSIZE = 256

BYTE_KEYS = ("weights", "gradients", "optimizer", "activations", "kv_cache")


def nf4_bytes_per_param(double_quant: bool = True) -> float:
    """Storage of one NF4-quantised weight (bitsandbytes, as QLoRA uses it).

    4-bit code = 0.5 byte, plus one absmax scale per block of 64 weights:

    * without double quantisation the absmax is fp32: 4/64 = 0.0625 byte → 0.5625 byte;
    * with double quantisation (QLoRA's default) each absmax is stored as 1 byte (8-bit
      blockwise, blocks of 256 absmax values) plus one fp32 second-level scale per 256 blocks:
      1/64 + 4/(64·256) → 0.515869 byte.

    (The 256-entry fp32 code table and one fp32 offset per matrix are ignored.)
    """
    if double_quant:
        return 0.5 + 1 / NF4_BLOCKSIZE + 4 / (NF4_BLOCKSIZE * NF4_NESTED_BLOCKSIZE)
    return 0.5 + 4 / NF4_BLOCKSIZE


def optimizer_bytes_per_param(optimizer: str, weight_bytes: int, mixed_precision: bool) -> float:
    n_states, state_bytes = OPTIMIZERS[optimizer.lower()]
    if state_bytes is None:  # fp32 states, or the parameter dtype in pure half precision
        state_bytes = 4 if (mixed_precision or weight_bytes == 4) else weight_bytes
    return n_states * state_bytes


def shard(parts: dict[str, float], s: Settings, counts: dict[str, Any]) -> dict[str, float]:
    """What one of ``s.processes`` processes holds under ``s.engine``.

    DDP: everything. ZeRO-1: optimizer states (and master weights) / P. ZeRO-2: also gradients / P.
    ZeRO-3 and FSDP FULL_SHARD: also weights / P, plus one gathered unit in ``dtype`` (the larger
    of one decoder layer and the embedding), which the engine materialises while computing it.
    Activations and the KV cache are never sharded.
    """
    P, stage = s.processes, s.shards
    out = dict(parts)
    if stage >= 1:
        out["optimizer"] = parts["optimizer"] / P
    if stage >= 2:
        out["gradients"] = parts["gradients"] / P
    if stage >= 3:
        per_layer = counts["per_layer"] or counts["non_embedding"] / max(counts["num_layers"], 1)
        out["weights"] = parts["weights"] / P + max(per_layer, counts["embedding"]) * s.bytes
    return out


def estimate_memory(config, base: Settings | None = None, /, *, role: str = "train", head: str = "lm",
                    **fields) -> dict[str, int]:
    """Per-device memory of one model in one role, in bytes.

    ``base`` with ``fields`` replaced (see :class:`Settings`) says how it is trained. Returns
    ``params`` (resident, adapters included), ``trainable_params`` and the byte split ``weights``,
    ``gradients``, ``optimizer``, ``activations``, ``kv_cache``, ``total``.

    Let N = total parameters, n = trainable parameters, b = bytes of ``dtype``, s = optimizer
    state bytes per parameter (AdamW: 2 fp32 moments = 8; 8-bit AdamW: 2).

    * ``method="full"``: weights N·b; gradients N·b; optimizer N·s, plus an fp32 master copy 4·N
      when b < 4 and ``mixed_precision`` (bf16 + AdamW = 2 + 2 + 12 = 16 bytes/param; fp32 + AdamW
      = 4 + 4 + 8 = 16). ``mixed_precision=False`` means pure half precision: no master copy and
      AdamW moments in the parameter dtype (2 + 2 + 4 = 8 bytes/param).
    * ``method="lora"``: frozen base N·b, adapters n = :func:`lora_parameters` in fp32: weights
      4n, gradients 4n, optimizer n·s (fp32 states).
    * ``method="qlora"``: like LoRA, but the linear weights (``linear`` in
      :func:`count_parameters`) take :func:`nf4_bytes_per_param` bytes; embeddings, lm_head,
      norms and biases stay in ``dtype``.
    * ``head="value"``: the LM head is replaced by a scalar head (+h params, trainable and fp32
      for LoRA), as for a reward model or PPO critic.

    Then :func:`shard` divides what the engine shards across processes. ``role="frozen"``
    (reference or reward model scoring) and ``role="generate"`` hold weights only plus a no-grad
    working set; ``generate`` adds the KV cache for ``batch_size`` sequences of ``seq_len`` tokens.
    """
    s = settings(base, **fields)
    if role not in ("train", "frozen", "generate"):
        raise PlanError(f"unknown role {role!r}; expected train, frozen or generate")
    b = s.bytes
    counts = count_parameters(config)
    N = counts["total"]
    vh = 0
    if head == "value":  # a sequence-classification model: scalar score head, no lm_head
        N -= counts["lm_head"]
        vh = value_head_parameters(config)

    if s.method == "full":
        targets: list[str] = []
        n_adapter = 0
        base_bytes = (N + vh) * b
        trainable = N + vh if role == "train" else 0
    else:
        targets = lora_target_names(config, s.target_modules)
        n_adapter = lora_parameters(config, s.r, targets) + vh
        if s.method == "qlora":
            q = counts["linear"]
            base_bytes = q * nf4_bytes_per_param(s.double_quant) + (N - q) * b
        else:
            base_bytes = N * b
        trainable = n_adapter if role == "train" else 0

    parts = dict.fromkeys(BYTE_KEYS, 0.0)
    parts["weights"] = base_bytes + n_adapter * ADAPTER_BYTES
    if role == "train":
        if s.method == "full":
            parts["gradients"] = trainable * b
            master = 4 if (b < 4 and s.mixed_precision) else 0
            parts["optimizer"] = trainable * (optimizer_bytes_per_param(s.optimizer, b, s.mixed_precision) + master)
        else:
            parts["gradients"] = trainable * ADAPTER_BYTES
            parts["optimizer"] = trainable * optimizer_bytes_per_param(s.optimizer, ADAPTER_BYTES, True)
    parts = shard(parts, s, counts)
    parts["activations"] = activation_bytes(config, s, role=role, head=head, targets=targets)
    parts["kv_cache"] = kv_cache_bytes(config, s.batch_size, s.seq_len, s.dtype) if role == "generate" else 0
    parts = {k: int(round(v)) for k, v in parts.items()}
    return {
        "params": N + vh if s.method == "full" else N + n_adapter,
        "trainable_params": trainable,
        **parts,
        "total": sum(parts.values()),
    }


def _layout(weights, params, trainable, gradients, optimizer, phases, kv_cache) -> dict[str, Any]:
    """Several models, one after another through phases: the static parts plus the largest phase."""
    return {"params": params, "trainable_params": trainable, "weights": weights, "gradients": gradients,
            "optimizer": optimizer, "activations": phases["training"], "kv_cache": kv_cache,
            "total": weights + gradients + optimizer + max(phases.values()), "phases": phases}


def estimate_ppo_memory(config, base: Settings | None = None, /, *, prompt_len: int = 512,
                        response_len: int = 512, reward_config=None, value_head_on_policy: bool = False,
                        **fields) -> dict[str, Any]:
    """Per-device memory of a PPO run: policy, reference, critic and reward model.

    ``method="full"``: four separate models. Policy = trainable LM; critic = trainable copy of the
    backbone with a scalar value head; reference = frozen LM; reward = frozen backbone with a
    scalar head (``reward_config`` if given, else the policy's architecture; the critic follows
    the reward model's architecture, as it is usually initialised from it).

    ``method="lora"``/``"qlora"``: one shared frozen base plus fp32 adapters: the policy adapter
    (trainable), the critic adapter + value head (trainable), the reward adapter + its head
    (frozen). The reference is the base with adapters disabled. A ``reward_config`` differing
    from ``config`` makes the reward model a separate frozen model in ``dtype``.

    ``value_head_on_policy``: no critic network; an fp32 value head on the policy's hidden states
    (weights, gradient and Adam state of ``h`` parameters), no activations of its own.

    Sequences are ``prompt_len + response_len`` tokens, ``batch_size`` of them per device. The
    phases run one after another, so only the largest transient counts: generation (KV cache +
    the policy's generate working set), scoring (the largest no-grad forward of reference, reward
    and critic), training (policy and critic activations together).
    ``total = weights + gradients + optimizer + max(phases)``; ``roles`` holds each role's own
    :func:`estimate_memory` (with LoRA each includes the shared base, counted once on top).
    """
    s = settings(base, **fields).with_(seq_len=prompt_len + response_len)
    rcfg = reward_config if reward_config is not None else config
    separate_reward = reward_config is not None and reward_config.to_dict() != config.to_dict()
    roles = {
        "policy": estimate_memory(config, s, role="train"),
        "reference": estimate_memory(config, s, role="frozen"),
        "critic": estimate_memory(rcfg, s, role="train", head="value"),
        "reward": estimate_memory(rcfg, s.with_(method="full") if separate_reward else s, role="frozen",
                                  head="value"),
    }
    generation = estimate_memory(config, s, role="generate")
    critic_scoring = estimate_memory(rcfg, s, role="frozen", head="value")["activations"]
    if value_head_on_policy:
        h = value_head_parameters(config)
        roles["critic"] = {"params": h, "trainable_params": h, "weights": h * ADAPTER_BYTES,
                           "gradients": h * ADAPTER_BYTES, "optimizer": 2 * h * ADAPTER_BYTES, "activations": 0}
        critic_scoring = 0

    vh = value_head_parameters(rcfg)
    if s.method == "full":
        weights = sum(roles[k]["weights"] for k in ("policy", "reference", "critic", "reward"))
        params = sum(roles[k]["params"] for k in ("policy", "reference", "critic", "reward"))
    else:
        # One base, held by the policy estimate (base + policy adapter); add the critic adapter +
        # head (or the bare head) and the reward adapter + head (or a separate reward model).
        weights = roles["policy"]["weights"] + roles["critic"]["weights"] * value_head_on_policy
        params = roles["policy"]["params"] + roles["critic"]["params"] * value_head_on_policy
        if not value_head_on_policy:
            critic_adapter = lora_parameters(rcfg, s.r, s.target_modules) + vh
            weights += critic_adapter * ADAPTER_BYTES
            params += critic_adapter
        if separate_reward:
            weights += roles["reward"]["weights"]
            params += roles["reward"]["params"]
        else:
            reward_adapter = lora_parameters(config, s.r, s.target_modules) + vh
            weights += reward_adapter * ADAPTER_BYTES
            params += reward_adapter
    phases = {
        "generation": generation["kv_cache"] + generation["activations"],
        "scoring": max(roles["reference"]["activations"], roles["reward"]["activations"], critic_scoring),
        "training": roles["policy"]["activations"] + roles["critic"]["activations"],
    }
    out = _layout(weights, params, roles["policy"]["trainable_params"] + roles["critic"]["trainable_params"],
                  roles["policy"]["gradients"] + roles["critic"]["gradients"],
                  roles["policy"]["optimizer"] + roles["critic"]["optimizer"], phases, generation["kv_cache"])
    out["roles"] = roles
    return out


def estimate_online_memory(config, base: Settings | None = None, /, *, prompt_len: int = 512,
                           completion_len: int = 512, generation_batch_size: int | None = None,
                           beta: float = 0.0, reward_config=None, **fields) -> dict[str, Any]:
    """Per-device memory of an RLOO / GRPO run on TRL: a trainable policy, no critic.

    * reference: only when ``beta > 0``; a frozen copy with full fine-tuning, nothing extra with
      LoRA/QLoRA (TRL disables the adapter for it);
    * reward: with ``reward_config``, a separate frozen sequence classifier in ``dtype`` (align's
      rloo/grpo stages load the reward model on its own); reward functions cost none;
    * phases, one after another: generation of ``generation_batch_size`` completions (KV cache),
      scoring (no-grad reference / reward forwards), training on ``batch_size``.

    Same keys as :func:`estimate_ppo_memory` (no ``roles``).
    """
    s = settings(base, **fields).with_(seq_len=prompt_len + completion_len)
    policy = estimate_memory(config, s, role="train")
    generation = estimate_memory(config, s.with_(batch_size=generation_batch_size or s.batch_size),
                                 role="generate")
    frozen = s.with_(gradient_checkpointing=False)
    weights, params, scoring = policy["weights"], policy["params"], 0
    if beta > 0:
        ref = estimate_memory(config, frozen, role="frozen")
        scoring = ref["activations"]
        if s.method == "full":
            weights += ref["weights"]
            params += ref["params"]
    if reward_config is not None:
        reward = estimate_memory(reward_config, frozen.with_(method="full"), role="frozen", head="value")
        weights += reward["weights"]
        params += reward["params"]
        scoring = max(scoring, reward["activations"])
    phases = {"generation": generation["kv_cache"] + generation["activations"], "scoring": scoring,
              "training": policy["activations"]}
    return _layout(weights, params, policy["trainable_params"], policy["gradients"], policy["optimizer"],
                   phases, generation["kv_cache"])
