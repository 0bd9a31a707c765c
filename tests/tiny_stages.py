"""Tiny stage outputs shared by the model-card and push tests: a run folder with an adapter, a
full model, a reward adapter and a full reward model made from a tiny real Llama (hidden 32, 2
layers), each next to what a trainer leaves behind (optimizer state, checkpoints/)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest
import yaml

from align.card import build_model_card

RECIPE = """\
name: tiny-run
base_model: org/tiny-base
stages:
  - name: sft
    type: sft
    dataset: trl-lib/Capybara
    learning_rate: 2.0e-4
  - name: dpo
    type: dpo
    dataset: ./data/prefs.jsonl
    beta: 0.1
"""
STAGES = [
    {"name": "sft", "type": "sft", "dataset": "trl-lib/Capybara",
     "hyperparameters": {"learning_rate": 2e-4, "epochs": 1, "lora_r": 4}},
    {"name": "dpo", "type": "dpo", "dataset": "./data/prefs.jsonl", "beta": 0.1, "learning_rate": 5e-6},
]
NOT_MODEL_FILES = {"optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "trainer_state.json",
                   "metrics.json", "optimizer.safetensors"}


def tree_hashes(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, _, _ = card[4:].partition("\n---\n")
    return yaml.safe_load(head)


def python_block(card: str) -> str:
    match = re.search(r"```python\n(.*?)\n```", card, re.S)
    assert match, "no python block in card"
    return match.group(1)


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["[UNK]", "[PAD]", "<s>", "</s>", "What", "is", "2", "+", "2?", "Answer:", "Question:", "4", "=",
             "4.", "the", "a", "hello", "world"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   bos_token="<s>", eos_token="</s>")


def _tiny_config(num_labels: int | None = None):
    from transformers import LlamaConfig

    kwargs = {"num_labels": num_labels} if num_labels else {}
    return LlamaConfig(vocab_size=18, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                       pad_token_id=1, bos_token_id=2, eos_token_id=3, **kwargs)


def _training_junk(stage: Path) -> None:
    """What a trainer leaves next to the model: none of it may reach the Hub."""
    (stage / "metrics.json").write_text(json.dumps({"eval_loss": 1.2345, "eval_reward_margin": 0.5}))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin", "optimizer.safetensors"):
        (stage / name).write_bytes(b"\x00training state " + name.encode())
    (stage / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    ckpt = stage / "checkpoints" / "checkpoint-3"
    ckpt.mkdir(parents=True)
    for name in ("adapter_model.safetensors", "optimizer.pt", "config.json"):
        (ckpt / name).write_bytes(b"checkpoint " + name.encode())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A run folder with four stage outputs made from a tiny real Llama (hidden 32, 2 layers)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("run")
    (root / "recipe.yaml").write_text(RECIPE)
    tokenizer = _tokenizer()

    base = root / "base"  # stands in for the Hub base model in the load snippets
    LlamaForCausalLM(_tiny_config()).save_pretrained(base)
    tokenizer.save_pretrained(base)

    stages = {}
    adapter = root / "sft"
    lora = get_peft_model(LlamaForCausalLM(_tiny_config()),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    lora.save_pretrained(adapter)
    stages["adapter"] = adapter

    full = root / "dpo"
    LlamaForCausalLM(_tiny_config()).save_pretrained(full)
    stages["full"] = full

    reward_adapter = root / "reward"
    lora_rm = get_peft_model(LlamaForSequenceClassification(_tiny_config(num_labels=1)),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="SEQ_CLS"))
    lora_rm.save_pretrained(reward_adapter)
    stages["reward_adapter"] = reward_adapter

    reward_full = root / "reward_merged"
    LlamaForSequenceClassification(_tiny_config(num_labels=1)).save_pretrained(reward_full)
    stages["reward_full"] = reward_full

    for stage in stages.values():
        tokenizer.save_pretrained(stage)
        _training_junk(stage)
    stages["root"] = root
    stages["base"] = base
    return stages


def card_for(stage: Path, *, repo_id: str = "tester/tiny", base_model: str | None = "org/tiny-base",
             stages=STAGES, merged: bool = False, **kwargs) -> str:
    """The README.md text align pushes for ``stage`` (build_model_card returns a ModelCard)."""
    card = build_model_card(stage, repo_id=repo_id, base_model=base_model, stage_summaries=stages, metrics=None,
                            recipe_text=(stage.parent / "recipe.yaml").read_text(), merged=merged, **kwargs)
    return str(card)
