"""Fidelity on users' own models and data: one rendering of every example (align/render.py).

The same example gives the same text and token ids wherever it is read: SFT and reward
training (as TRL tokenizes them), PPO (prompt and scoring), RLOO, eval, chat and generate.
PPO's reward for a response equals align eval's and TRL's, for chat and plain-text reward
models, finished and cut answers. Dropout is really off; the critic's value head is only
copied onto the body it was trained on; over-long prompts are dropped, never cut."""

import json

import pytest
import torch

from align import chat, evaluate, infer, models, render
from align.ppo.layouts import disable_dropout
from conftest import write_jsonl
from test_ppo import FAST, _build, _lora_reward_adapter

PROMPT, ANSWER = "reverse abc", " cba"


def _context(tmp_path, model, stages):
    from accelerate import PartialState

    from align.recipe import build_recipe
    from align.run import Context

    recipe = build_recipe({"name": "t", "seed": 0, "output_dir": str(tmp_path / "run"), "model": str(model),
                           "stages": stages})
    return recipe, Context(recipe, PartialState())


def _trl_trainer(tmp_path, model, stage_type, rows, trainer_cls, **kw):
    """A TRL stage trainer built by align (align.training.build_trainer) on `rows`."""
    from align.training import build_trainer

    path = write_jsonl(tmp_path / f"{stage_type}.jsonl", rows)
    recipe, ctx = _context(tmp_path, model, {stage_type: {"dataset": {"path": str(path)}, "max_steps": 1,
                                                          "per_device_train_batch_size": 2}})
    return build_trainer(recipe.stages[0], ctx, trainer_cls, **kw)


def _plain_reward_model(base, out):
    """A full one-logit reward model whose tokenizer has no chat template and ends text with
    its own EOS: a model TRL trained on plain text (prompt + answer + EOS)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(2)
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(base))
    tok.chat_template, tok.eos_token = None, "<|endoftext|>"
    tok.save_pretrained(str(out))
    return out


def _chat_ids(tok, conversation, **kw) -> list[int]:
    """Token ids of a conversation as TRL tokenizes it (apply_chat_template, tokenize=True)."""
    return tok.apply_chat_template(conversation, tokenize=True, return_dict=True, **kw)["input_ids"]


def _first_forward_ids(model, run) -> list[int]:
    """The input ids of `model`'s first forward pass while `run()` runs."""
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"][0].tolist()),
                                           with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return seen[0]


def test_one_rendering_of_a_text_example_in_every_stage(tmp_path, tiny_model, capsys):
    """A string prompt/answer pair: SFT as TRL tokenizes it, reward training, PPO's prompt and
    its scoring, RLOO, eval, generate and chat all read the same chat-template ids."""
    from trl import RewardTrainer, SFTTrainer
    from trl.data_utils import apply_chat_template

    tok = models.load_tokenizer(str(tiny_model))
    head = render.prompt_ids(tok, PROMPT)
    whole = _chat_ids(tok, [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": ANSWER}])
    assert whole[:len(head)] == head and tok.decode(head).startswith("<|im_start|>user")

    # SFT on prompt/completion strings: TRL's ids, the loss on the answer only.
    sft = _trl_trainer(tmp_path / "sft", tiny_model, "sft", [{"prompt": PROMPT, "completion": ANSWER}] * 2, SFTTrainer)
    row = sft.train_dataset[0]
    assert row["input_ids"] == whole
    assert row["labels"] == [-100] * len(head) + whole[len(head):]
    assert "read as user and assistant turns" in capsys.readouterr().out

    # Reward training on prompt/chosen/rejected strings.
    rm_trainer = _trl_trainer(tmp_path / "rm", tiny_model, "reward",
                              [{"prompt": PROMPT, "chosen": ANSWER, "rejected": " no"}] * 2, RewardTrainer,
                              kind="seq-cls")
    assert rm_trainer.train_dataset[0]["chosen_ids"] == whole

    # PPO on string prompts: the policy's prompt, and the ids its reward model scores.
    reward = _lora_reward_adapter(tiny_model, tmp_path / "lora_rm")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": PROMPT}] * 8)
    trainer, _ = _build(tmp_path / "ppo", tiny_model, {"dataset": {"path": str(prompts)}, **FAST,
                                                       "reward_model": str(reward)})
    query, _ = trainer.sampler.encode([PROMPT])
    assert query[0].tolist() == head
    scored, real = [], trainer.roles.reward_scores
    trainer.roles.reward_scores = lambda ids, am: scored.append(ids[0][am[0].bool()].tolist()) or real(ids, am)
    ppo_score = trainer.rewards.reward_model_scores([PROMPT], [ANSWER])
    assert scored == [whole]

    # RLOO and GRPO (TRL) get the prompts as turns, so TRL's own rendering gives the same ids and text.
    from align.training import load_datasets

    recipe, ctx = _context(tmp_path / "rloo", tiny_model, {"rloo": {
        "dataset": {"path": str(prompts)}, "reward_funcs": "tests.rewards:letter_a"}})
    rloo_prompt = load_datasets(recipe.stages[0], ctx)[0][0]["prompt"]
    assert _chat_ids(tok, rloo_prompt, add_generation_prompt=True) == head
    trl_text = apply_chat_template({"messages": rloo_prompt + [{"role": "assistant", "content": ANSWER}]}, tok)["text"]
    assert trl_text == render.reward_text(tok, PROMPT, ANSWER)

    # align eval scores the same ids, to the same value.
    rm = models.load_model(str(reward), kind="seq-cls", dtype="float32").eval()
    rm_tok = models.load_tokenizer(str(reward))
    values = []
    assert _first_forward_ids(rm, lambda: values.extend(evaluate.reward_scores(rm, rm_tok, [PROMPT], [ANSWER]))) == whole
    assert values[0] == pytest.approx(float(ppo_score[0]), abs=1e-5)

    # generate and chat continue the same prompt ids.
    policy, policy_tok = infer.load(str(tiny_model))
    _, ids = infer.generate(policy, policy_tok, [PROMPT], max_new_tokens=2, return_ids=True)
    assert ids[0][0] == head
    history = [{"role": "user", "content": PROMPT}]
    assert _first_forward_ids(policy, lambda: chat.chat_reply(policy, policy_tok, history, max_new_tokens=2,
                                                              out=open("/dev/null", "w"))) == head
