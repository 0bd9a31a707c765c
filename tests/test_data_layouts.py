"""Data layouts users bring, each in its exact published layout (written here, a few rows),
accepted without `columns:` renames or `format:`, normalised onto one TRL format, and taken
by TRL's trainers as the text a TRL user expects."""

import pytest

from align import data
from align.errors import AlignError
from conftest import write_jsonl


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


QUESTIONS = [("What is 2+2?", "4", "5"), ("Name a colour.", "Blue.", "Seven."), ("Say hi.", "Hi!", "No.")]


def ultrafeedback(path):
    """HuggingFaceH4/ultrafeedback_binarized: a string prompt, chosen/rejected as whole
    conversations (user turn included), plus prompt_id, messages and scores."""
    return write_jsonl(path, [{"prompt": q, "prompt_id": f"{i:064x}", "chosen": [u(q), a(c)], "rejected": [u(q), a(r)],
                               "messages": [u(q), a(c)], "score_chosen": 8.0, "score_rejected": 3.5}
                              for i, (q, c, r) in enumerate(QUESTIONS)])


def hh_rlhf(path):
    """Anthropic/hh-rlhf: two transcripts sharing the prompt, nothing else."""
    return write_jsonl(path, [{"chosen": f"\n\nHuman: {q}\n\nAssistant: {c}", "rejected": f"\n\nHuman: {q}\n\nAssistant: {r}"}
                              for q, c, r in QUESTIONS])


def capybara(path):
    """trl-lib/Capybara: `messages` plus bookkeeping columns."""
    return write_jsonl(path, [{"source": "Airoboros", "messages": [u(q), a(c), u("Why?"), a("Because.")]}
                              for q, c, _ in QUESTIONS])


def sharegpt(path):
    return write_jsonl(path, [{"id": str(i), "conversations": [{"from": "system", "value": "Be brief."},
                                                               {"from": "human", "value": q}, {"from": "gpt", "value": c}]}
                              for i, (q, c, _) in enumerate(QUESTIONS)])


def alpaca(path):
    """yahma/alpaca-cleaned: instruction, input (often empty), output."""
    return write_jsonl(path, [{"instruction": q, "input": "" if i else "Think first.", "output": c}
                              for i, (q, c, _) in enumerate(QUESTIONS)])


def load(path, kind, **source):
    ds, _ = data.load({"path": str(path), **source}, kind, "dataset")
    return ds


def test_ultrafeedback_binarized_pairs(tmp_path):
    """The string prompt is what chosen/rejected already start with: TRL's maybe_extract_prompt
    ignores it and uses the shared turns; so does align (no prompt twice in the text)."""
    ds = load(ultrafeedback(tmp_path / "uf.jsonl"), "preference")
    assert sorted(ds.column_names) == ["chosen", "prompt", "rejected"]
    assert ds[0] == {"prompt": [u("What is 2+2?")], "chosen": [a("4")], "rejected": [a("5")]}
    # the same file for SFT is its `messages`, for PPO its prompts
    assert load(tmp_path / "uf.jsonl", "lm")["messages"][1] == [u("Name a colour."), a("Blue.")]
    assert load(tmp_path / "uf.jsonl", "prompt")["prompt"] == [q for q, _, _ in QUESTIONS]


def test_string_prompt_beside_answer_only_messages_becomes_a_user_turn(tmp_path):
    rows = [{"prompt": q, "chosen": [a(c)], "rejected": [a(r)], "score_chosen": 1} for q, c, r in QUESTIONS]
    ds = load(write_jsonl(tmp_path / "p.jsonl", rows), "preference")
    assert ds[2] == {"prompt": [u("Say hi.")], "chosen": [a("Hi!")], "rejected": [a("No.")]}
    rows = [{"prompt": q, "completion": [a(c)]} for q, c, _ in QUESTIONS]
    assert load(write_jsonl(tmp_path / "pc.jsonl", rows), "lm")[0] == {"prompt": [u("What is 2+2?")],
                                                                         "completion": [a("4")]}


def test_hh_rlhf_transcripts_stay_implicit_text_pairs(tmp_path):
    ds = load(hh_rlhf(tmp_path / "hh.jsonl"), "preference")
    assert sorted(ds.column_names) == ["chosen", "rejected"]
    assert ds[0]["chosen"] == "\n\nHuman: What is 2+2?\n\nAssistant: 4"


def test_sft_layouts(tmp_path):
    capy = load(capybara(tmp_path / "capybara.jsonl"), "lm")
    assert capy.column_names == ["messages"] and len(capy[0]["messages"]) == 4
    expected = [{"role": "system", "content": "Be brief."}, u("What is 2+2?"), a("4")]
    assert load(sharegpt(tmp_path / "sharegpt.jsonl"), "lm")[0]["messages"] == expected
    assert load(tmp_path / "sharegpt.jsonl", "lm", format="sharegpt")[0]["messages"] == expected  # format: still works
    alp = load(alpaca(tmp_path / "alpaca.jsonl"), "lm")
    assert alp[0]["messages"] == [u("What is 2+2?\n\nThink first."), a("4")]
    assert alp[1]["messages"] == [u("Name a colour."), a("Blue.")]


