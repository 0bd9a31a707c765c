"""Loading and building models and tokenizers.

Every stage gets its model through `load_model` and its tokenizer through `load_tokenizer`, so
dtype, quantization, `trust_remote_code`, adapters and chat templates are handled in one place.
`init_model` builds a small Llama-style model and a byte-level BPE tokenizer from scratch: the
offline default used by the quickstart, tests and benchmarks.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from align.errors import AlignError, first_line

# ChatML-style turns for tokenizers that ship no chat template. `{% generation %}` marks assistant
# tokens so TRL can train on them only (assistant_only_loss). Every turn ends with the EOS token:
# the model's own EOS when it has one (GPT-2, GPT-NeoX, OPT: `<|im_start|>` is then plain text),
# because a LoRA adapter cannot train the embedding of a token added here, so a new end-of-turn
# token would never be emitted; `<|im_end|>`, added as the EOS, only for a tokenizer without one.
DEFAULT_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\n' }}"
    "{%- generation %}{{- message['content'] + eos_token }}{%- endgeneration %}"
    "{{- '\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + eos_token + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
END_OF_TURN = "<|im_end|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = [PAD, "<|im_start|>", END_OF_TURN, "<|endoftext|>"]
# Tokens that ship unused in real vocabularies and can pad without growing the embeddings
# (Llama 3.1 pads with the first; Llama 3 reserves the second).
SPARE_PADS = ("<|finetune_right_pad_id|>", "<|reserved_special_token_0|>", PAD, "<pad>")

ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
# Set on a tokenizer that got DEFAULT_CHAT_TEMPLATE while loading: the EOS it had before (its
# model read plain text ending there, align.render.reads_chat). Not saved: once align trains the
# model with the template, it reads chat.
PLAIN_EOS = "align_plain_eos"


def is_adapter(path: str | os.PathLike) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | os.PathLike) -> str:
    """The base model an adapter folder was trained on."""
    with open(Path(path) / ADAPTER_CONFIG) as f:
        return json.load(f)["base_model_name_or_path"]


def check_model_path(path: str, where: str = "model"):
    """A local model path must be a folder holding a model or an adapter (Hub ids pass: they are
    resolved when loaded). Without this, transformers reads a missing path as a malformed Hub id
    and an empty folder as a tokenizer backend failure."""
    from align.data import looks_local

    local = Path(path).expanduser()
    if not local.exists():
        if looks_local(path):
            raise AlignError(f"{where}: '{path}' does not exist (a local model folder, or a Hub id owner/name)")
        return
    if not local.is_dir():
        raise AlignError(f"{where}: '{path}' is a file; give the model's folder (with config.json)")
    if not (local / "config.json").is_file() and not (local / ADAPTER_CONFIG).is_file():
        raise AlignError(f"{where}: '{path}' holds no model (no config.json or {ADAPTER_CONFIG}); is it the "
                         f"right folder, and did the stage that writes it finish?")


def classifier_architecture(path: str) -> str | None:
    """The sequence-classifier architecture (or "SEQ_CLS adapter") of a local checkpoint, "" when
    it is a local checkpoint of anything else, None when that cannot be told (a Hub id)."""
    try:
        if is_adapter(path):
            with open(Path(path) / ADAPTER_CONFIG) as f:
                return "SEQ_CLS adapter" if json.load(f).get("task_type") == "SEQ_CLS" else ""
        with open(Path(path) / "config.json") as f:
            architectures = json.load(f).get("architectures") or []
    except (OSError, ValueError):
        return None
    return next((a for a in architectures if a.endswith("ForSequenceClassification")), "")


def check_policy_model(path: str, where: str):
    """A policy must be a causal LM: a reward model loaded as one has no trained LM head (its
    generations are noise)."""
    architecture = classifier_architecture(path)
    if architecture:
        raise AlignError(f"{where}: '{path}' is a reward model ({architecture}), not a policy: it scores text and "
                         f"cannot generate it; use a policy stage's output (sft, dpo, ppo ...)")


def check_reward_model(path: str, where: str):
    """A reward model must have a trained score head: a causal LM given as one would be scored
    by a randomly initialised head (training against noise)."""
    if classifier_architecture(path) == "":
        raise AlignError(f"{where}: '{path}' is not a reward model (no trained score head: it is a causal LM "
                         f"or another model type); use a reward stage's output, e.g. ${{reward}}")


def disable_dropout(model):
    """Dropout off everywhere: PPO's ratio then compares the same function twice (KL 0 and
    ratio 1 before the first update), and TRL stages with `disable_dropout: true` get what the
    field says (TRL's switch only reaches nn.Dropout modules). Zeroing the config is not
    enough: layers copy their rates at construction (Llama's `attention_dropout`, OPT's `dropout` and `layerdrop`) and
    read the copy in train mode. So: nn.Dropout modules (LoRA's too), every float attribute
    of a module whose name says drop (the copies), and the configs (read at call time)."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "drop" in name and isinstance(value, float):
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for key, value in config.to_dict().items():
                if isinstance(value, float) and "drop" in key:
                    setattr(config, key, 0.0)


# ---------------------------------------------------------------------------------------------
# Tokenizers


def train_tokenizer(texts, vocab_size: int = 1024):
    """Train a byte-level BPE tokenizer on `texts` and wrap it as a transformers tokenizer.

    Byte-level BPE never meets an unknown character, so any later text tokenizes.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=END_OF_TURN,
        pad_token=PAD,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=["<|im_start|>", "<|endoftext|>"],
    )
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return tokenizer


def prepare_tokenizer(tokenizer):
    """Make a tokenizer ready for chat training: a chat template, an EOS and a pad token.

    The pad token must be none of the tokens that end a reply (the EOS, the template's end of
    turn): a sequence classifier reads its score at the last token that is not the pad, and masks
    inferred from pad == eos hide the real end-of-turn token (see trl PR #5303). Qwen base models
    and Phi-3 ship pad == eos. A missing or clashing pad becomes the unknown token or a spare
    token of the vocabulary when there is one (no new embedding row: an adapter trained on a
    grown vocabulary must carry the whole embedding matrix), else a new `<|pad|>`.
    """
    if tokenizer.chat_template is None:
        setattr(tokenizer, PLAIN_EOS, tokenizer.eos_token or "")
        if tokenizer.eos_token is None or END_OF_TURN in tokenizer.get_vocab():
            if END_OF_TURN not in tokenizer.get_vocab():
                tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", END_OF_TURN]})
            tokenizer.eos_token = END_OF_TURN
        tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if tokenizer.eos_token is None:
        raise AlignError("the tokenizer has no eos_token; set one in the tokenizer files")
    stops = {tokenizer.eos_token_id, *end_of_turn_ids(tokenizer)}
    if tokenizer.pad_token is None or tokenizer.pad_token_id in stops:
        vocab = tokenizer.get_vocab()
        spare = [t for t in (tokenizer.unk_token, *SPARE_PADS) if t in vocab and vocab[t] not in stops]
        if spare:
            tokenizer.pad_token = spare[0]
        else:
            tokenizer.add_special_tokens({"pad_token": PAD})
    return tokenizer


def end_of_turn_ids(tokenizer) -> list[int]:
    """The special token the chat template closes an assistant turn with: the first special token
    rendered after a reply (Llama 3's <|eot_id|>, ChatML's <|im_end|>, Gemma's <end_of_turn>,
    Phi-3's <|end|>, Mistral's and OLMo 2's eos). It is often not the tokenizer's eos (Qwen base
    models: <|endoftext|>; Llama 3: <|end_of_text|>), and a model taught to end its turns stops
    only if generation stops there. [] when the template renders no special token after a reply."""
    from jinja2.exceptions import TemplateError

    reply = "Zq7 xj"
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}],
                                             tokenize=False)
    except (TemplateError, ValueError, TypeError):
        return []
    at = text.rfind(reply)
    if at < 0:
        return []
    special = {i for i, token in tokenizer.added_tokens_decoder.items() if token.special}
    after = tokenizer(text[at + len(reply):], add_special_tokens=False)["input_ids"]
    return [next(i for i in after if i in special)] if any(i in special for i in after) else []


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Every token that ends a reply: the tokenizer's eos, the chat template's end of turn, and the
    eos ids of the model's generation config (Llama-3-Instruct lists end of text and end of turn)."""
    ids = [tokenizer.eos_token_id, *end_of_turn_ids(tokenizer)]
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += list(extra) if isinstance(extra, (list, tuple)) else [extra]
    return list(dict.fromkeys(int(i) for i in ids if isinstance(i, int)))


def load_tokenizer(path: str, *, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    check_model_path(path)
    if is_adapter(path) and not Path(path, "tokenizer_config.json").is_file():
        path = adapter_base(path)
    local = Path(path).expanduser()
    if local.is_dir() and not any((local / name).is_file() for name in TOKENIZER_FILES):
        raise AlignError(f"model: '{path}' has no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except (OSError, ValueError) as e:
        raise AlignError(f"model: cannot load a tokenizer from '{path}': {first_line(e)}") from None
    return prepare_tokenizer(tokenizer)


# ---------------------------------------------------------------------------------------------
# Models


def torch_dtype(name: str | None):
    if name in (None, "auto"):
        return "auto"
    try:
        return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]
    except KeyError:
        raise AlignError(f"model.dtype: unknown dtype '{name}'; use float32, bfloat16, float16 or auto") from None


def quantization_config(block: dict | None):
    """BitsAndBytesConfig from a recipe `quantization:` block (its fields verbatim)."""
    if not block:
        return None
    from transformers import BitsAndBytesConfig

    fields = dict(block)
    for key in ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage"):
        if isinstance(fields.get(key), str):
            fields[key] = torch_dtype(fields[key])
    return BitsAndBytesConfig(**fields)


def prepare_kbit_training(model, gradient_checkpointing: bool):
    """peft's k-bit preparation for a quantized model that will train, and no CPU repacking.

    On CPUs with AVX512-BF16, a bitsandbytes `Linear4bit` that runs once in eval mode without
    gradients (generation, evaluation) swaps its weights for a layout served by `gemv_4bit`,
    and keeps them so. That kernel has no backward: later training steps silently lose the
    gradient through every base layer (measured: LoRA gradients of the first layer change
    after one eval-mode forward). A model that trains keeps the training layout."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def load_model(
    path: str,
    *,
    kind: str = "causal-lm",
    dtype: str | None = "auto",
    quantization: dict | None = None,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str | None = None,
):
    """Load a causal LM, or a one-logit sequence classifier with kind="seq-cls".

    An adapter folder is loaded onto its base and merged, so a stage always starts from plain
    weights (see `_load_merged_adapter`).
    """
    kwargs = dict(dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, revision=revision)
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if kind == "seq-cls":
        kwargs["num_labels"] = 1
    check_model_path(path)
    if kind == "causal-lm":
        check_policy_model(path, "model")
    qconfig = quantization_config(quantization)
    if qconfig is not None:
        kwargs["quantization_config"] = qconfig
        if torch.cuda.is_available():
            kwargs["device_map"] = {"": torch.cuda.current_device()}
    try:
        if is_adapter(path):
            model = _load_merged_adapter(path, kind, dtype, trust_remote_code, kwargs)
        else:
            model = _model_class(kind).from_pretrained(path, **kwargs)
    except (OSError, ValueError) as e:
        raise AlignError(f"model: cannot load '{path}': {first_line(e)}") from None
    if kind == "seq-cls":  # its score is read at the last token that is not the tokenizer's pad
        model.config.pad_token_id = load_tokenizer(path, trust_remote_code=trust_remote_code).pad_token_id
    return model


def adapter_kind(path) -> str:
    with open(Path(path) / ADAPTER_CONFIG) as f:
        return "seq-cls" if json.load(f).get("task_type") == "SEQ_CLS" else "causal-lm"


def fit_tokenizer(model, tokenizer):
    """Make `model` agree with the tokenizer that feeds it: room for every token, same pad id.

    align adds a pad token to tokenizers without one (Llama 3, Mistral, GPT-2) and ChatML turn
    tokens to those without a chat template (GPT-2, GPT-NeoX, OPT). peft then saves the resized
    embeddings inside every adapter trained on such a base, so a base must be grown the same way
    before such an adapter can be loaded onto it. Never shrinks: real vocabularies often have
    spare rows (Qwen2.5: 151,936 rows for 151,665 tokens), which are then used as they are.

    A sequence classifier finds the last real token of each row as the last one that is not
    `config.pad_token_id`, so that id must be the one the batches are padded with (a pad copied
    from eos would read the score from padding, or before a final eos)."""
    if len(tokenizer) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _load_merged_adapter(path, kind, dtype, trust_remote_code, kwargs):
    """Base + adapter, merged. The base may itself be an adapter (LoRA on a LoRA output): it is
    loaded the same way, recursively. The merged model is named after the adapter folder, so an
    adapter trained on top of it records the true chain rather than the bare base."""
    from peft import PeftModel

    own_kind = adapter_kind(path)
    if own_kind == kind and "quantization_config" not in kwargs:
        base = load_model(adapter_base(path), kind=kind, dtype=dtype, trust_remote_code=trust_remote_code,
                          attn_implementation=kwargs.get("attn_implementation"))
        fit_tokenizer(base, load_tokenizer(str(path), trust_remote_code=trust_remote_code))
        merged = PeftModel.from_pretrained(base, path).merge_and_unload()
        merged.config._name_or_path = str(path)
        return merged
    # bitsandbytes quantizes while loading, and a causal-LM adapter must be merged into a causal
    # LM before its weights can start a classifier: both go through a merged copy on disk.
    target = Path(path) / "merged"
    if not (target / "config.json").is_file():
        merged = load_model(str(path), kind=own_kind, dtype=dtype, trust_remote_code=trust_remote_code)
        tmp = target.with_name(f"merged.tmp{os.getpid()}")
        merged.save_pretrained(tmp, safe_serialization=True)
        load_tokenizer(str(path), trust_remote_code=trust_remote_code).save_pretrained(tmp)  # a complete model folder
        try:
            os.replace(tmp, target)
        except OSError:  # another process (same launch) got there first: use its copy
            shutil.rmtree(tmp, ignore_errors=True)
            if not (target / "config.json").is_file():
                raise
    return _model_class(kind).from_pretrained(target, **kwargs)


def _model_class(kind: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if kind == "seq-cls" else AutoModelForCausalLM


def init_model(model_fields: dict, tokenizer):
    """A randomly initialised Llama-style causal LM sized by the recipe (LlamaConfig fields)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = {
        "hidden_size": 128,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "max_position_embeddings": 512,
        "tie_word_embeddings": True,
        **model_fields,
    }
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **fields,
    )
    return LlamaForCausalLM(config)
