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

from align.errors import AlignError, first_line

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
    "estimate_online_memory",
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
    value_head_on_policy: bool = False,
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

    ``value_head_on_policy``: no critic network; the critic is an fp32 value head on the
    policy's hidden states (weights, gradient and Adam state of ``h`` parameters) and needs
    no activations or scoring pass of its own.

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
    if value_head_on_policy:
        head = value_head_parameters(config)
        roles["critic"] = {"params": head, "trainable_params": head, "weights": head * ADAPTER_BYTES,
                           "gradients": head * ADAPTER_BYTES, "optimizer": 2 * head * ADAPTER_BYTES,
                           "activations": 0}
        critic_scoring = {"activations": 0}

    vh = value_head_parameters(rcfg)
    if method == "full":
        weights = sum(roles[k]["weights"] for k in ("policy", "reference", "critic", "reward"))
        params = sum(roles[k]["params"] for k in ("policy", "reference", "critic", "reward"))
    else:
        # One base, held by the policy estimate (base + policy adapter); add the critic
        # adapter + head (or the bare head) and the reward adapter + head (or a separate reward model).
        adapter = lora_parameters(config, r, target_modules)
        weights = roles["policy"]["weights"] + roles["critic"]["weights"] * value_head_on_policy
        params = roles["policy"]["params"] + roles["critic"]["params"] * value_head_on_policy
        if not value_head_on_policy:
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