@pytest.mark.parametrize("rows,expected", [
    ([{"prompt": q} for q, _, _ in QUESTIONS], "What is 2+2?"),
    ([{"prompt": [u(q)]} for q, _, _ in QUESTIONS], [u("What is 2+2?")]),
], ids=["string", "messages"])
def test_prompt_only_layouts(tmp_path, rows, expected):
    assert load(write_jsonl(tmp_path / "p.jsonl", rows), "prompt")[0]["prompt"] == expected


def test_conversations_give_prompts_without_their_answer(tmp_path):
    """SFT data as PPO/eval prompts: the turns before the last assistant answer."""
    prompts = load(capybara(tmp_path / "capybara.jsonl"), "prompt")["prompt"]
    assert prompts[0] == [u("What is 2+2?"), a("4"), u("Why?")]
    assert load(sharegpt(tmp_path / "s.jsonl"), "prompt")["prompt"][1][-1] == u("Name a colour.")


def test_sft_mixture_of_layouts_is_one_format(tmp_path):
    pc = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": [u("q")], "completion": [a("c")]}])
    spec = [{"path": str(capybara(tmp_path / "c.jsonl"))}, {"path": str(sharegpt(tmp_path / "s.jsonl"))},
            {"path": str(alpaca(tmp_path / "a.jsonl")), "weight": 2}, {"path": str(pc)}]
    ds, _ = data.load(spec, "lm", "stages.sft.dataset")
    assert ds.column_names == ["messages"] and len(ds) == 3 + 3 + 6 + 1
    assert [u("q"), a("c")] in ds["messages"]


def test_preference_mixture_extracts_text_prompts_and_fills_margin(tmp_path):
    explicit = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "Q: 1+1?", "chosen": " 2", "rejected": " 3", "margin": 2.0}])
    implicit = write_jsonl(tmp_path / "i.jsonl", [{"chosen": "Q: 2+2? 4", "rejected": "Q: 2+2? 5"}])
    ds, _ = data.load([{"path": str(explicit)}, {"path": str(implicit)}], "preference", "d")
    rows = sorted(ds, key=lambda r: r["margin"])
    assert rows[0] == {"prompt": "Q: 2+2?", "chosen": " 4", "rejected": " 5", "margin": 0.0}
    assert rows[1]["margin"] == 2.0


def test_mixture_of_text_and_messages_names_both_sources(tmp_path):
    spec = [{"path": str(ultrafeedback(tmp_path / "uf.jsonl"))}, {"path": str(hh_rlhf(tmp_path / "hh.jsonl"))}]
    with pytest.raises(AlignError) as info:
        data.load(spec, "preference", "stages.reward.dataset")
    message = str(info.value)
    assert "stages.reward.dataset[0]" in message and "uf.jsonl" in message and "message lists" in message
    assert "stages.reward.dataset[1]" in message and "hh.jsonl" in message and "cannot be mixed" in message


def test_eval_pairs_read_every_layout(tmp_path):
    """`align eval --pairs` and the eval stage read rows through `data.read_rows`: the same
    normalisation, so UltraFeedback pairs score exactly like their TRL-format twin."""
    uf = data.read_rows(str(ultrafeedback(tmp_path / "uf.jsonl")), "preference", "--pairs")
    trl = data.read_rows(str(write_jsonl(tmp_path / "trl.jsonl", [{"prompt": [u(q)], "chosen": [a(c)], "rejected": [a(r)]}
                                                                  for q, c, r in QUESTIONS])), "preference", "--pairs")
    assert uf == trl
    assert len(data.read_rows(str(hh_rlhf(tmp_path / "hh.jsonl")), "preference", "--pairs")) == 3


def test_trl_trainers_see_the_prompt_once(tmp_path, tiny_model):
    """RewardTrainer and DPOTrainer tokenise the normalised UltraFeedback rows: the prompt
    appears once in every sequence and the answers follow it."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    from align import models

    ds = load(ultrafeedback(tmp_path / "uf.jsonl"), "preference")
    tok = models.load_tokenizer(str(tiny_model))
    common = dict(report_to="none", use_cpu=True, bf16=False, per_device_train_batch_size=2)
    reward = RewardTrainer(model=AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1),
                           args=RewardConfig(output_dir=str(tmp_path / "r"), **common), train_dataset=ds,
                           processing_class=tok)
    text = tok.decode(reward.train_dataset[0]["chosen_ids"])
    assert text.count("What is 2+2?") == 1 and text.index("What is 2+2?") < text.rindex("4")
    dpo = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_model), args=DPOConfig(output_dir=str(tmp_path / "d"),
                     **common), train_dataset=ds, processing_class=tok)
    row = dpo.train_dataset[1]
    assert tok.decode(row["prompt_ids"]).count("Name a colour.") == 1
    assert "Blue." in tok.decode(row["chosen_ids"]) and "Name a colour." not in tok.decode(row["chosen_ids"])
