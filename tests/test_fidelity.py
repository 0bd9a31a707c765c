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
from align.models import disable_dropout
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


@pytest.mark.parametrize("reader", ["chat", "plain"])
def test_ppo_reward_equals_eval_and_trl_for_text_prompts_and_cut_answers(tmp_path, tiny_model, reader):
    """PPO's reward-model score of a response equals align eval's, and the reward model's own
    reading of what TRL trained it on: the chat template, or for a reward model without one
    plain prompt + answer + its EOS. An answer cut at response_length is scored without the
    closing end of turn / EOS, so it scores differently from the same answer finished."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    if reader == "chat":
        reward = _lora_reward_adapter(tiny_model, tmp_path / "rm")
    else:
        reward = _plain_reward_model(tiny_model, tmp_path / "rm")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": PROMPT}] * 8)
    trainer, _ = _build(tmp_path, tiny_model, {"dataset": {"path": str(prompts)}, **FAST, "reward_model": str(reward)})
    assert ("reads plain text" in " ".join(trainer.roles.description)) == (reader == "plain")

    # PPO scores a finished answer as the reward model reads what TRL's RewardTrainer tokenized.
    rm = models.load_model(str(reward), kind="seq-cls", dtype="float32").eval()
    trl_tok = AutoTokenizer.from_pretrained(str(reward))
    row = {"prompt": PROMPT, "chosen": ANSWER, "rejected": " no"}
    if reader == "chat":
        row = render.conversational(row)
    args = RewardConfig(output_dir=str(tmp_path / "trl"), use_cpu=True, bf16=False, report_to="none")
    ids = RewardTrainer(model=rm, args=args, train_dataset=Dataset.from_list([row]),
                        processing_class=trl_tok).train_dataset[0]["chosen_ids"]
    if reader == "plain":
        assert trl_tok.decode(ids).endswith("<|endoftext|>")  # the reward model's own EOS
    with torch.no_grad():
        own = rm(input_ids=torch.tensor([ids])).logits[0, 0].item()
    assert float(trainer.rewards.reward_model_scores([PROMPT], [ANSWER])[0]) == pytest.approx(own, abs=1e-5)

    # align eval scores finished and cut answers as PPO does.
    texts = [PROMPT, "reverse fed"]
    answers = [ANSWER, " I do not"]
    finished = torch.tensor([True, False])
    response = torch.zeros((2, 3), dtype=torch.long)
    ppo, _ = trainer.rewards(texts, answers, response, response.bool(), finished)
    rm_tok = models.load_tokenizer(str(reward))
    expected = evaluate.reward_scores(rm, rm_tok, texts, answers, finished=finished.tolist())
    assert torch.allclose(ppo.cpu(), torch.tensor(expected), atol=1e-5), (ppo, expected)

    # The same answer cut at the length limit is read without its ending.
    cut, _ = trainer.rewards([PROMPT], [ANSWER], response[:1], response[:1].bool(), torch.tensor([False]))
    assert abs(float(cut[0]) - own) > 1e-4
    closing = "<|endoftext|>" if reader == "plain" else "<|im_end|>"
    assert not render.reward_text(rm_tok, PROMPT, ANSWER, finished=False).endswith(closing)


def test_plain_text_reward_model_refuses_multi_turn_prompts(tiny_model, tmp_path):
    from align.errors import AlignError

    tok = models.load_tokenizer(str(_plain_reward_model(tiny_model, tmp_path / "rm")))
    two_turns = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
    assert render.reward_text(tok, [two_turns[1]], ANSWER) == PROMPT + ANSWER + "<|endoftext|>"
    with pytest.raises(AlignError, match="reward_model: its tokenizer has no chat template.* a prompt has 2 turns"):
        render.reward_text(tok, two_turns, ANSWER)


def test_a_policy_without_its_own_chat_template_is_warned_about(tmp_path, tiny_model, data_dir, capsys):
    """A base model straight into PPO never read the chat template its prompts get."""
    from transformers import AutoTokenizer

    base = tmp_path / "base"
    models.load_model(str(tiny_model)).save_pretrained(str(base))
    tok = AutoTokenizer.from_pretrained(str(tiny_model))
    tok.chat_template = None
    tok.save_pretrained(str(base))
    _build(tmp_path, base, {"dataset": {"path": str(data_dir / "prompts.jsonl")}, **FAST,
                            "reward_funcs": "tests.rewards:letter_a"})
    assert f"'{base}' has no chat template of its own" in capsys.readouterr().out


def _with_dropout(model, out, **fields):
    """A copy of `model` whose config turns dropout on."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model))
    for key, value in fields.items():
        setattr(config, key, value)
    loaded = models.load_model(str(model), dtype="float32")
    loaded.config = config
    loaded.save_pretrained(str(out))
    models.load_tokenizer(str(model)).save_pretrained(str(out))
    return out