def estimate_online_memory(
    config,
    *,
    method: str = "full",
    r: int = 16,
    target_modules: str | Iterable[str] = "all-linear",
    lora_dropout: float = 0.0,
    dtype: str = "bf16",
    optimizer: str = "adamw",
    batch_size: int = 8,
    generation_batch_size: int | None = None,
    prompt_len: int = 512,
    completion_len: int = 512,
    beta: float = 0.0,
    reward_config=None,
    gradient_checkpointing: bool = False,
    world_size: int = 1,
    double_quant: bool = True,
) -> dict[str, Any]:
    """Per-device memory of an RLOO / GRPO run on TRL: a trainable policy, no critic.

    * reference: only when ``beta > 0``; a frozen copy with full fine-tuning, nothing extra
      with LoRA/QLoRA (TRL disables the adapter for it);
    * reward: with ``reward_config``, a separate frozen sequence classifier in ``dtype``
      (align's rloo/grpo stages load the reward model on its own); reward functions cost none;
    * phases, one after another: generation of ``generation_batch_size`` completions (KV
      cache), scoring (no-grad reference / reward forwards), training on ``batch_size``.

    ``total = weights + gradients + optimizer + max(phases)``; same keys as
    :func:`estimate_ppo_memory`.
    """
    common = dict(r=r, target_modules=target_modules, lora_dropout=lora_dropout, dtype=dtype, optimizer=optimizer,
                  seq_len=prompt_len + completion_len, world_size=world_size, double_quant=double_quant)
    policy = estimate_memory(config, method=method, role="train", batch_size=batch_size,
                             gradient_checkpointing=gradient_checkpointing, **common)
    generation = estimate_memory(config, method=method, role="generate",
                                 batch_size=generation_batch_size or batch_size, **common)
    weights, params, scoring = policy["weights"], policy["params"], 0
    if beta > 0:
        ref = estimate_memory(config, method=method, role="frozen", batch_size=batch_size, **common)
        scoring = ref["activations"]
        if method == "full":
            weights += ref["weights"]
            params += ref["params"]
    if reward_config is not None:
        reward = estimate_memory(reward_config, method="full", role="frozen", head="value", batch_size=batch_size,
                                 **common)
        weights += reward["weights"]
        params += reward["params"]
        scoring = max(scoring, reward["activations"])
    phases = {"generation": generation["kv_cache"] + generation["activations"], "scoring": scoring,
              "training": policy["activations"]}
    return {
        "params": params,
        "trainable_params": policy["trainable_params"],
        "weights": weights,
        "gradients": policy["gradients"],
        "optimizer": policy["optimizer"],
        "activations": phases["training"],
        "kv_cache": generation["kv_cache"],
        "total": weights + policy["gradients"] + policy["optimizer"] + max(phases.values()),
        "phases": phases,
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
    reuse_rollout_pass: bool = True,
) -> dict[str, float]:
    """FLOPs of PPO over ``episodes`` sequences of ``prompt_len + response_len`` tokens.

    With S = prompt_len + response_len and the role sizes defaulting to ``n_params``:

    * generation: the policy prefills the prompt and decodes each response token, 2·N per
      token: ``2·N_policy·S·episodes``;
    * scoring: reference and reward forwards over the full sequence, plus the policy's and
      the critic's (old log-probs and values) unless ``reuse_rollout_pass`` (one minibatch of
      one micro-batch: the first optimizer step reuses that pass, see align.ppo.trainer):
      ``2·(N_ref + N_reward [+ N_policy + N_critic])·S·episodes``;
    * training: policy and critic forward + backward for every PPO epoch:
      ``6·(N_policy + N_critic)·S·episodes·ppo_epochs`` (``train_per_param_token``; ≈ 4
      for LoRA). With ``value_head_on_policy`` pass ``n_critic=0``.
    """
    S = prompt_len + response_len
    ref = n_params if n_reference is None else n_reference
    rew = n_params if n_reward is None else n_reward
    critic = n_params if n_critic is None else n_critic
    scored = ref + rew + (0.0 if reuse_rollout_pass else n_params + critic)
    out = {
        "generation": 2.0 * n_params * S * episodes,
        "scoring": 2.0 * scored * S * episodes,
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


# --------------------------------------------------------------------------- recipes
#
# `align plan recipe.yaml` (and `align run --dry-run`) apply the estimators above to every
# stage of a recipe. Model configs are read without weights: a local folder's config.json,
# a Hub id's config (online only), or, for `init` stages and the outputs of stages that have
# not run yet, the config the stage *will* write.

#: FLOP/s assumed per device when no CUDA device is present (a few CPU cores, fp32).
CPU_FLOPS = 5e10
#: Model FLOPs utilisation assumed for the time estimates.
PLAN_MFU = 0.4
#: Sequence length when a stage sets no ``max_length`` (TRL's default).
DEFAULT_SEQ_LEN = 1024
#: Prompt tokens assumed for PPO when ``max_prompt_length`` is unset.
PPO_PROMPT_LEN = 256



def _holds_model(stage) -> bool:
    """Whether the stage's folder will hold a model (a later stage may start from it)."""
    return stage.traits.produces in ("policy", "reward_model")

__all__ += ["plan_recipe", "plan_text", "plan_command", "default_flops_per_second", "dataset_rows"]


def default_flops_per_second() -> float:
    """Peak bf16 FLOP/s of the visible GPU (A100/H100/H200 datasheets; other GPUs are
    assumed A100-class), else :data:`CPU_FLOPS`."""
    try:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name(0).lower()
            return next((v for k, v in PEAK_FLOPS.items() if k in name), PEAK_FLOPS["a100"])
    except Exception:  # noqa: BLE001  (a broken driver still gets a plan)
        pass
    return CPU_FLOPS


def _on_gpu() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False


def _file_rows(path) -> int | None:
    """Rows in a local data file, counted without loading it (None when unsure)."""
    from pathlib import Path

    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with open(path, "rb") as f:
                return sum(1 for line in f if line.strip())
        if suffix == ".json":
            import json

            with open(path) as f:
                try:
                    value = json.load(f)
                except ValueError:  # JSON Lines under a .json name
                    f.seek(0)
                    return sum(1 for line in f if line.strip())
            return len(value) if isinstance(value, list) else None
        if suffix == ".csv":
            import csv

            with open(path, newline="") as f:
                return max(sum(1 for _ in csv.reader(f)) - 1, 0)
        if suffix == ".txt":
            with open(path, "rb") as f:
                return sum(1 for _ in f)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
    except (OSError, ImportError, ValueError):
        return None
    return None


def dataset_rows(spec, known: Mapping[str, int] | None = None) -> int | None:
    """Training rows of a recipe ``dataset:`` block (one source or a mixture), or None when
    it cannot be told without loading it (Hub datasets, folders). ``known`` maps file paths
    that do not exist yet (written by an earlier ``task`` stage) to their row counts.
    Mixture weights, ``split: train[:N]`` / ``[:N%]`` and ``test_size`` are applied."""
    import re
    from pathlib import Path

    known = known or {}
    sources = spec if isinstance(spec, list) else [spec]
    if not sources or not all(isinstance(s, dict) for s in sources):
        return None
    total = 0.0
    for source in sources:
        path = source.get("path")
        if not isinstance(path, str) or source.get("data_files"):
            return None
        local = Path(path).expanduser()
        n = _file_rows(local) if local.is_file() else known.get(str(Path(path)))
        if n is None:
            return None
        match = re.fullmatch(r"\s*\w+\s*\[\s*:\s*(\d+)\s*(%?)\s*\]\s*", str(source.get("split") or ""))
        if match:
            cut = int(match.group(1))
            n = min(n, round(n * cut / 100) if match.group(2) else cut)
        total += n * float(source.get("weight", 1.0) or 0.0)
    test_size = sources[0].get("test_size")
    if isinstance(test_size, (int, float)) and test_size > 0:
        total -= total * test_size if test_size < 1 else test_size
    return max(int(total), 0)


def _field_default(cls, name):
    import dataclasses

    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                return f.default_factory()  # type: ignore[misc]
    return None


def _arg(stage, name, fallback=None):
    if name in stage.args:
        value = stage.args[name]
    else:
        value = _field_default(stage.module.Config, name)
    value = getattr(value, "value", value)  # enums (optim, ...)
    return fallback if value is None else value


class _Configs:
    """Model configs by path: local folders and adapters from disk, outputs of stages not run
    yet from what they will hold, Hub ids through ``AutoConfig`` (online only)."""

    def __init__(self, recipe):
        self.recipe = recipe
        self.future: dict[str, Any] = {}  # stage folder -> config it will hold (None: unknown)
        self.errors: dict[str, str] = {}
        self.cache: dict[str, Any] = {}

    @staticmethod
    def key(path) -> str:
        from pathlib import Path

        return str(Path(str(path)))

    def get(self, path: str, depth: int = 0):
        """(config or None, note or None)."""
        from pathlib import Path

        key = self.key(path)
        if key in self.cache:
            return self.cache[key], self.errors.get(key)
        folder = Path(path).expanduser()
        config, note = None, None
        if (folder / "config.json").is_file():
            config, note = self._auto(str(folder))
        elif (folder / "adapter_config.json").is_file() and depth < 5:
            import json

            try:
                base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
            except (OSError, ValueError, KeyError) as e:
                note = f"unreadable adapter_config.json in '{path}': {first_line(e)}"
            else:
                config, note = self.get(base, depth + 1)
        elif key in self.future:
            config = self.future[key]
            if config is None:
                note = f"the model '{path}' will hold is unknown (its stage has no config)"
        elif folder.exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") > 1:
            note = f"'{path}' has no config.json (not a model folder)"
        else:
            config, note = self._auto(str(path), hub=True)
        self.cache[key] = config
        if note:
            self.errors[key] = note
        return config, note

    def _auto(self, path: str, hub: bool = False):
        from transformers import AutoConfig

        model = self.recipe.model or {}
        kwargs = {"trust_remote_code": bool(model.get("trust_remote_code", False))}
        if hub and model.get("revision") and path == model.get("name_or_path"):
            kwargs["revision"] = model["revision"]
        try:
            return AutoConfig.from_pretrained(path, **kwargs), None
        except Exception as e:  # noqa: BLE001  (offline, gated, missing...)
            what = "Hub config" if hub else "config"
            return None, f"cannot read the {what} of '{path}' (offline?): {first_line(e)}"


def init_config(stage):
    """The LlamaConfig an ``init`` stage will write (vocab_size = the tokenizer's target size)."""
    import dataclasses

    from transformers import LlamaConfig

    cfg = stage.config()
    sizes = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
             if f.name != "tokenizer_samples" and getattr(cfg, f.name) is not None}
    return LlamaConfig(**sizes)


