"""``align plan``: estimate parameters, memory, FLOPs and time before spending compute.

Everything here is a pure function of plain inputs (a ``transformers`` config plus numbers
and strings), so the CLI and the recipe loader can call it without building a model.

Conventions
-----------
* Memory numbers are **bytes per device** (per GPU). ``batch_size`` is the per-device
  micro-batch; data-parallel replicas each hold their own activations.
* ``dtype`` is the dtype the model weights are held in. With ``"bf16"``/``"fp16"`` and
  ``mixed_precision=True`` (the default) trainable parameters also get an fp32 master copy,
  as in DeepSpeed/Megatron mixed precision (Rajbhandari et al. 2020, "ZeRO"): 2 bytes
  weight + 2 bytes gradient + 4 master + 8 AdamW = 16 bytes per trainable parameter.
* LoRA adapters are held in fp32 (peft's default ``autocast_adapter_dtype=True``), so each
  adapter parameter costs 4 (weight) + 4 (gradient) + optimizer states, no master copy.
* ``total`` is the plain sum of the parts. It assumes gradients and activations coexist,
  which is exact under gradient accumulation (``.grad`` buffers persist across
  micro-batches) and an upper bound otherwise: with ``zero_grad(set_to_none=True)`` and no
  accumulation, gradients are allocated while activations are being freed, so the real peak
  can be up to ``min(gradients, activations)`` lower.
* FLOPs follow Kaplan et al. 2020 / Hoffmann et al. 2022: 2·N per token for a forward pass,
  6·N per token for forward + backward; attention-score FLOPs are ignored.

The activation model was derived by counting the tensors autograd saves in the Hugging
Face Llama/Mistral/Qwen2/Qwen3 decoder blocks (checked against ``saved_tensors_hooks`` and
against a measured training run in ``tests/test_plan.py``); see :func:`activation_bytes`.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Mapping, Sequence

from align.errors import AlignError

__all__ = [
    "PlanError",
    "DTYPE_BYTES",
    "OPTIMIZERS",
    "PEAK_FLOPS",
    "count_parameters",
    "lora_parameters",
    "lora_target_names",
    "value_head_parameters",
    "nf4_bytes_per_param",
    "kv_cache_bytes",
    "activation_bytes",
    "estimate_memory",
    "estimate_ppo_memory",
    "flops",
    "ppo_flops",
    "chinchilla_tokens",
    "compute_optimal",
    "estimate_time",
    "format_plan",
]


class PlanError(AlignError, ValueError):
    """An invalid planning input (unknown dtype, method, optimizer, target module...)."""


GiB = 1024**3
MiB = 1024**2

DTYPE_BYTES: dict[str, int] = {
    "fp32": 4, "float32": 4, "float": 4,
    "bf16": 2, "bfloat16": 2,
    "fp16": 2, "float16": 2, "half": 2,
}

#: Bytes of optimizer state per trainable parameter, as (number of states, bytes per state
#: or ``None`` for "fp32, or the parameter dtype without mixed precision").
#: AdamW keeps two moments (m, v); Lion one; SGD without momentum none. bitsandbytes 8-bit
#: optimizers keep both moments in 1 byte each (blockwise, block 2048 with one fp32 absmax
#: per block: +0.2 %, ignored). Adafactor's factored second moment is O(rows+cols) per
#: matrix and it keeps no first moment by default: ~0 bytes per parameter.
OPTIMIZERS: dict[str, tuple[int, int | None]] = {
    "adamw": (2, None), "adam": (2, None), "adamw_torch": (2, None),
    "adamw_torch_fused": (2, None), "paged_adamw_32bit": (2, None),
    "adamw_8bit": (2, 1), "adamw_bnb_8bit": (2, 1), "paged_adamw_8bit": (2, 1),
    "lion": (1, None), "sgd_momentum": (1, None),
    "sgd": (0, None), "adafactor": (0, None),
}

#: Dense (no sparsity) bf16 tensor-core peak FLOP/s from NVIDIA datasheets, SXM parts.
PEAK_FLOPS: dict[str, float] = {"a100": 312e12, "h100": 989e12, "h200": 989e12}

#: Bytes per LoRA adapter parameter (peft keeps adapters in fp32 by default).
ADAPTER_BYTES = 4

#: bitsandbytes NF4: 4-bit codes, one absmax per block of 64 weights.
NF4_BLOCKSIZE = 64
#: Double quantisation quantises those absmax values to 8 bits in blocks of 256.
NF4_NESTED_BLOCKSIZE = 256

# Linear modules of one Llama-style decoder layer, grouped by the tensor they read.
_ATTN_IN = ("q_proj", "k_proj", "v_proj")
_ATTN_OUT = ("o_proj",)
_MLP_IN = ("gate_proj", "up_proj")
_MLP_MID = ("down_proj",)
_LAYER_LINEARS = _ATTN_IN + _ATTN_OUT + _MLP_IN + _MLP_MID
_EXTRA_TARGETS = ("lm_head", "embed_tokens")

# Architectures counted analytically. A bias entry is a bool or the config attribute that
# switches it on; "norms" is the number of RMSNorms per layer; "qk_norm" adds Qwen3's
# per-head RMSNorms on queries and keys.
_ARCHS: dict[str, dict[str, Any]] = {
    "llama": {"qkv_bias": "attention_bias", "o_bias": "attention_bias", "mlp_bias": "mlp_bias"},
    "mistral": {},
    "qwen2": {"qkv_bias": True},
    "qwen3": {"qkv_bias": "attention_bias", "o_bias": "attention_bias", "qk_norm": True},
    "gemma": {"qkv_bias": "attention_bias", "o_bias": "attention_bias"},
    "gemma2": {"qkv_bias": "attention_bias", "o_bias": "attention_bias", "norms": 4},
}


# --------------------------------------------------------------------------- helpers


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _dtype_bytes(dtype) -> int:
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPE_BYTES:
        raise PlanError(f"unknown dtype {dtype!r}; expected one of bf16, fp16, fp32")
    return DTYPE_BYTES[key]


def _flag(config, spec) -> bool:
    if isinstance(spec, str):
        return bool(getattr(config, spec, False) or False)
    return bool(spec)


def _dims(config) -> dict[str, int]:
    """Shapes used by every formula: h, intermediate i, layers L, heads a, kv heads, d_head, V."""
    config = _text_config(config)
    h = int(config.hidden_size)
    a = int(config.num_attention_heads)
    kvh = int(getattr(config, "num_key_value_heads", None) or a)
    d = int(getattr(config, "head_dim", None) or h // a)
    i = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h
    return {
        "h": h, "i": int(i), "L": int(config.num_hidden_layers), "a": a, "kvh": kvh, "d": d,
        "q": a * d, "kv": kvh * d, "V": int(config.vocab_size),
    }


def _tied(config) -> bool:
    return bool(getattr(_text_config(config), "tie_word_embeddings", False))


def _layer_linears(config) -> dict[str, tuple[int, int, bool]]:
    """name -> (in_features, out_features, has_bias) for one decoder layer (analytic archs)."""
    spec = _ARCHS[_text_config(config).model_type]
    g = _dims(config)
    qkv_b = _flag(config, spec.get("qkv_bias", False))
    o_b = _flag(config, spec.get("o_bias", False))
    mlp_b = _flag(config, spec.get("mlp_bias", False))
    return {
        "q_proj": (g["h"], g["q"], qkv_b),
        "k_proj": (g["h"], g["kv"], qkv_b),
        "v_proj": (g["h"], g["kv"], qkv_b),
        "o_proj": (g["q"], g["h"], o_b),
        "gate_proj": (g["h"], g["i"], mlp_b),
        "up_proj": (g["h"], g["i"], mlp_b),
        "down_proj": (g["i"], g["h"], mlp_b),
    }


def _linear_classes():
    import torch

    try:
        from transformers.pytorch_utils import Conv1D  # GPT-2 style linear layers
    except ImportError:  # pragma: no cover
        return (torch.nn.Linear,)
    return (torch.nn.Linear, Conv1D)


def _in_out(module) -> tuple[int, int]:
    if hasattr(module, "in_features"):
        return module.in_features, module.out_features
    return module.weight.shape[0], module.weight.shape[1]  # Conv1D stores (in, out)


def _meta_model(config):
    """Instantiate on the meta device: exact structure, no memory, no initialisation."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


