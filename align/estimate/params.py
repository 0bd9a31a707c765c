"""Parameters of a model, counted on PyTorch's meta device from its config.

The model is instantiated with ``AutoModelForCausalLM.from_config`` under ``torch.device("meta")``:
the exact structure (every architecture transformers knows), no memory, no initialisation, so a
7B model costs a fraction of a second. Everything the estimators need about the structure comes
from that one walk (:func:`structure`), cached per config.
"""

from __future__ import annotations

from typing import Any, Iterable

from align.errors import AlignError

GiB = 1024**3
MiB = 1024**2

DTYPE_BYTES: dict[str, int] = {
    "fp32": 4, "float32": 4, "float": 4,
    "bf16": 2, "bfloat16": 2,
    "fp16": 2, "float16": 2, "half": 2,
}


class PlanError(AlignError, ValueError):
    """An invalid planning input (unknown dtype, method, optimizer, target module...)."""


def dtype_bytes(dtype) -> int:
    key = str(dtype).lower().removeprefix("torch.")
    if key not in DTYPE_BYTES:
        raise PlanError(f"unknown dtype {dtype!r}; expected one of bf16, fp16, fp32")
    return DTYPE_BYTES[key]


def text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def dims(config) -> dict[str, int]:
    """Shapes used by the activation and FLOP formulas: h, intermediate i, layers L, heads a, kv
    heads, head dim d, q = a·d, kv = kv_heads·d, vocabulary V (read from the config)."""
    config = text_config(config)
    h = int(config.hidden_size)
    a = int(config.num_attention_heads)
    kvh = int(getattr(config, "num_key_value_heads", None) or a)
    d = int(getattr(config, "head_dim", None) or h // a)
    i = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * h
    return {"h": h, "i": int(i), "L": int(config.num_hidden_layers), "a": a, "kvh": kvh, "d": d,
            "q": a * d, "kv": kvh * d, "V": int(config.vocab_size)}


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


def _is_norm(module) -> bool:
    return "norm" in type(module).__name__.lower()


_CACHE: dict[tuple[str, str], dict[str, Any]] = {}


def structure(config) -> dict[str, Any]:
    """One walk over the model built on the meta device (cached per config).

    Parameters are split by where they live: ``embedding`` (the input embeddings), ``lm_head``
    (the output layer, 0 when tied), ``attention`` (in a module inside one named ``*attn*``
    / ``*attention*``, per-head q/k norms included), ``mlp`` (``*mlp*`` / ``*feed_forward*``),
    ``norms`` (norm modules outside those) and ``other`` (position embeddings and the like).
    Also: ``per_layer`` (one decoder layer), ``linear`` (weights of every linear layer but the
    output layer: what QLoRA quantises), ``biases`` (their biases), ``layer_linears`` (name ->
    (in, out) of one decoder layer's linears), ``linears`` ((name, in, out) of every linear and
    embedding module, for LoRA), ``all_linear`` (what peft's "all-linear" adapts), ``norms_per_layer`` (hidden-width norms in one layer) and
    ``qk_norm`` (per-head norms on queries and keys, as in Qwen3).
    """
    import torch
    from transformers import AutoModelForCausalLM

    config = text_config(config)
    key = (type(config).__name__, config.to_json_string(use_diff=False))
    if key in _CACHE:
        return _CACHE[key]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    tied = out is not None and emb is not None and out.weight is emb.weight
    L = int(getattr(config, "num_hidden_layers", 0) or 0)
    layers = max((m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == L and L),
                 key=lambda m: sum(p.numel() for p in m.parameters()), default=None)
    h = dims(config)["h"]

    parts = dict.fromkeys(("embedding", "lm_head", "attention", "mlp", "norms", "other"), 0)
    owner = {}  # parameter -> the name of the module holding it
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owner.setdefault(id(p), (name, module))
    for p in model.parameters():  # parameters() yields tied weights once
        name, module = owner[id(p)]
        path = name.lower().rpartition(".")[0]  # the modules holding this one
        if emb is not None and module is emb:
            part = "embedding"
        elif out is not None and module is out:
            part = "lm_head"
        elif "attn" in path or "attention" in path:
            part = "attention"
        elif "mlp" in path or "feed_forward" in path:
            part = "mlp"
        elif _is_norm(module):
            part = "norms"
        else:
            part = "other"
        parts[part] += p.numel()

    linear_modules = [(n, m) for n, m in model.named_modules() if isinstance(m, _linear_classes()) and m is not out]
    linears = [(n.rsplit(".", 1)[-1], *_in_out(m)) for n, m in model.named_modules()
               if isinstance(m, _linear_classes())]
    linears += [(n.rsplit(".", 1)[-1], m.num_embeddings, m.embedding_dim) for n, m in model.named_modules()
                if isinstance(m, torch.nn.Embedding)]
    layer0 = layers[0] if layers is not None else None
    layer_norms = [m for m in layer0.modules() if _is_norm(m)] if layer0 is not None else []
    total = sum(parts.values())
    result = {
        "total": total,
        **parts,
        "per_layer": sum(p.numel() for p in layer0.parameters()) if layer0 is not None else None,
        "num_layers": L,
        "linear": sum(m.weight.numel() for _, m in linear_modules),
        "biases": sum(m.bias.numel() for _, m in linear_modules if getattr(m, "bias", None) is not None),
        "non_embedding": total - parts["embedding"] - parts["lm_head"],
        "tied": tied,
        "source": "meta",
        "layer_linears": {n.rsplit(".", 1)[-1]: _in_out(m) for n, m in layer0.named_modules()
                          if isinstance(m, _linear_classes())} if layer0 is not None else {},
        "linears": linears,
        "all_linear": sorted({n.rsplit(".", 1)[-1] for n, _ in linear_modules}),
        "norms_per_layer": sum(1 for m in layer_norms if getattr(m, "weight", None) is not None
                               and m.weight.shape[-1] == h),
        "qk_norm": any(n.rsplit(".", 1)[-1] in ("q_norm", "k_norm") for n, _ in layer0.named_modules())
        if layer0 is not None else False,
    }
    _CACHE[key] = result
    return result


def count_parameters(config) -> dict[str, Any]:
    """Parameter count of a causal LM from its config, exact for any architecture.

    Returns ``total``, ``embedding``, ``lm_head``, ``attention``, ``mlp``, ``norms``, ``other``,
    ``biases``, ``per_layer``, ``num_layers``, ``linear``, ``non_embedding`` (total − embedding −
    lm_head), ``tied`` and ``source`` (``"meta"``); see :func:`structure`. For a Llama-style model
    (h hidden, a heads, k kv heads, d head dim, i intermediate, V vocabulary, L layers) this is
    V·h embedding + (V·h unless tied) + L·(h·a·d + 2·h·k·d + a·d·h + 3·h·i + 2h) + h.
    """
    info = structure(config)
    keep = ("total", "embedding", "lm_head", "attention", "mlp", "norms", "other", "biases", "per_layer",
            "num_layers", "linear", "non_embedding", "tied", "source")
    return {k: info[k] for k in keep}


def lora_target_names(config, target_modules: str | Iterable[str] = "all-linear") -> list[str]:
    """Resolve ``target_modules`` (``"all-linear"``, ``"q_proj,v_proj"`` or a list) to module names.

    ``"all-linear"`` follows peft: every linear layer except the output layer (lm_head). Names
    match like peft matches them: a module whose name ends with the target. Unknown names raise
    :class:`PlanError` (peft would silently skip them), so typos surface.
    """
    info = structure(config)
    linear_names = {n for n, *_ in info["linears"]}
    if isinstance(target_modules, str):
        if target_modules.strip().lower() == "all-linear":
            return list(info["all_linear"])
        names = [t.strip() for t in target_modules.split(",") if t.strip()]
    else:
        names = [str(t).strip() for t in target_modules]
    if not names:
        raise PlanError("target_modules is empty")
    unknown = [n for n in names if n not in linear_names]
    if unknown:
        model_type = getattr(text_config(config), "model_type", "this model")
        raise PlanError(f"unknown LoRA target module(s) {unknown} for {model_type}; "
                        f"known: {', '.join(sorted(linear_names))} or 'all-linear'")
    return list(dict.fromkeys(names))


def lora_parameters(config, r: int, target_modules: str | Iterable[str] = "all-linear") -> int:
    """Trainable LoRA parameters: ``r·(in + out)`` per adapted ``Linear(in, out)``.

    LoRA adds A (r × in) and B (out × r) to every targeted linear layer of every decoder layer;
    an adapted embedding (V × h) gets ``r·(V + h)``. Biases stay frozen (peft ``bias="none"``).
    """
    if r <= 0:
        raise PlanError(f"LoRA rank must be positive, got {r}")
    names = set(lora_target_names(config, target_modules))
    return sum(r * (fin + fout) for name, fin, fout in structure(config)["linears"] if name in names)


def value_head_parameters(config, bias: bool = False) -> int:
    """A scalar value/reward head ``Linear(h, 1)``: h parameters (+1 with a bias).

    This is ``AutoModelForSequenceClassification``'s ``score`` layer with ``num_labels=1`` (no
    bias), which PPO's critic and reward model use.
    """
    return dims(config)["h"] + (1 if bias else 0)


def score_parameters(config) -> int:
    """A sequence classifier built on ``config``: no LM head, a scalar score head."""
    counts = count_parameters(config)
    return counts["total"] - counts["lm_head"] + value_head_parameters(config)