def _start_model(stage, recipe) -> str:
    return recipe.start_model(stage)


def _score_params(config) -> int:
    """A sequence classifier built on ``config``: no LM head, a scalar score head."""
    counts = count_parameters(config)
    return counts["total"] - counts["lm_head"] + value_head_parameters(config)


def _seq_cls_config(config):
    """The config a fully fine-tuned reward model built on ``config`` saves (one label)."""
    import copy

    out = copy.deepcopy(config)
    arch = (getattr(config, "architectures", None) or [type(config).__name__.replace("Config", "ForCausalLM")])[0]
    out.architectures = [arch.replace("ForCausalLM", "ForSequenceClassification")]
    out.num_labels = 1
    return out


def _method(stage, config, notes: list[str]):
    """(method, r, target_modules, lora_dropout) from the stage's peft/quantization blocks."""
    peft = stage.options.get("peft")
    quant = stage.options.get("quantization") or {}
    if not isinstance(peft, dict):
        if quant:
            notes.append("quantization without peft: counted as full fine-tuning in the model dtype")
        return "full", 0, (), 0.0
    kind = str(peft.get("method", "lora")).lower()
    if kind != "lora":
        return kind, 0, (), 0.0
    r = int(peft.get("r", 8))
    targets = peft.get("target_modules")
    if not targets:
        try:
            from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULTS
        except ImportError:  # pragma: no cover
            DEFAULTS = {}
        targets = DEFAULTS.get(getattr(_text_config(config), "model_type", None), "all-linear")
    if quant.get("load_in_4bit"):
        return "qlora", r, targets, float(peft.get("lora_dropout", 0.0) or 0.0)
    if quant.get("load_in_8bit"):
        notes.append("8-bit base weights are not modelled: counted in the model dtype")
    return "lora", r, targets, float(peft.get("lora_dropout", 0.0) or 0.0)