# --------------------------------------------------------------------------- parameters


def count_parameters(config) -> dict[str, Any]:
    """Parameter count of a decoder-only causal LM, computed from its config.

    For Llama, Mistral, Qwen2, Qwen3, Gemma and Gemma2 the count is analytic
    (``source="analytic"``), with h = hidden_size, a = attention heads, k = key/value heads
    (GQA), d = head_dim (``hidden_size // heads`` when unset), i = intermediate_size,
    V = vocab_size, L = layers::

        embedding  = V·h
        lm_head    = 0 if tie_word_embeddings else V·h
        attention  = h·a·d + 2·h·k·d + a·d·h           (q, k, v, o projections)
                     + (a·d + 2·k·d) if q/k/v have biases (Qwen2 always; Llama/Qwen3 with
                       attention_bias) + h if o_proj has a bias (attention_bias)
                     + 2·d for Qwen3's per-head q_norm/k_norm
        mlp        = 3·h·i  (gated: gate, up, down)  + 2·i + h with mlp_bias
        norms      = (2 RMSNorms per layer, 4 for Gemma2)·h per layer + h for the final norm
        total      = embedding + lm_head + L·(attention + mlp + layer norms) + h

    Other architectures are counted exactly by instantiating the model on PyTorch's meta
    device (no memory, no weights; ``source="meta"``); the per-part keys are then ``None``.

    Returns a dict with ``total``, ``embedding``, ``lm_head``, ``attention``, ``mlp``,
    ``norms``, ``biases`` (all layers), ``per_layer``, ``num_layers``, ``linear`` (weights of
    the decoder-layer linear layers: what QLoRA quantises), ``non_embedding``
    (total − embedding − lm_head), ``tied`` and ``source``.
    """
    config = _text_config(config)
    model_type = getattr(config, "model_type", None)
    tied = _tied(config)
    if model_type not in _ARCHS:
        return _count_parameters_meta(config)
    spec = _ARCHS[model_type]
    g = _dims(config)
    h, L, V = g["h"], g["L"], g["V"]
    linears = _layer_linears(config)
    weights = {n: fin * fout for n, (fin, fout, _) in linears.items()}
    biases = {n: fout if b else 0 for n, (_, fout, b) in linears.items()}
    attn = sum(weights[n] + biases[n] for n in _ATTN_IN + _ATTN_OUT)
    if spec.get("qk_norm"):
        attn += 2 * g["d"]
    mlp = sum(weights[n] + biases[n] for n in _MLP_IN + _MLP_MID)
    layer_norms = spec.get("norms", 2) * h
    per_layer = attn + mlp + layer_norms
    embedding = V * h
    lm_head = 0 if tied else V * h
    total = embedding + lm_head + L * per_layer + h
    return {
        "total": total,
        "embedding": embedding,
        "lm_head": lm_head,
        "attention": L * attn,
        "mlp": L * mlp,
        "norms": L * layer_norms + h,
        "biases": L * sum(biases.values()),
        "per_layer": per_layer,
        "num_layers": L,
        "linear": L * sum(weights.values()),
        "non_embedding": total - embedding - lm_head,
        "tied": tied,
        "source": "analytic",
    }


