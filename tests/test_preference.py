"""Reward model and DPO stages, TRL's preference formats, and bad preference data."""

import json

import pytest
import torch

from align import data
from align.errors import AlignError
from conftest import read_metrics, run_align, write_jsonl, write_recipe

PAIRS = [("reverse abc", "cba", "abc"), ("reverse dea", "aed", "dea"), ("reverse fbd", "dbf", "fbd")]


def _formats(tmp_path):
    """The four TRL preference formats: standard/conversational x explicit/implicit prompt."""
    u = lambda t: [{"role": "user", "content": t}]  # noqa: E731
    a = lambda t: [{"role": "assistant", "content": t}]  # noqa: E731
    rows = {
        "standard_explicit": [{"prompt": p, "chosen": c, "rejected": r} for p, c, r in PAIRS],
        "standard_implicit": [{"chosen": f"{p} {c}", "rejected": f"{p} {r}"} for p, c, r in PAIRS],
        "conversational_explicit": [{"prompt": u(p), "chosen": a(c), "rejected": a(r)} for p, c, r in PAIRS],
        "conversational_implicit": [{"chosen": u(p) + a(c), "rejected": u(p) + a(r)} for p, c, r in PAIRS],
    }
    return {k: write_jsonl(tmp_path / f"{k}.jsonl", v) for k, v in rows.items()}


def test_every_trl_preference_format_is_accepted(tmp_path):
    for name, path in _formats(tmp_path).items():
        ds, _ = data.load({"path": str(path)}, "preference", "dataset")
        assert len(ds) == len(PAIRS), name
        assert {"chosen", "rejected"} <= set(ds.column_names)
        # Conversational pairs get their shared leading turns as an explicit prompt (what TRL's
        # DPO trainer extracts); text pairs with an implicit prompt stay as TRL takes them.
        assert ("prompt" in ds.column_names) == (name != "standard_implicit")
        if name == "conversational_implicit":
            assert ds[0]["prompt"] == [{"role": "user", "content": PAIRS[0][0]}]
            assert ds[0]["chosen"] == [{"role": "assistant", "content": PAIRS[0][1]}]


GOOD = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize("rows,message", [
    ([GOOD, {"prompt": "p", "chosen": "a", "rejected": ""}], "row 2, 'rejected': empty text"),
    ([GOOD, GOOD, {"prompt": "p", "chosen": "a", "rejected": None}], "row 3, 'rejected': missing (null)"),
    ([{"prompt": "  ", "chosen": "a", "rejected": "b"}], "row 1, 'prompt': empty text"),
    ([GOOD, {"prompt": "p", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}],
     "row 2, 'chosen': holds a list of messages where row 1 holds text"),
])
def test_bad_preference_rows_are_refused_with_a_count(tmp_path, rows, message):
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(AlignError) as info:
        data.load({"path": str(path)}, "preference", "stages.reward.dataset")
    assert message in str(info.value)
    assert str(info.value).startswith(f"stages.reward.dataset: {path}: 1 bad row(s); first at row")


def test_identical_pairs_are_dropped_with_a_counted_warning(tmp_path, capsys):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "a"}] * 2 + [{"prompt": "p", "chosen": "a", "rejected": "b"}]
    ds, _ = data.load({"path": str(write_jsonl(tmp_path / "d.jsonl", rows))}, "preference", "dataset")
    assert len(ds) == 1
    assert "dropped 2 pair(s)" in capsys.readouterr().out


def _reward_stage(model, prefs, **extra):
    return {"model": str(model), "dataset": {"path": str(prefs), "test_size": 0.2}, "learning_rate": 3e-3,
            "max_steps": 40, "per_device_train_batch_size": 16, "save_strategy": "no", "logging_steps": 5,
            "lr_scheduler_type": "constant", **extra}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_reward_model_learns_and_loads_as_a_sequence_classifier(tmp_path, pretrained_model, data_dir, lora):
    extra = {"peft": {"r": 8, "lora_alpha": 16}} if lora else {}
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run",
                          {"reward": _reward_stage(pretrained_model, data_dir / "prefs.jsonl", **extra)})
    run_align(["run", recipe], check=True)
    out = tmp_path / "run" / "reward"
    m = read_metrics(out)
    assert m["train_loss_last"] < m["train_loss_first"]
    assert m["pair_accuracy"] > 0.7, m

    # Loads with plain transformers (+ peft for the adapter, whose saved modules include the head).
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if lora:
        from peft import PeftModel

        cfg = json.loads((out / "adapter_config.json").read_text())
        assert "score" in (cfg.get("modules_to_save") or [])
        base = AutoModelForSequenceClassification.from_pretrained(cfg["base_model_name_or_path"], num_labels=1)
        model = PeftModel.from_pretrained(base, out)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    model.config.pad_token_id = tok.pad_token_id
    texts = [tok.apply_chat_template([{"role": "user", "content": "reverse abd"}, {"role": "assistant", "content": t}],
                                     tokenize=False) for t in ("dba", "I do not know")]
    with torch.no_grad():
        scores = model(**tok(texts, return_tensors="pt", padding=True)).logits[:, 0]
    assert scores.shape == (2,) and scores[0] > scores[1]


def test_dpo_with_lora_holds_one_base_model(tmp_path, pretrained_model, data_dir):
    from accelerate import PartialState

    from align.recipe import load_recipe
    from align.run import Context
    from trl import DPOTrainer

    from align.training import build_trainer

    stage = {"model": str(pretrained_model), "dataset": {"path": str(data_dir / "prefs.jsonl")},
             "peft": {"r": 8}, "max_steps": 2, "per_device_train_batch_size": 8}
    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"dpo": stage}))
    trainer = build_trainer(recipe.stage("dpo"), Context(recipe, PartialState()), DPOTrainer)
    from transformers import AutoModelForCausalLM

    base_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(pretrained_model).parameters())
    held = sum(p.numel() for p in trainer.model.parameters())
    lora = sum(p.numel() for n, p in trainer.model.named_parameters() if "lora_" in n)
    assert trainer.ref_model is None, "the reference is the base with the adapter disabled"
    assert held == base_params + lora


def test_dpo_stage_trains(tmp_path, pretrained_model, data_dir):
    stage = {"model": str(pretrained_model), "dataset": {"path": str(data_dir / "prefs.jsonl"), "test_size": 0.2},
             "peft": {"r": 8, "lora_alpha": 16}, "max_steps": 30, "learning_rate": 5e-3, "beta": 0.1,
             "per_device_train_batch_size": 16, "save_strategy": "no", "logging_steps": 5}
    recipe = write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"dpo": stage})
    run_align(["run", recipe], check=True)
    m = read_metrics(tmp_path / "run" / "dpo")
    assert m["train_loss_last"] < m["train_loss_first"] and m["pref_accuracies"] > 0.7, m