def _dtype(recipe, stage) -> str:
    wanted = str((recipe.model or {}).get("dtype") or "auto").lower().removeprefix("torch.")
    if wanted in DTYPE_BYTES:
        return wanted
    if stage.args.get("bf16"):
        return "bf16"
    if stage.args.get("fp16"):
        return "fp16"
    return "bf16" if _on_gpu() else "fp32"


def _optimizer(stage, notes: list[str]) -> str:
    name = str(_arg(stage, "optim", "adamw")).lower()
    if name in OPTIMIZERS:
        return name
    notes.append(f"optimizer '{name}' not modelled: counted as AdamW")
    return "adamw"


def _gradient_checkpointing(stage) -> bool:
    if "gradient_checkpointing" in stage.args:
        return bool(stage.args["gradient_checkpointing"])
    # align turns TRL's default (on) off on CPU, where it only costs time (align.training).
    return bool(_arg(stage, "gradient_checkpointing", False)) and _on_gpu()


def _target_label(targets) -> str:
    if isinstance(targets, str):
        return targets
    return ",".join(targets)


def plan_recipe(recipe, *, flops_per_second: float | None = None, world_size: int | None = None,
                mfu: float = PLAN_MFU) -> list[dict]:
    """One row per stage: the recipe-level facts (``type``, ``model``, ``method``, ``r``,
    ``target_modules``, ``batch_size``, ``grad_accum``, ``world_size``, ``seq_len``,
    ``gradient_checkpointing``, ``dtype``, ``examples``, ``sequences``, ``tokens``,
    ``chinchilla_tokens``, ``notes``) plus :func:`estimate_memory` /
    :func:`estimate_ppo_memory` keys, ``flops`` and ``seconds`` where they can be computed.
    Rows print with :func:`format_plan`; a stage whose model config cannot be read offline
    gets a note instead of numbers, and planning goes on."""
    import os

    fps = flops_per_second or default_flops_per_second()
    world = int(world_size or os.environ.get("WORLD_SIZE") or 1)
    configs = _Configs(recipe)
    known_rows: dict[str, int] = {}
    rows = []
    for stage in recipe.stages:
        row: dict[str, Any] = {"name": stage.name, "type": stage.type, "world_size": world, "notes": []}
        try:
            _plan_stage(stage, recipe, row, configs, known_rows, fps, world, mfu)
        except (AlignError, ValueError, TypeError, OSError, KeyError) as e:
            row["notes"].append(f"not estimated: {first_line(e)}")
            if _holds_model(stage):
                configs.future.setdefault(configs.key(stage.dir), None)
        rows.append(row)
    return rows