def _count_parameters_meta(config) -> dict[str, Any]:
    model = _meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    emb_mod, out_mod = model.get_input_embeddings(), model.get_output_embeddings()
    embedding = emb_mod.weight.numel() if emb_mod is not None else 0
    tied = out_mod is not None and emb_mod is not None and out_mod.weight is emb_mod.weight
    lm_head = 0 if (out_mod is None or tied) else sum(p.numel() for p in out_mod.parameters())
    linear = sum(
        m.weight.numel() for m in model.modules() if isinstance(m, _linear_classes()) and m is not out_mod
    )
    L = int(getattr(config, "num_hidden_layers", 0) or 0)
    return {
        "total": total,
        "embedding": embedding,
        "lm_head": lm_head,
        "attention": None,
        "mlp": None,
        "norms": None,
        "biases": None,
        "per_layer": None,
        "num_layers": L,
        "linear": linear,
        "non_embedding": total - embedding - lm_head,
        "tied": tied,
        "source": "meta",
    }


def lora_target_names(config, target_modules: str | Iterable[str] = "all-linear") -> list[str]:
    """Resolve ``target_modules`` (``"all-linear"``, ``"q_proj,v_proj"`` or a list) to module names.

    ``"all-linear"`` follows peft: every ``nn.Linear`` except the output layer (lm_head).
    Names are matched like peft matches them: a module whose name ends with the target.
    Unknown names raise :class:`PlanError` (peft would silently skip them), so typos surface.
    """
    config = _text_config(config)
    if isinstance(target_modules, str):
        if target_modules.strip().lower() == "all-linear":
            if config.model_type in _ARCHS:
                return list(_LAYER_LINEARS)
            return sorted(_meta_linear_suffixes(config) - {"lm_head"})
        names = [t.strip() for t in target_modules.split(",") if t.strip()]
    else:
        names = [str(t).strip() for t in target_modules]
    if not names:
        raise PlanError("target_modules is empty")
    known = set(_LAYER_LINEARS + _EXTRA_TARGETS) if config.model_type in _ARCHS else (
        _meta_linear_suffixes(config) | {"embed_tokens"}
    )
    unknown = [n for n in names if n not in known]
    if unknown:
        raise PlanError(
            f"unknown LoRA target module(s) {unknown} for {config.model_type}; "
            f"known: {', '.join(sorted(known))} or 'all-linear'"
        )
    return list(dict.fromkeys(names))


def _meta_linear_suffixes(config) -> set[str]:
    model = _meta_model(config)
    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, _linear_classes())}


def lora_parameters(config, r: int, target_modules: str | Iterable[str] = "all-linear") -> int:
    """Trainable LoRA parameters: ``r·(in + out)`` per adapted ``Linear(in, out)``.

    LoRA adds A (r × in) and B (out × r) to every targeted linear layer of every decoder
    layer. ``embed_tokens`` gets ``r·(V + h)`` (A: r × V, B: h × r); ``lm_head`` ``r·(h + V)``.
    Biases stay frozen (peft ``bias="none"``). Summed over the L layers.
    """
    if r <= 0:
        raise PlanError(f"LoRA rank must be positive, got {r}")
    config = _text_config(config)
    names = lora_target_names(config, target_modules)
    g = _dims(config)
    if config.model_type not in _ARCHS:
        return _lora_parameters_meta(config, r, names)
    linears = _layer_linears(config)
    total = 0
    for n in names:
        if n in linears:
            fin, fout, _ = linears[n]
            total += g["L"] * r * (fin + fout)
        else:  # lm_head or embed_tokens
            total += r * (g["h"] + g["V"])
    return total


def _lora_parameters_meta(config, r: int, names: Sequence[str]) -> int:
    import torch

    model = _meta_model(config)
    total = 0
    for name, m in model.named_modules():
        suffix = name.rsplit(".", 1)[-1]
        if suffix not in names:
            continue
        if isinstance(m, _linear_classes()):
            total += r * sum(_in_out(m))
        elif isinstance(m, torch.nn.Embedding):
            total += r * (m.num_embeddings + m.embedding_dim)
    return total