@pytest.mark.parametrize("lora", [False, True], ids=["separate", "shared"])
def test_dropout_in_the_config_is_off_kl_zero_and_ratio_one_at_the_first_step(tmp_path, tiny_model, data_dir, lora):
    """Llama copies attention_dropout into each attention layer at construction: zeroing the
    config afterwards left it on in train mode (KL -0.02, ratio 1.016 at step 1). Policy
    equals reference before the first update, so KL is exactly 0 and the ratio 1, also under
    gradient checkpointing."""
    model = _with_dropout(tiny_model, tmp_path / "dropout", attention_dropout=0.3)
    block = {"dataset": {"path": str(data_dir / "prompts.jsonl")}, **FAST, "num_train_steps": 1, "save_steps": 0,
             "reward_funcs": "tests.rewards:letter_a", "gradient_checkpointing": True,
             **({"peft": {"r": 4, "target_modules": "all-linear", "lora_dropout": 0.2}} if lora else {})}
    trainer, stage = _build(tmp_path, model, block)
    trainer.train()
    record = json.loads((stage.dir / "log_history.jsonl").read_text().splitlines()[0])
    assert record["kl"] == 0.0, record
    assert abs(record["first_minibatch_ratio"] - 1.0) < 1e-6 and record["first_minibatch_approx_kl"] < 1e-12, record


def test_disable_dropout_reaches_the_copies_opt_keeps():
    """OPT's default config (dropout 0.1) copies the rate into every layer at construction."""
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    model = OPTForCausalLM(OPTConfig(vocab_size=64, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                     num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=32))
    assert model.config.dropout == 0.1
    disable_dropout(model)
    model.train()
    ids = torch.randint(4, 64, (2, 12))
    assert torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def _full_reward_model(base, out):
    """A full one-logit reward model (separate body) with a non-zero score head."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_pretrained(str(base), num_labels=1)
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)
    model.save_pretrained(str(out))
    models.load_tokenizer(str(base)).save_pretrained(str(out))
    return out


@pytest.mark.parametrize("reward", ["separate model", "adapter on the SFT adapter", "adapter on the base"])
def test_value_head_is_copied_only_onto_the_body_it_was_trained_on(tmp_path, tiny_model, data_dir, reward):
    """Shared layout: the critic is a LoRA adapter on the base. A reward model's score head
    reads its own body's features; copied onto another body it projects unrelated ones, so
    the value head starts at zero unless the critic starts as that very adapter."""
    from peft import LoraConfig, get_peft_model

    policy = tiny_model
    if reward == "separate model":
        rm = _full_reward_model(tiny_model, tmp_path / "rm")
    elif reward == "adapter on the base":
        rm = _lora_reward_adapter(tiny_model, tmp_path / "rm")
    else:  # an SFT LoRA adapter, and a reward adapter trained on top of it
        policy = tmp_path / "sft"
        sft = get_peft_model(models.load_model(str(tiny_model)), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        sft.save_pretrained(str(policy))
        models.load_tokenizer(str(tiny_model)).save_pretrained(str(policy))
        rm = _lora_reward_adapter(tiny_model, tmp_path / "rm")
        config = json.loads((rm / "adapter_config.json").read_text())
        (rm / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": str(policy)}))
    block = {"dataset": {"path": str(data_dir / "prompts.jsonl")}, **FAST, "reward_model": str(rm),
             "peft": {"r": 4, "target_modules": "all-linear"}}
    trainer, _ = _build(tmp_path, policy, block)
    if reward == "adapter on the SFT adapter":
        assert trainer.roles.reward_model is None and "stacked on the SFT adapter" in " ".join(trainer.roles.description)
    head = trainer.roles.actor_critic.value_head.weight
    if reward == "adapter on the base":
        assert head.abs().sum() > 0 and "value head: copied" in " ".join(trainer.roles.description)
    else:
        assert torch.equal(head, torch.zeros_like(head)), reward
        assert "value head: new, zero-initialised" in trainer.roles.description


def test_over_long_prompts_are_dropped_whole_and_scored_as_the_policy_saw_them(tmp_path, tiny_model, capsys):
    """max_prompt_length never cuts a prompt (cutting from the left lost the chat header the
    policy and the reward model read); longer ones are dropped with a count."""
    rows = [{"prompt": PROMPT}] * 6 + [{"prompt": "reverse " + "abcdef " * 20}] * 2
    prompts = write_jsonl(tmp_path / "prompts.jsonl", rows)
    tok = models.load_tokenizer(str(tiny_model))
    limit = len(render.prompt_ids(tok, PROMPT)) + 2
    block = {"dataset": {"path": str(prompts)}, **FAST, "reward_funcs": "tests.rewards:letter_a",
             "max_prompt_length": limit, "per_device_train_batch_size": 4, "num_mini_batches": 1,
             "gradient_accumulation_steps": 1}
    trainer, _ = _build(tmp_path, tiny_model, block)
    assert len(trainer.dataset) == 6 and all(render.messages(p) == render.messages(PROMPT) for p in trainer.dataset["prompt"])
    assert f"dropped 2 of 8 prompts longer than max_prompt_length={limit}" in capsys.readouterr().out
    query, mask = trainer.sampler.encode(trainer.prompts_for_step(0))
    assert query[0][mask[0].bool()].tolist() == render.prompt_ids(tok, PROMPT)