def _plan_stage(stage, recipe, row, configs, known_rows, fps, world, mfu):
    notes = row["notes"]
    if stage.type == "task":
        from align.task import FILE_NAMES

        cfg = stage.config()
        counts = {"sft": cfg.n_sft, "prefs": cfg.n_pairs, "prompts": cfg.n_prompts,
                  "eval_prompts": cfg.n_eval, "eval_prefs": cfg.n_eval}
        for split, filename in FILE_NAMES.items():
            known_rows[configs.key(stage.dir / filename)] = counts[split]
        notes.append("writes the task's data files; no model")
        return
    if stage.type == "eval":
        notes.append("evaluation: generation and scoring only")
        return
    if stage.type == "init":
        config = configs.get(str(stage.dir))[0] if (stage.dir / "config.json").is_file() else None
        config = config or init_config(stage)
        configs.future[configs.key(stage.dir)] = config
        counts = count_parameters(config)
        row.update(model="(new) llama", method="init", params=counts["total"],
                   chinchilla_tokens=chinchilla_tokens(counts["total"]))
        notes.append("initialises weights and trains a tokenizer; no gradient steps")
        return

    path = _start_model(stage, recipe)
    row["model"] = path
    config, note = configs.get(path)
    if _holds_model(stage):
        configs.future[configs.key(stage.dir)] = config
    if config is None:
        notes.append(note or f"no config for '{path}'")
        return
    if stage.type == "ppo":
        _plan_ppo(stage, recipe, row, configs, known_rows, config, fps, world, mfu)
        return
    if stage.traits.online:  # TRL's critic-free online trainers
        _plan_online(stage, recipe, row, configs, known_rows, config, fps, world, mfu)
        return
    if stage.traits.data not in ("lm", "text", "preference"):
        notes.append(f"stage type '{stage.type}' is not estimated")
        return

    method, r, targets, dropout = _method(stage, config, notes)
    if stage.traits.produces == "reward_model" and method == "full":  # a separate sequence classifier, not an adapter
        configs.future[configs.key(stage.dir)] = _seq_cls_config(config)
    batch = int(_arg(stage, "per_device_train_batch_size", 8))
    accum = int(_arg(stage, "gradient_accumulation_steps", 1))
    seq = int(_arg(stage, "max_length", DEFAULT_SEQ_LEN))
    gc = _gradient_checkpointing(stage)
    dtype = _dtype(recipe, stage)
    pairs = stage.traits.data == "preference"  # every example is two sequences (chosen and rejected)
    head = "value" if stage.traits.produces == "reward_model" else "lm"
    n = _score_params(config) if head == "value" else count_parameters(config)["total"]
    row.update(method=method, r=r or None, target_modules=_target_label(targets) if r else None,
               batch_size=batch, grad_accum=accum, seq_len=seq, gradient_checkpointing=gc, dtype=dtype,
               chinchilla_tokens=chinchilla_tokens(n))

    examples = dataset_rows(stage.options.get("dataset"), known_rows)
    row["examples"] = examples
    max_steps = int(_arg(stage, "max_steps", -1))
    epochs = float(_arg(stage, "num_train_epochs", 3.0))
    if max_steps > 0:
        sequences = max_steps * batch * accum * world
    elif examples is not None:
        sequences = math.ceil(examples * epochs)
    else:
        sequences = None
        notes.append("dataset size unknown (not a local file): tokens, FLOPs and time not estimated")
    row["sequences"] = sequences
    if sequences is not None:
        row["tokens"] = sequences * seq * (2 if pairs else 1)

    if method in ("full", "lora", "qlora"):
        mem = estimate_memory(
            config, method=method, r=r or 16, target_modules=targets or "all-linear", lora_dropout=dropout,
            dtype=dtype, optimizer=_optimizer(stage, notes), batch_size=batch * (2 if pairs else 1), seq_len=seq,
            gradient_checkpointing=gc, world_size=world, head=head)
        if stage.type == "dpo" and method == "full":  # a frozen reference copy next to the policy
            ref = estimate_memory(config, method="full", role="frozen", dtype=dtype, batch_size=batch * 2,
                                  seq_len=seq, world_size=world)
            mem["weights"] += ref["weights"]
            mem["total"] += ref["weights"]
            notes.append("full DPO keeps a frozen reference copy (counted in weights)")
        row.update(mem)
    else:
        notes.append(f"peft method '{method}': memory not modelled")
    if "tokens" in row:
        per_token = 6.0 if method == "full" else 4.0
        total = flops(n, row["tokens"], per_param_token=per_token)
        if stage.type == "dpo":
            total += flops(n, row["tokens"], per_param_token=2.0)  # reference log-probs
        row["flops"] = total
        row["seconds"] = estimate_time(total, fps, mfu=mfu, devices=world)