def value_head_parameters(config, bias: bool = False) -> int:
    """A scalar value/reward head ``Linear(h, 1)``: h parameters (+1 with a bias).

    This is ``AutoModelForSequenceClassification``'s ``score`` layer with ``num_labels=1``
    (no bias), which PPO's critic and reward model use.
    """
    return _dims(config)["h"] + (1 if bias else 0)


# --------------------------------------------------------------------------- memory


def nf4_bytes_per_param(double_quant: bool = True) -> float:
    """Storage of one NF4-quantised weight (bitsandbytes, as QLoRA uses it).

    4-bit code = 0.5 byte, plus one absmax scale per block of 64 weights:

    * without double quantisation the absmax is fp32: 4/64 = 0.0625 byte → 0.5625 byte;
    * with double quantisation (QLoRA's default, ``bnb_4bit_use_double_quant=True``) each
      absmax is stored as 1 byte (8-bit blockwise, blocks of 256 absmax values) plus one
      fp32 second-level scale per 256 blocks: 1/64 + 4/(64·256) → 0.515869 byte.

    (The 256-entry fp32 code table and one fp32 offset per matrix are ignored.)
    """
    if double_quant:
        return 0.5 + 1 / NF4_BLOCKSIZE + 4 / (NF4_BLOCKSIZE * NF4_NESTED_BLOCKSIZE)
    return 0.5 + 4 / NF4_BLOCKSIZE


def kv_cache_bytes(config, batch_size: int, seq_len: int, dtype: str = "bf16") -> int:
    """KV cache for generation: ``2 · L · kv_heads · head_dim · batch · seq_len · bytes``.

    ``seq_len`` is prompt + response; the factor 2 is keys and values.
    """
    g = _dims(config)
    return 2 * g["L"] * g["kvh"] * g["d"] * batch_size * seq_len * _dtype_bytes(dtype)


