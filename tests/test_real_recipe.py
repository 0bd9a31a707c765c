"""The real-model recipe validates offline: `align run --dry-run` on a config-only stand-in for
Qwen2.5-0.5B (same sizes, no weights) checks every stage block against TRL's classes and prints
the plan with memory per stage."""

import pytest
from transformers import Qwen2Config

from conftest import REPO, run_align


def test_qwen_recipe_dry_run_offline(tmp_path):
    Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True).save_pretrained(tmp_path)
    result = run_align(["run", "--dry-run", REPO / "recipes/qwen2.5-0.5b-rlhf.yaml",
                        "--set", f"model.name_or_path={tmp_path}", "--set", f"output_dir={tmp_path / 'run'}"],
                       env={"HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "recipe 'qwen2.5-0.5b-rlhf' is valid" in out
    for stage in ("sft", "reward", "ppo", "dpo"):
        row = next(line for line in out.splitlines() if line.startswith(f"{stage} ") and "M " in line)
        assert "GiB" in row or "MiB" in row, row
    assert "qlora r=16" in out
    assert not (tmp_path / "run" / "sft").exists(), "a dry run trains nothing"


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    """Recipes are checked against today's fields and rules (a recipe written for an older rule,
    such as missing_eos_penalty's sign, fails here rather than at a user's first run)."""
    from align.recipe import load_recipe

    assert load_recipe(path).stages