def _plan_ppo(stage, recipe, row, configs, known_rows, config, fps, world, mfu):
    notes = row["notes"]
    cfg = stage.config()
    method, r, targets, dropout = _method(stage, config, notes)
    prompt_len = cfg.max_prompt_length or PPO_PROMPT_LEN
    if not cfg.max_prompt_length:
        notes.append(f"prompt length assumed {PPO_PROMPT_LEN} tokens (max_prompt_length unset)")
    response_len = cfg.response_length
    dtype = _dtype(recipe, stage)
    reward_path = stage.options.get("reward_model")
    value_path = stage.options.get("value_model") or reward_path
    reward_config = value_config = None
    if reward_path:
        reward_config, note = configs.get(reward_path)
        if note:
            notes.append(f"reward model: {note}; counted as the policy's architecture")
    if value_path and value_path != reward_path:
        value_config, note = configs.get(value_path)
        if note:
            notes.append(f"value model: {note}; counted as the policy's architecture")
    else:
        value_config = reward_config
    n_policy = count_parameters(config)["total"]
    n_reward = _score_params(reward_config or config) if reward_path else 0.0
    n_critic = _score_params(value_config or config)
    if not reward_path:
        notes.append("reward from reward_funcs only: no reward-model FLOPs (memory still counts one)")

    batch = cfg.per_device_train_batch_size
    global_batch = batch * world
    examples = dataset_rows(stage.options.get("dataset"), known_rows)
    if cfg.num_train_steps:
        steps = cfg.num_train_steps
    elif cfg.total_episodes:
        steps = math.ceil(cfg.total_episodes / global_batch)
    elif examples is not None:
        steps = max(1, math.ceil(cfg.num_train_epochs * examples / global_batch))
    else:
        steps = None
        notes.append("dataset size unknown (not a local file): episodes, FLOPs and time not estimated")
    episodes = steps * global_batch if steps is not None else None
    seq = prompt_len + response_len
    row.update(method=method, r=r or None, target_modules=_target_label(targets) if r else None,
               batch_size=batch, grad_accum=cfg.num_mini_batches * cfg.gradient_accumulation_steps,
               seq_len=seq, gradient_checkpointing=cfg.gradient_checkpointing, dtype=dtype, examples=examples,
               sequences=episodes, chinchilla_tokens=chinchilla_tokens(n_policy))
    if method in ("full", "lora", "qlora"):
        mem = estimate_ppo_memory(
            config, method=method, r=r or 16, target_modules=targets or "all-linear", lora_dropout=dropout,
            dtype=dtype, batch_size=batch, prompt_len=prompt_len, response_len=response_len,
            gradient_checkpointing=cfg.gradient_checkpointing, world_size=world, reward_config=reward_config,
            value_head_on_policy=cfg.value_head_on_policy)
        row.update({k: v for k, v in mem.items() if k not in ("phases", "roles")})
        row["phases"] = mem["phases"]
    else:
        notes.append(f"peft method '{method}': memory not modelled")
    if episodes is not None:
        row["tokens"] = episodes * seq
        f = ppo_flops(n_policy, episodes=episodes, prompt_len=prompt_len, response_len=response_len,
                      ppo_epochs=cfg.num_ppo_epochs, n_reference=n_policy, n_reward=n_reward,
                      n_critic=0 if cfg.value_head_on_policy else n_critic,
                      train_per_param_token=6.0 if method == "full" else 4.0,
                      reuse_rollout_pass=cfg.num_mini_batches * cfg.gradient_accumulation_steps == 1
                      and (cfg.rollout_forward_batch_size or batch) >= batch)
        row["flops"] = f["total"]
        row["flops_split"] = f
        row["seconds"] = estimate_time(f["total"], fps, mfu=mfu, devices=world)
        notes.append("generation is memory-bound: expect PPO to take longer than its FLOPs suggest")


