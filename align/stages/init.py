"""Initialise a small Llama-style model from a config, with a byte-level BPE tokenizer trained on
the stage's `dataset` (any TRL format). Saved as an ordinary HF checkpoint: the offline default
that the quickstart, tests and benchmarks start from."""

import dataclasses

import torch

from align import data, models
from align.errors import AlignError
from align.stages import Traits

OPTIONS = {"dataset"}
TRAITS = Traits(produces="policy", data="any")


@dataclasses.dataclass
class Config:
    """LlamaConfig sizes, plus the tokenizer's vocabulary size."""

    vocab_size: int = 1024
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True
    tokenizer_samples: int = 20000  # rows of the dataset the tokenizer is trained on


def validate(stage, model):
    if "dataset" not in stage.options:
        raise AlignError(f"stages.{stage.name}.dataset: required (text to train the tokenizer on)")
    cfg = stage.config()
    if cfg.hidden_size % cfg.num_attention_heads:
        raise AlignError(f"stages.{stage.name}.hidden_size: must be a multiple of num_attention_heads "
                         f"({cfg.hidden_size} % {cfg.num_attention_heads} != 0)")


def run(stage, ctx):
    cfg = stage.config()
    # The tokenizer learns from whatever the data is: SFT, preference or prompt rows.
    ds, _ = data.load(stage.options["dataset"], TRAITS.data, f"stages.{stage.name}.dataset", ctx.seed)
    tokenizer = models.train_tokenizer(data.texts_of(ds, cfg.tokenizer_samples), cfg.vocab_size)
    torch.manual_seed(ctx.seed)
    sizes = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
             if f.name not in ("vocab_size", "tokenizer_samples") and getattr(cfg, f.name) is not None}
    model = models.init_model(sizes, tokenizer)
    if ctx.is_main:
        model.save_pretrained(stage.dir, safe_serialization=True)
        tokenizer.save_pretrained(stage.dir)
    n = sum(p.numel() for p in model.parameters())
    return {"parameters": n, "vocab_size": len(tokenizer)}