def _optimizer_bytes_per_param(optimizer: str, weight_bytes: int, mixed_precision: bool) -> float:
    key = optimizer.lower()
    if key not in OPTIMIZERS:
        raise PlanError(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    n_states, state_bytes = OPTIMIZERS[key]
    if state_bytes is None:  # fp32 states, or the parameter dtype in pure half precision
        state_bytes = 4 if (mixed_precision or weight_bytes == 4) else weight_bytes
    return n_states * state_bytes


def activation_bytes(
    config,
    *,
    batch_size: int,
    seq_len: int,
    dtype: str = "bf16",
    method: str = "full",
    role: str = "train",
    targets: Sequence[str] = (),
    r: int = 16,
    lora_dropout: float = 0.0,
    gradient_checkpointing: bool = False,
    attention: str = "sdpa",
    head: str = "lm",
) -> int:
    """Activation memory in bytes for one micro-batch of ``T = batch_size·seq_len`` tokens.

    Notation: b = bytes of ``dtype``; h, i, L, V as in :func:`count_parameters`;
    q = heads·head_dim, kv = kv_heads·head_dim, a = heads, s = seq_len. Per token:

    **Training, one decoder layer** (tensors autograd saves in the HF Llama/Qwen block):

    * each RMSNorm (width h): the fp32 input it upcasts to (4h; in fp32 this is the residual
      stream itself) + fp32 rsqrt (4) + the normalised tensor (b·h, only when the norm
      weight trains) + its output (b·h, when the next linear saves its input);
    * attention with a fused kernel (``sdpa``/``flash``): post-RoPE q and k, v and the output
      (b·(2q + 2kv)) + fp32 log-sum-exp (4a); ``eager`` instead saves q, k, v (b·(q + 2kv)),
      the fp32 softmax (4·a·s, the O(s²) term) plus its b-dtype copy when b < 4, and the
      output for o_proj (b·q);
    * gated MLP: gate, up, act(gate) (3·b·i) + their product for down_proj (b·i);
    * Qwen3 q/k norms: fp32 inputs 4(q + kv) + rsqrt 4(a + kv_heads) (+ b(q + kv) in full).

    Full fine-tuning, fp32: 2(12h + 4) + 4(2q + 2kv) + 4a + 16i. This plays the role of the
    34·s·b·h term of Korthikanti et al. 2022 (GPT block, 16-bit, no recomputation), rewritten
    for RMSNorm + gated-MLP blocks and with no dropout masks.

    **LoRA / QLoRA**: frozen base linears (``nn.Linear`` or bitsandbytes ``Linear4bit``) save
    nothing for their own weights, so the normalised tensors are not kept. Each adapted
    linear with input width w saves its LoRA-A output (4r, fp32 adapters) and its input:
    shared with the others reading the same tensor when the compute dtype is fp32 and
    ``lora_dropout == 0``; otherwise peft makes one fp32 copy per adapter (4w), or, with
    dropout, the dropout output (4w) plus a 1-byte mask (w; CUDA's bool mask).

    **Head** (``head="lm"``): final norm as above, then the logits (b·V, kept alive by the
    model output), the fp32 log-softmax the loss saves (4V) and, at the start of backward,
    two fp32 V-sized gradients (8V): V·(b + 12). ``head="value"`` (reward model / critic)
    has a scalar output: no V term.

    **Gradient checkpointing** (HF, one checkpoint per layer): L·b·h (each layer's input) +
    one layer's activations (recomputed during backward) + head.

    **No-grad forward** (``role="frozen"``: reference / reward scoring): nothing is saved;
    the working set is one MLP at a time, b·(2h + 3i), plus for an LM head the logits and
    log-probs V·(b + 4 + 4·[b < 4]). ``role="generate"``: the same layer working set over
    the prompt (prefill) plus last-token logits batch·V·(b + 4); the KV cache is separate
    (:func:`kv_cache_bytes`).

    Not modelled: dropout in the base model (0 in these architectures), attention masks
    that force ``repeat_kv`` copies, and allocator fragmentation.
    """
    b = _dtype_bytes(dtype)
    g = _dims(config)
    h, i, L, V, a = g["h"], g["i"], g["L"], g["V"], g["a"]
    T = batch_size * seq_len
    if attention not in ("sdpa", "flash", "flash_attention_2", "eager"):
        raise PlanError(f"unknown attention implementation {attention!r}")
    if head not in ("lm", "value"):
        raise PlanError(f"unknown head {head!r}; expected 'lm' or 'value'")

    if role in ("frozen", "generate"):
        layer_ws = b * (2 * h + 3 * i)
        if role == "generate":
            return T * layer_ws + (batch_size * V * (b + 4) if head == "lm" else 0)
        logits = V * (b + 4 + (4 if b < 4 else 0)) if head == "lm" else 0
        return T * (layer_ws + logits)
    if role != "train":
        raise PlanError(f"unknown role {role!r}; expected train, frozen or generate")

    full = method == "full"
    model_type = getattr(_text_config(config), "model_type", None)
    spec = _ARCHS.get(model_type, {})
    targets = set(targets)
    ba = ADAPTER_BYTES

    def group(names: Sequence[str], width: int) -> tuple[bool, int]:
        """(is the shared input tensor saved?, extra adapter bytes) for linears reading one tensor."""
        saved, extra = full, 0
        for n in names:
            if n not in targets:
                continue
            extra += ba * r
            if lora_dropout > 0:
                extra += (ba + 1) * width
            elif b != ba:
                extra += ba * width
            else:
                saved = True
        return saved, extra

    def norm(width: int, out_saved: bool) -> int:
        return 4 * width + 4 + (b * width if full else 0) + (b * width if out_saved else 0)

    attn_in_saved, attn_in_extra = group(_ATTN_IN, h)
    attn_out_saved, attn_out_extra = group(_ATTN_OUT, g["q"])
    mlp_in_saved, mlp_in_extra = group(_MLP_IN, h)
    mlp_mid_saved, mlp_mid_extra = group(_MLP_MID, i)

    layer = norm(h, attn_in_saved) + norm(h, mlp_in_saved)
    layer += (spec.get("norms", 2) - 2) * norm(h, False)
    if attention == "eager":
        layer += b * (g["q"] + 2 * g["kv"]) + a * seq_len * (4 + (b if b < 4 else 0))
        layer += b * g["q"] if attn_out_saved else 0
    else:
        layer += b * (2 * g["q"] + 2 * g["kv"]) + 4 * a  # output already saved by the kernel
    if spec.get("qk_norm"):
        layer += 4 * (g["q"] + g["kv"]) + 4 * (a + g["kvh"])
        layer += b * (g["q"] + g["kv"]) if full else 0
    layer += 3 * b * i + (b * i if mlp_mid_saved else 0)
    layer += attn_in_extra + attn_out_extra + mlp_in_extra + mlp_mid_extra

    head_saved, head_extra = group(("lm_head",), h) if head == "lm" else (full, 0)
    head_bytes = norm(h, head_saved) + head_extra + (V * (b + 12) if head == "lm" else 0)

    if gradient_checkpointing:
        per_token = L * b * h + layer + head_bytes
    else:
        per_token = L * layer + head_bytes
    return T * per_token


def estimate_memory(
    config,
    *,
    method: str = "full",
    r: int = 16,
    target_modules: str | Iterable[str] = "all-linear",
    lora_dropout: float = 0.0,
    dtype: str = "bf16",
    mixed_precision: bool = True,
    optimizer: str = "adamw",
    batch_size: int = 1,
    seq_len: int = 2048,
    gradient_checkpointing: bool = False,
    world_size: int = 1,
    zero_stage: int = 0,
    fsdp: bool = False,
    role: str = "train",
    head: str = "lm",
    attention: str = "sdpa",
    double_quant: bool = True,
) -> dict[str, int]:
    """Per-device memory of one model in one role, in bytes.

    Returns ``params`` (resident, adapters included), ``trainable_params`` and the byte
    split ``weights``, ``gradients``, ``optimizer``, ``activations``, ``kv_cache``, ``total``.

    Let N = total parameters, n = trainable parameters, b = bytes of ``dtype``, s = optimizer
    state bytes per parameter (AdamW: 2 fp32 moments = 8; 8-bit AdamW: 2; see
    :data:`OPTIMIZERS`).

    * ``method="full"``: weights N·b; gradients N·b; optimizer N·s, plus an fp32 master copy
      4·N when b < 4 and ``mixed_precision`` (so bf16 + AdamW = 2 + 2 + 12 = 16 bytes/param;
      fp32 + AdamW = 4 + 4 + 8 = 16). ``mixed_precision=False`` means pure half precision:
      no master copy and AdamW moments in the parameter dtype (2 + 2 + 4 = 8 bytes/param).
    * ``method="lora"``: frozen base N_base·b, adapters n = :func:`lora_parameters` held in
      fp32: weights 4n, gradients 4n, optimizer n·s (s with fp32 states).
    * ``method="qlora"``: like LoRA, but the decoder-layer linear weights (``linear`` in
      :func:`count_parameters`) take :func:`nf4_bytes_per_param` bytes (0.515869 with double
      quantisation, 0.5625 without, block size 64); embeddings, lm_head, norms and biases
      stay in ``dtype``. (peft's ``prepare_model_for_kbit_training`` would upcast those to
      fp32; align does not assume it.)
    * ``head="value"``: the LM head is replaced by a scalar head (+h params, trainable and
      fp32 for LoRA), as for a reward model or PPO critic.

    Sharding across ``world_size`` data-parallel ranks (``fsdp=True`` = ZeRO-3/FULL_SHARD):
    stage ≥ 1 divides the optimizer (states and master copy), ≥ 2 also gradients, 3 also
    weights, plus one gathered unit in ``dtype`` (the larger of one decoder layer and
    the embedding) that FSDP/ZeRO-3 materialises while computing it. Activations are never
    sharded.

    ``role="frozen"`` (reference or reward model scoring) and ``role="generate"`` hold weights
    only (sharded at stage 3) plus a no-grad working set; ``generate`` adds the KV cache for
    ``batch_size`` sequences of ``seq_len`` tokens (prompt + response). Activations are
    described in :func:`activation_bytes`; ``batch_size`` and ``seq_len`` are per device.
    """
    method = method.lower()
    if method not in ("full", "lora", "qlora"):
        raise PlanError(f"unknown method {method!r}; expected full, lora or qlora")
    if role not in ("train", "frozen", "generate"):
        raise PlanError(f"unknown role {role!r}; expected train, frozen or generate")
    if batch_size < 1 or seq_len < 1 or world_size < 1:
        raise PlanError("batch_size, seq_len and world_size must be positive")
    stage = 3 if fsdp else int(zero_stage)
    if stage not in (0, 1, 2, 3):
        raise PlanError(f"zero_stage must be 0, 1, 2 or 3, got {zero_stage!r}")
    b = _dtype_bytes(dtype)
    counts = count_parameters(config)
    g = _dims(config)
    N = counts["total"]
    vh = 0
    if head == "value":  # a sequence-classification model: scalar score head, no lm_head
        N -= counts["lm_head"]
        vh = value_head_parameters(config)

    if method == "full":
        targets: list[str] = []
        n_adapter = 0
        base_bytes = (N + vh) * b
        trainable = N + vh if role == "train" else 0
    else:
        targets = lora_target_names(config, target_modules)
        n_adapter = lora_parameters(config, r, targets) + vh
        if method == "qlora":
            q = counts["linear"]
            base_bytes = q * nf4_bytes_per_param(double_quant) + (N - q) * b
        else:
            base_bytes = N * b
        trainable = n_adapter if role == "train" else 0

    weights = base_bytes + n_adapter * ADAPTER_BYTES
    gradients = optimizer_bytes = 0.0
    if role == "train":
        if method == "full":
            gradients = trainable * b
            per = _optimizer_bytes_per_param(optimizer, b, mixed_precision)
            master = 4 if (b < 4 and mixed_precision) else 0
            optimizer_bytes = trainable * (per + master)
        else:
            gradients = trainable * ADAPTER_BYTES
            optimizer_bytes = trainable * _optimizer_bytes_per_param(optimizer, ADAPTER_BYTES, True)
    elif optimizer.lower() not in OPTIMIZERS:
        raise PlanError(f"unknown optimizer {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")

    if world_size > 1:
        if stage >= 1:
            optimizer_bytes /= world_size
        if stage >= 2:
            gradients /= world_size
        if stage >= 3:
            per_layer = counts["per_layer"] or (counts["non_embedding"] / max(g["L"], 1))
            gathered = max(per_layer, counts["embedding"]) * b
            weights = weights / world_size + gathered

    activations = activation_bytes(
        config, batch_size=batch_size, seq_len=seq_len, dtype=dtype, method=method, role=role,
        targets=targets, r=r, lora_dropout=lora_dropout,
        gradient_checkpointing=gradient_checkpointing, attention=attention, head=head,
    )
    kv = kv_cache_bytes(config, batch_size, seq_len, dtype) if role == "generate" else 0
    parts = {
        "weights": int(round(weights)),
        "gradients": int(round(gradients)),
        "optimizer": int(round(optimizer_bytes)),
        "activations": int(activations),
        "kv_cache": int(kv),
    }
    return {
        "params": N + vh if method == "full" else N + n_adapter,
        "trainable_params": trainable,
        **parts,
        "total": sum(parts.values()),
    }


def estimate_ppo_memory(
    config,
    *,
    method: str = "full",
    r: int = 16,
    target_modules: str | Iterable[str] = "all-linear",
    lora_dropout: float = 0.0,
    dtype: str = "bf16",
    mixed_precision: bool = True,
    optimizer: str = "adamw",
    batch_size: int = 1,
    prompt_len: int = 512,
    response_len: int = 512,
    gradient_checkpointing: bool = False,
    world_size: int = 1,
    zero_stage: int = 0,
    fsdp: bool = False,
    attention: str = "sdpa",
    double_quant: bool = True,
    reward_config=None,
) -> dict[str, Any]:
    """Per-device memory of a PPO run: policy, reference, critic and reward model.

    ``method="full"``: four separate models. Policy = trainable LM (weights, gradients,
    optimizer); critic = trainable copy of the backbone with a scalar value head; reference
    = frozen LM; reward = frozen backbone with a scalar head (``reward_config`` if given,
    else the policy's architecture; the critic follows the reward model's architecture, as
    it is usually initialised from it).

    ``method="lora"``/``"qlora"``: one shared frozen base (quantised for QLoRA) plus fp32
    adapters: the policy adapter (trainable), the critic adapter + value head (trainable),
    the reward adapter + its head (frozen, 4 bytes/param). The reference model is the base
    with adapters disabled: no extra weights. A ``reward_config`` differing from ``config``
    makes the reward model a separate frozen model in ``dtype``.

    Sequences are ``prompt_len + response_len`` tokens, ``batch_size`` of them per device.
    The phases run one after another, so only the largest transient counts:

    * generation: KV cache :func:`kv_cache_bytes` + the policy's generate working set;
    * scoring: the largest no-grad forward of reference, reward and critic;
    * training: policy and critic activations together (one backward over the summed loss).

    ``total = weights + gradients + optimizer + max(generation, scoring, training)``.
    Returns the same byte keys as :func:`estimate_memory` (``activations`` is the training
    phase, ``kv_cache`` the generation cache), plus ``phases`` (bytes of each phase's
    transient) and ``roles`` (each role's standalone :func:`estimate_memory`; with LoRA each
    of those includes the shared base, which the top-level numbers count once).
    """
    method = method.lower()
    if method not in ("full", "lora", "qlora"):
        raise PlanError(f"unknown method {method!r}; expected full, lora or qlora")
    seq = prompt_len + response_len
    common = dict(
        r=r, target_modules=target_modules, lora_dropout=lora_dropout, dtype=dtype,
        mixed_precision=mixed_precision, optimizer=optimizer, batch_size=batch_size,
        seq_len=seq, gradient_checkpointing=gradient_checkpointing, world_size=world_size,
        zero_stage=zero_stage, fsdp=fsdp, attention=attention, double_quant=double_quant,
    )
    rcfg = reward_config if reward_config is not None else config
    separate_reward = reward_config is not None and reward_config.to_dict() != config.to_dict()

    roles = {
        "policy": estimate_memory(config, method=method, role="train", head="lm", **common),
        "reference": estimate_memory(config, method=method, role="frozen", head="lm", **common),
        "critic": estimate_memory(rcfg, method=method, role="train", head="value", **common),
        "reward": estimate_memory(
            rcfg, method="full" if separate_reward else method, role="frozen", head="value",
            **common,
        ),
        "generation": estimate_memory(config, method=method, role="generate", head="lm", **common),
    }
    # Scoring with the critic is a no-grad forward too.
    critic_scoring = estimate_memory(rcfg, method=method, role="frozen", head="value", **common)

    vh = value_head_parameters(rcfg)
    if method == "full":
        weights = sum(roles[k]["weights"] for k in ("policy", "reference", "critic", "reward"))
        params = sum(roles[k]["params"] for k in ("policy", "reference", "critic", "reward"))
    else:
        # One base, held by the policy estimate (base + policy adapter); add the critic
        # adapter + head and the reward adapter + head (or a separate reward model).
        adapter = lora_parameters(config, r, target_modules)
        weights = roles["policy"]["weights"]
        params = roles["policy"]["params"]
        weights += (lora_parameters(rcfg, r, target_modules) + vh) * ADAPTER_BYTES
        params += lora_parameters(rcfg, r, target_modules) + vh
        if separate_reward:
            weights += roles["reward"]["weights"]
            params += roles["reward"]["params"]
        else:
            weights += (adapter + vh) * ADAPTER_BYTES
            params += adapter + vh
    gradients = roles["policy"]["gradients"] + roles["critic"]["gradients"]
    optimizer_bytes = roles["policy"]["optimizer"] + roles["critic"]["optimizer"]
    phases = {
        "generation": roles["generation"]["kv_cache"] + roles["generation"]["activations"],
        "scoring": max(
            roles["reference"]["activations"],
            roles["reward"]["activations"],
            critic_scoring["activations"],
        ),
        "training": roles["policy"]["activations"] + roles["critic"]["activations"],
    }
    total = weights + gradients + optimizer_bytes + max(phases.values())
    return {
        "params": params,
        "trainable_params": roles["policy"]["trainable_params"] + roles["critic"]["trainable_params"],
        "weights": weights,
        "gradients": gradients,
        "optimizer": optimizer_bytes,
        "activations": phases["training"],
        "kv_cache": roles["generation"]["kv_cache"],
        "total": total,
        "phases": phases,
        "roles": {k: v for k, v in roles.items() if k != "generation"},
    }


# --------------------------------------------------------------------------- compute


def flops(n_params: float, tokens: float, *, per_param_token: float = 6.0) -> float:
    """Training compute ``C ≈ 6·N·D``: 2·N per token forward, 4·N backward.

    Use ``per_param_token=2`` for a forward pass only. For LoRA the backward skips the
    frozen weights' gradients, ≈ 4·N per token.
    """
    return per_param_token * n_params * tokens


def ppo_flops(
    n_params: float,
    *,
    episodes: int,
    prompt_len: int,
    response_len: int,
    ppo_epochs: int = 1,
    n_reference: float | None = None,
    n_reward: float | None = None,
    n_critic: float | None = None,
    train_per_param_token: float = 6.0,
) -> dict[str, float]:
    """FLOPs of PPO over ``episodes`` sequences of ``prompt_len + response_len`` tokens.

    With S = prompt_len + response_len and the role sizes defaulting to ``n_params``:

    * generation: the policy prefills the prompt and decodes each response token, 2·N per
      token: ``2·N_policy·S·episodes``;
    * scoring: reference, reward and critic forwards over the full sequence:
      ``2·(N_ref + N_reward + N_critic)·S·episodes``;
    * training: policy and critic forward + backward for every PPO epoch:
      ``6·(N_policy + N_critic)·S·episodes·ppo_epochs`` (``train_per_param_token``; ≈ 4
      for LoRA).
    """
    S = prompt_len + response_len
    ref = n_params if n_reference is None else n_reference
    rew = n_params if n_reward is None else n_reward
    critic = n_params if n_critic is None else n_critic
    out = {
        "generation": 2.0 * n_params * S * episodes,
        "scoring": 2.0 * (ref + rew + critic) * S * episodes,
        "training": train_per_param_token * (n_params + critic) * S * episodes * ppo_epochs,
    }
    out["total"] = sum(out.values())
    return out


def chinchilla_tokens(n_params: float, tokens_per_param: float = 20.0) -> float:
    """Compute-optimal training tokens, D ≈ 20·N (Hoffmann et al. 2022)."""
    return tokens_per_param * n_params


def compute_optimal(compute: float, tokens_per_param: float = 20.0) -> dict[str, float]:
    """Solve ``C = 6·N·D`` with ``D = 20·N``: ``N = sqrt(C / 120)``, ``D = 20·N``."""
    if compute <= 0:
        raise PlanError("compute must be positive")
    n = math.sqrt(compute / (6.0 * tokens_per_param))
    return {"params": n, "tokens": tokens_per_param * n, "flops": compute}


def estimate_time(
    flops_total: float, flops_per_second: float, mfu: float = 0.4, devices: int = 1
) -> float:
    """Wall-clock seconds: ``flops / (peak FLOP/s per device · devices · MFU)``.

    MFU (model FLOPs utilisation) of 0.3–0.5 is typical for well-tuned training; generation
    -heavy work (PPO rollouts) is memory-bound and far lower.
    """
    if flops_per_second <= 0 or not 0 < mfu <= 1 or devices < 1:
        raise PlanError("flops_per_second must be > 0, mfu in (0, 1], devices >= 1")
    return flops_total / (flops_per_second * devices * mfu)


# --------------------------------------------------------------------------- output


def _fmt_count(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n == 0:
        return "0"
    return f"{n / MiB:.1f} MiB"


def _fmt_flops(n) -> str:
    return "-" if n is None else f"{float(n):.2e}"


def _fmt_time(seconds) -> str:
    if seconds is None:
        return "-"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    if s < 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


_COLUMNS = (
    ("name", "", str),
    ("params", "params", _fmt_count),
    ("trainable_params", "trainable", _fmt_count),
    ("weights", "weights", _fmt_bytes),
    ("gradients", "grads", _fmt_bytes),
    ("optimizer", "optim", _fmt_bytes),
    ("activations", "activ", _fmt_bytes),
    ("kv_cache", "kv cache", _fmt_bytes),
    ("total", "total/dev", _fmt_bytes),
    ("flops", "FLOPs", _fmt_flops),
    ("seconds", "time", _fmt_time),
)


def format_plan(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table, one row per stage or role.

    Each row is a mapping such as ``{"name": "sft", **estimate_memory(...), "flops": f,
    "seconds": t}``; missing keys print as ``-``. Counts use K/M/B, memory GiB (or MiB
    below 1 GiB), FLOPs scientific notation and time s/min/h/d.
    """
    header = [title for _, title, _ in _COLUMNS]
    body = [
        [fmt(row.get(key)) if key != "name" else str(row.get("name", "")) for key, _, fmt in _COLUMNS]
        for row in rows
    ]
    widths = [max(len(c) for c in col) for col in zip(header, *body)]

    def line(cells):
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    out = [line(header), "  ".join("-" * w for w in widths)]
    out += [line(cells) for cells in body]
    return "\n".join(out)