def _plan_online(stage, recipe, row, configs, known_rows, config, fps, world, mfu):
    """RLOO / GRPO: every completion is a training sequence of prompt + completion tokens."""
    notes = row["notes"]
    method, r, targets, dropout = _method(stage, config, notes)
    batch = int(_arg(stage, "per_device_train_batch_size", 8))  # completions per device per step
    accum = int(_arg(stage, "gradient_accumulation_steps", 1))
    prompt_len = int(_arg(stage, "max_prompt_length", 0)) or PPO_PROMPT_LEN
    if not _arg(stage, "max_prompt_length", None):
        notes.append(f"prompt length assumed {PPO_PROMPT_LEN} tokens (max_prompt_length unset)")
    completion_len = int(_arg(stage, "max_completion_length", 512))
    beta = float(_arg(stage, "beta", 0.0))
    seq = prompt_len + completion_len
    dtype = _dtype(recipe, stage)
    gc = _gradient_checkpointing(stage)
    n_policy = count_parameters(config)["total"]
    reward_path = stage.options.get("reward_model")
    reward_config = None
    if reward_path:
        reward_config, note = configs.get(reward_path)
        if note:
            notes.append(f"reward model: {note}; counted as the policy's architecture")
        reward_config = reward_config or config
    examples = dataset_rows(stage.options.get("dataset"), known_rows)
    max_steps = int(_arg(stage, "max_steps", -1))
    if max_steps > 0:
        completions = max_steps * batch * accum * world
    elif examples is not None:
        completions = math.ceil(examples * float(_arg(stage, "num_train_epochs", 1.0))
                                * int(_arg(stage, "num_generations", 8)))
    else:
        completions = None
        notes.append("dataset size unknown (not a local file): completions, FLOPs and time not estimated")
    row.update(method=method, r=r or None, target_modules=_target_label(targets) if r else None,
               batch_size=batch, grad_accum=accum, seq_len=seq, gradient_checkpointing=gc, dtype=dtype,
               examples=examples, sequences=completions, chinchilla_tokens=chinchilla_tokens(n_policy))
    if method in ("full", "lora", "qlora"):
        mem = estimate_online_memory(
            config, method=method, r=r or 16, target_modules=targets or "all-linear", lora_dropout=dropout,
            dtype=dtype, optimizer=_optimizer(stage, notes), batch_size=batch,
            generation_batch_size=batch * int(_arg(stage, "steps_per_generation", accum)), prompt_len=prompt_len,
            completion_len=completion_len, beta=beta, reward_config=reward_config, gradient_checkpointing=gc,
            world_size=world)
        row.update({k: v for k, v in mem.items() if k != "phases"})
        row["phases"] = mem["phases"]
    else:
        notes.append(f"peft method '{method}': memory not modelled")
    if completions is not None:
        row["tokens"] = completions * seq
        n_reward = _score_params(reward_config) if reward_config is not None else 0
        forwards = 2.0 * (n_policy + n_reward + (n_policy if beta > 0 else 0))  # generation, reward, reference
        per_token = (6.0 if method == "full" else 4.0) * int(_arg(stage, "num_iterations", 1))
        row["flops"] = (forwards + per_token * n_policy) * row["tokens"]
        row["seconds"] = estimate_time(row["flops"], fps, mfu=mfu, devices=world)
        notes.append("generation is memory-bound: expect it to take longer than its FLOPs suggest")


