"""Activation memory and the KV cache: the part of memory that grows with batch and sequence.

The activation model was derived by counting the tensors autograd saves in the Hugging Face
Llama/Mistral/Qwen2/Qwen3 decoder blocks (checked with ``saved_tensors_hooks`` and against a
measured training run in ``tests/test_plan.py``).
"""

from __future__ import annotations

from typing import Sequence

from align.estimate.params import PlanError, dims, dtype_bytes, structure
from align.estimate.settings import Settings

#: Bytes per LoRA adapter parameter (peft keeps adapters in fp32 by default).
ADAPTER_BYTES = 4

# Linear modules of one Llama-style decoder layer, grouped by the tensor they read.
ATTN_IN = ("q_proj", "k_proj", "v_proj")
ATTN_OUT = ("o_proj",)
MLP_IN = ("gate_proj", "up_proj")
MLP_MID = ("down_proj",)


def kv_cache_bytes(config, batch_size: int, seq_len: int, dtype: str = "bf16") -> int:
    """KV cache for generation: ``2 · L · kv_heads · head_dim · batch · seq_len · bytes``.

    ``seq_len`` is prompt + response; the factor 2 is keys and values.
    """
    g = dims(config)
    return 2 * g["L"] * g["kvh"] * g["d"] * batch_size * seq_len * dtype_bytes(dtype)


def activation_bytes(config, s: Settings, *, role: str = "train", head: str = "lm",
                     targets: Sequence[str] = ()) -> int:
    """Activation memory in bytes for one micro-batch of ``T = s.batch_size · s.seq_len`` tokens.

    Notation: b = bytes of ``s.dtype``; h, i, L, V as in :func:`dims`; q = heads·head_dim,
    kv = kv_heads·head_dim, a = heads, seq = ``s.seq_len``; ``targets`` are the LoRA-adapted
    linears. Per token:

    **Training, one decoder layer** (tensors autograd saves in the HF Llama/Qwen block):

    * each RMSNorm (width h): the fp32 input it upcasts to (4h; in fp32 this is the residual
      stream itself) + fp32 rsqrt (4) + the normalised tensor (b·h, only when the norm weight
      trains) + its output (b·h, when the next linear saves its input);
    * attention with a fused kernel (``sdpa``/``flash``): post-RoPE q and k, v and the output
      (b·(2q + 2kv)) + fp32 log-sum-exp (4a); ``eager`` instead saves q, k, v (b·(q + 2kv)),
      the fp32 softmax (4·a·seq, the O(seq²) term) plus its b-dtype copy when b < 4, and the
      output for o_proj (b·q);
    * gated MLP: gate, up, act(gate) (3·b·i) + their product for down_proj (b·i);
    * per-head q/k norms (Qwen3): fp32 inputs 4(q + kv) + rsqrt 4(a + kv_heads) (+ b(q + kv) in
      full fine-tuning).

    Full fine-tuning, fp32: 2(12h + 4) + 4(2q + 2kv) + 4a + 16i. This plays the role of the
    34·s·b·h term of Korthikanti et al. 2022 (GPT block, 16-bit, no recomputation), rewritten for
    RMSNorm + gated-MLP blocks and with no dropout masks.

    **LoRA / QLoRA**: frozen base linears save nothing for their own weights, so the normalised
    tensors are not kept. Each adapted linear with input width w saves its LoRA-A output (4r,
    fp32 adapters) and its input: shared with the others reading the same tensor when the
    compute dtype is fp32 and ``lora_dropout == 0``; otherwise peft makes one fp32 copy per
    adapter (4w), or, with dropout, the dropout output (4w) plus a 1-byte mask (w).

    **Head** (``head="lm"``): final norm as above, then the logits (b·V, kept alive by the model
    output), the fp32 log-softmax the loss saves (4V) and, at the start of backward, two fp32
    V-sized gradients (8V): V·(b + 12). ``head="value"`` (reward model / critic) has a scalar
    output: no V term.

    **Gradient checkpointing** (HF, one checkpoint per layer): L·b·h (each layer's input) + one
    layer's activations (recomputed during backward) + head.

    **No-grad forward** (``role="frozen"``: reference / reward scoring): nothing is saved; the
    working set is one MLP at a time, b·(2h + 3i), plus for an LM head the logits and log-probs
    V·(b + 4 + 4·[b < 4]). ``role="generate"``: the same layer working set over the prompt
    (prefill) plus last-token logits batch·V·(b + 4); the KV cache is separate.

    Not modelled: dropout in the base model (0 in these architectures), attention masks that
    force ``repeat_kv`` copies, and allocator fragmentation.
    """
    b = s.bytes
    g = dims(config)
    h, i, L, V, a = g["h"], g["i"], g["L"], g["V"], g["a"]
    T = s.batch_size * s.seq_len
    if head not in ("lm", "value"):
        raise PlanError(f"unknown head {head!r}; expected 'lm' or 'value'")

    if role in ("frozen", "generate"):
        layer_ws = b * (2 * h + 3 * i)
        if role == "generate":
            return T * layer_ws + (s.batch_size * V * (b + 4) if head == "lm" else 0)
        logits = V * (b + 4 + (4 if b < 4 else 0)) if head == "lm" else 0
        return T * (layer_ws + logits)
    if role != "train":
        raise PlanError(f"unknown role {role!r}; expected train, frozen or generate")

    full = s.method == "full"
    info = structure(config)
    targets = set(targets)
    ba = ADAPTER_BYTES

    def group(names: Sequence[str], width: int) -> tuple[bool, int]:
        """(is the shared input tensor saved?, extra adapter bytes) for linears reading one tensor."""
        saved, extra = full, 0
        for n in names:
            if n not in targets:
                continue
            extra += ba * s.r
            if s.lora_dropout > 0:
                extra += (ba + 1) * width
            elif b != ba:
                extra += ba * width
            else:
                saved = True
        return saved, extra

    def norm(width: int, out_saved: bool) -> int:
        return 4 * width + 4 + (b * width if full else 0) + (b * width if out_saved else 0)

    attn_in_saved, attn_in_extra = group(ATTN_IN, h)
    attn_out_saved, attn_out_extra = group(ATTN_OUT, g["q"])
    mlp_in_saved, mlp_in_extra = group(MLP_IN, h)
    mlp_mid_saved, mlp_mid_extra = group(MLP_MID, i)

    layer = norm(h, attn_in_saved) + norm(h, mlp_in_saved)
    layer += max(info["norms_per_layer"] - 2, 0) * norm(h, False)  # Gemma2's pre/post feed-forward norms
    if s.attention == "eager":
        layer += b * (g["q"] + 2 * g["kv"]) + a * s.seq_len * (4 + (b if b < 4 else 0))
        layer += b * g["q"] if attn_out_saved else 0
    else:
        layer += b * (2 * g["q"] + 2 * g["kv"]) + 4 * a  # output already saved by the kernel
    if info["qk_norm"]:
        layer += 4 * (g["q"] + g["kv"]) + 4 * (a + g["kvh"])
        layer += b * (g["q"] + g["kv"]) if full else 0
    layer += 3 * b * i + (b * i if mlp_mid_saved else 0)
    layer += attn_in_extra + attn_out_extra + mlp_in_extra + mlp_mid_extra

    head_saved, head_extra = group(("lm_head",), h) if head == "lm" else (full, 0)
    head_bytes = norm(h, head_saved) + head_extra + (V * (b + 12) if head == "lm" else 0)

    if s.gradient_checkpointing:
        per_token = L * b * h + layer + head_bytes
    else:
        per_token = L * layer + head_bytes
    return T * per_token
