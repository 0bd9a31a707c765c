"""align.card: the model card built on huggingface_hub's ModelCardData + ModelCard.from_template,
read back through huggingface_hub's own parser; token-shaped strings never reach it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from tiny_stages import RECIPE, STAGES, card_for, front_matter, models, python_block  # noqa: E402,F401

from align.card import build_model_card, eval_results  # noqa: E402
from align.errors import AlignError  # noqa: E402

HUB_TOKEN = "hf_" + "AbC123xyz" * 4  # token-shaped, not a real one


def test_card_adapter(models):
    card = card_for(models["adapter"])
    meta = front_matter(card)
    assert meta["library_name"] == "peft"
    assert meta["base_model"] == "org/tiny-base"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["tags"][:4] == ["align", "trl", "sft", "dpo"] and "lora" in meta["tags"]
    assert meta["datasets"] == ["trl-lib/Capybara"]  # the local jsonl is not a Hub dataset
    for section in ("## Training procedure", "## Evaluation", "## How to use", "## Training recipe"):
        assert section in card
    assert "| 1 | sft | sft | trl-lib/Capybara | learning_rate=0.0002, epochs=1, lora_r=4 |" in card
    assert "| 2 | dpo | dpo | ./data/prefs.jsonl | beta=0.1, learning_rate=5e-06 |" in card
    assert "| eval_loss | 1.234 |" in card  # read from metrics.json when metrics=None
    assert "```yaml\n" + RECIPE.rstrip() + "\n```" in card
    code = python_block(card)
    assert 'base_model_id = "org/tiny-base"' in code and 'adapter_id = "tester/tiny"' in code
    assert "AutoModelForCausalLM.from_pretrained(base_model_id" in code
    assert "PeftModel.from_pretrained(model, adapter_id)" in code
    assert "AutoModelForSequenceClassification" not in code


def test_card_full_model(models):
    card = card_for(models["full"], merged=True, stages=STAGES[:1] + [{"name": "dpo", "type": "dpo"}])
    meta = front_matter(card)
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert "lora" not in meta["tags"]
    assert "merged into the base weights" in card
    code = python_block(card)
    assert "peft" not in code.lower()
    assert 'AutoModelForCausalLM.from_pretrained(model_id, dtype="auto")' in code


@pytest.mark.parametrize("kind", ["reward_adapter", "reward_full"])
def test_card_reward_model(models, kind):
    stages = [{"name": "reward", "type": "reward", "dataset": "trl-lib/ultrafeedback_binarized"}]
    card = card_for(models[kind], stages=stages, merged=kind == "reward_full")
    meta = front_matter(card)
    assert meta["pipeline_tag"] == "text-classification"
    assert meta["library_name"] == ("peft" if kind == "reward_adapter" else "transformers")
    assert "reward" in meta["tags"] and "reward-model" in meta["tags"]
    code = python_block(card)
    assert "AutoModelForSequenceClassification" in code and "AutoModelForCausalLM" not in code
    assert ("PeftModel.from_pretrained" in code) == (kind == "reward_adapter")
    assert "logits[0, 0]" in code


def test_card_rejects_merged_adapter_only(models):
    with pytest.raises(AlignError, match="merged=True"):
        card_for(models["adapter"], merged=True)


@pytest.mark.parametrize("kind", ["adapter", "full", "reward_adapter", "reward_full"])
def test_card_load_snippet_runs(models, kind):
    """The snippet really loads the model: run it with the repo id swapped for the local folder."""
    stage = models[kind]
    stages = [{"name": stage.name, "type": "reward" if "reward" in kind else "sft"}]
    card = card_for(stage, repo_id="tester/tiny", base_model=str(models["base"]), stages=stages,
                    merged=kind in ("full", "reward_full"))
    assert "base_model" not in front_matter(card)  # a local path is not a Hub id
    code = python_block(card).replace('"tester/tiny"', json.dumps(str(stage)))
    namespace: dict = {}
    exec(compile(code, f"<card snippet {kind}>", "exec"), namespace)  # noqa: S102
    if "reward" in kind:
        assert isinstance(namespace["score"], float)
    else:
        assert namespace["outputs"].shape[0] == 1



def test_card_round_trips_through_huggingface_hub(models, tmp_path):
    """The metadata is huggingface_hub's: ModelCard.load and ModelCard(text).data read it back,
    model-index included (only for eval data on the Hub: a local file has no dataset page)."""
    from huggingface_hub import ModelCard

    recipe = {"stages": {"sft": {"type": "sft"}, "eval": {
        "type": "eval", "prompts": {"path": "trl-lib/ultrafeedback-prompt", "split": "test"}, "texts": "local.jsonl"}}}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval.json").write_text(json.dumps(
        {"policies": {"sft": {"gold_score": 87.5, "reward": 0.25, "perplexity": 3.5}}, "samples": []}))
    results = eval_results(tmp_path / "sft", recipe)
    assert [(r.metric_type, r.metric_value, r.dataset_type, r.dataset_split, r.task_type) for r in results] == [
        ("gold_score", 87.5, "trl-lib/ultrafeedback-prompt", "test", "text-generation"),
        ("reward", 0.25, "trl-lib/ultrafeedback-prompt", "test", "text-generation")]

    # In a recipe's dataset mapping `name` is the Hub config, not the dataset.
    stages = [{"name": "sft", "type": "sft", "dataset": {"path": "trl-lib/Capybara", "name": "default"}}]
    card = card_for(models["adapter"], stages=stages, eval_results=results, license="apache-2.0")
    (tmp_path / "README.md").write_text(card)
    for data in (ModelCard.load(tmp_path / "README.md").data, ModelCard(card).data):
        assert data.base_model == "org/tiny-base"
        assert data.datasets == ["trl-lib/Capybara"]
        assert data.library_name == "peft" and data.license == "apache-2.0"
        assert data.pipeline_tag == "text-generation"
        assert data.tags == ["align", "trl", "sft", "lora"]
        assert data.model_name == "tiny"
        assert data.eval_results == results
    assert "| 1 | sft | sft | trl-lib/Capybara |" in card


def test_card_redacts_token_shaped_strings(models):
    stages = [{"name": "sft", "type": "sft", "dataset": f"org/data-{HUB_TOKEN}",
               "hyperparameters": {"run_name": f"deploy-{HUB_TOKEN}"}}]
    card = str(build_model_card(models["adapter"], repo_id="tester/tiny", base_model="org/tiny-base",
                                stage_summaries=stages, metrics={f"x-{HUB_TOKEN}": 1.0}, merged=False,
                                recipe_text=f"name: tiny\nrun_name: deploy-{HUB_TOKEN}\n"))
    assert HUB_TOKEN not in card and HUB_TOKEN[:12] not in card
    assert "run_name: deploy-hf_***" in card  # the recipe block
    assert "run_name=deploy-hf_***" in card  # the stage table
    assert front_matter(card)["datasets"] == ["org/data-hf_***"]  # still valid YAML


def test_recipe_scrub_redacts_tokens_inside_values(tmp_path):
    from align.recipe import build_recipe, dump_yaml, scrub

    assert scrub({"run_name": f"deploy-{HUB_TOKEN}", "token": "anything", "list": [HUB_TOKEN, "kept"]}) == {
        "run_name": "deploy-hf_***", "token": "***", "list": ["hf_***", "kept"]}
    recipe = build_recipe({"name": f"run-{HUB_TOKEN}", "output_dir": str(tmp_path / "run"), "stages": {"init": {
        "dataset": {"path": str(tmp_path / "text.jsonl")}, "vocab_size": 300}}})
    saved = dump_yaml(recipe.resolved)  # what the run writes as recipe.yaml
    assert HUB_TOKEN not in saved and "name: run-hf_***" in saved