def _detail_table(rows) -> str:
    header = ["", "type", "method", "batch", "seq", "grad ckpt", "dtype", "examples", "tokens", "chinchilla"]
    body = []
    for row in rows:
        method = row.get("method") or "-"
        if row.get("r"):
            method += f" r={row['r']} {row.get('target_modules')}"
        batch = "-"
        if row.get("batch_size"):
            batch = f"{row['batch_size']}x{row.get('grad_accum', 1)}x{row.get('world_size', 1)}"
        gc = row.get("gradient_checkpointing")
        body.append([
            row["name"], row["type"], method, batch, str(row.get("seq_len") or "-"),
            "-" if gc is None else ("on" if gc else "off"), row.get("dtype") or "-",
            _fmt_count(row.get("examples")) if row.get("examples") is not None else "-",
            _fmt_count(row["tokens"]) if row.get("tokens") is not None else "-",
            _fmt_count(row["chinchilla_tokens"]) if row.get("chinchilla_tokens") else "-",
        ])
    widths = [max(len(c) for c in col) for col in zip(header, *body)]
    out = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in body]
    return "\n".join(out)


def plan_text(recipe, *, flops_per_second: float | None = None, world_size: int | None = None,
              rows: Sequence[Mapping[str, Any]] | None = None) -> str:
    """The plan as text: the :func:`format_plan` table (memory per device, FLOPs, time), a
    table of what each stage trains on, and the notes. ``align plan`` prints it; so can
    ``align run --dry-run``."""
    fps = flops_per_second or default_flops_per_second()
    if rows is None:
        rows = plan_recipe(recipe, flops_per_second=fps, world_size=world_size)
    world = rows[0]["world_size"] if rows else int(world_size or 1)
    lines = [
        f"plan for recipe '{recipe.name}' -> {recipe.output_dir}",
        f"world size {world}; time at {fps:.2e} FLOP/s per device and {PLAN_MFU:.0%} MFU "
        f"(--flops-per-second to change)",
        "",
        format_plan(rows),
        "",
        "batch = per device x gradient accumulation x processes; tokens = sequences trained on x seq, an upper "
        "bound (pairs count both sequences; PPO: episodes x (prompt + response));",
        "chinchilla = compute-optimal tokens for the model size (20 x params)",
        _detail_table(rows),
    ]
    notes = [(row["name"], n) for row in rows for n in row.get("notes", [])]
    if notes:
        lines += ["", "notes:"] + [f"  {name}: {note}" for name, note in notes]
    return "\n".join(lines)


def plan_command(args):
    from align.recipe import load_recipe

    recipe = load_recipe(args.recipe, getattr(args, "set", None) or [])
    print(plan_text(recipe, flops_per_second=getattr(args, "flops_per_second", None)))
