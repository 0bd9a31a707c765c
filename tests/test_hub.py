"""align.hub against a loopback fake Hub: the real huggingface_hub client speaks HTTP to
tests/fake_hub.py, nothing in huggingface_hub is mocked.

huggingface_hub copies several environment variables into ``huggingface_hub.constants`` at
import time (HF_ENDPOINT, HF_HUB_OFFLINE, HF_HUB_DISABLE_XET, HF_TOKEN_PATH).  The fixture
sets HF_ENDPOINT/HF_TOKEN in the environment *after* import (align.hub resolves the endpoint at
call time, HF_TOKEN is read per request) and pins the import-time switches it depends on through
``monkeypatch.setattr(constants, ...)`` so a developer's login or an offline CI setting cannot
leak into the tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_hub import FakeHub  # noqa: E402

from align.errors import AlignError  # noqa: E402
from align.hub import HubPushError, build_model_card, push_folder, select_model_files  # noqa: E402

TOKEN = "hf_SeCrEtToKeN0123456789abcdefXYZ"
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


# --------------------------------------------------------------------------- helpers


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


@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A started FakeHub; HF_ENDPOINT/HF_TOKEN point at it (set after huggingface_hub's import)."""
    from huggingface_hub import constants

    server = FakeHub(token=TOKEN).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    # Import-time copies of env vars: no saved login, not offline, no Xet.
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    yield server
    server.stop()


def card_for(stage: Path, *, repo_id: str = "tester/tiny", base_model: str | None = "org/tiny-base",
             stages=STAGES, merged: bool = False) -> str:
    return build_model_card(stage, repo_id=repo_id, base_model=base_model, stage_summaries=stages,
                            metrics=None, recipe_text=(stage.parent / "recipe.yaml").read_text(), merged=merged)


# --------------------------------------------------------------------------- file selection


@pytest.mark.parametrize("kind", ["adapter", "full", "reward_adapter", "reward_full"])
def test_selects_model_files_only(models, kind):
    stage = models[kind]
    selected = {p.name for p in select_model_files(stage)}
    top_level = {p.name for p in stage.iterdir() if p.is_file()}
    assert selected == top_level - NOT_MODEL_FILES
    assert not selected & NOT_MODEL_FILES
    weights = "adapter_model.safetensors" if "adapter" in kind else "model.safetensors"
    config = "adapter_config.json" if "adapter" in kind else "config.json"
    assert {weights, config, "tokenizer.json", "tokenizer_config.json"} <= selected


# --------------------------------------------------------------------------- model card


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


# --------------------------------------------------------------------------- push


def test_push_adapter_exact_bytes(models, hub):
    from huggingface_hub import constants

    stage = models["adapter"]
    before = tree_hashes(stage)
    card = card_for(stage)
    assert constants.ENDPOINT != hub.url  # HF_ENDPOINT was set after import: align.hub resolves it itself
    url = push_folder(stage, repo_id="tester/tiny-adapter", private=True, card_text=card)

    repo = hub.repos["tester/tiny-adapter"]
    assert repo.private
    assert url == f"{hub.url}/tester/tiny-adapter/commit/{repo.head}"
    remote = hub.files("tester/tiny-adapter")
    # peft's save_pretrained leaves a boilerplate README.md: card_text replaces it on the Hub.
    expected = {p.name: p.read_bytes() for p in select_model_files(stage) if p.name != "README.md"}
    assert (stage / "README.md").is_file()
    assert set(remote) == set(expected) | {"README.md"}
    for name, data in expected.items():
        assert remote[name] == data, name
    assert remote["README.md"].decode() == card
    assert not any(n.startswith("checkpoints") or n in NOT_MODEL_FILES for n in remote)
    assert hub.validated_cards == [card]  # the card went through the README validation endpoint
    assert tree_hashes(stage) == before  # local files untouched, no README written


def test_push_full_model_lfs_path(models, monkeypatch, tmp_path):
    """Big files through the LFS batch API ("basic" transfer), small ones inline."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # this server speaks LFS, not Xet
    stage = models["full"]
    before = tree_hashes(stage)
    with FakeHub(token=TOKEN, lfs_threshold=10_000) as server:
        push_folder(stage, repo_id="tester/tiny-full", token=TOKEN, endpoint=server.url,
                    card_text=card_for(stage, merged=True))
        remote = server.files("tester/tiny-full")
        assert server.repos["tester/tiny-full"].lfs_paths == {"model.safetensors"}
        assert server.count("lfs_upload") == 1 and server.count("lfs_verify") == 1
    for p in select_model_files(stage):
        assert remote[p.name] == p.read_bytes(), p.name
    assert tree_hashes(stage) == before


def test_repush_unchanged_is_a_noop(models, hub):
    stage = models["adapter"]
    card = card_for(stage)
    first = push_folder(stage, repo_id="tester/again", card_text=card)
    second = push_folder(stage, repo_id="tester/again", card_text=card)
    assert first == second
    assert hub.count("commit") == 1 and len(hub.repos["tester/again"].commits) == 1


def test_plain_repo_name_goes_to_token_owner(models, hub):
    push_folder(models["full"], repo_id="bare-name")
    assert hub.count("whoami") == 1
    assert "model.safetensors" in hub.files("tester/bare-name")


@pytest.mark.parametrize("fault", ["status", "drop"])
def test_transient_failures_are_retried(models, hub, caplog, fault):
    stage = models["adapter"]
    if fault == "status":
        hub.fail("commit", status=503, times=2)
    else:
        hub.drop("commit", times=2)
    caplog.set_level(logging.INFO, logger="align.hub")
    push_folder(stage, repo_id="tester/flaky", retries=3, backoff_s=0.01)
    assert hub.count("commit") == 3
    assert "adapter_model.safetensors" in hub.files("tester/flaky")
    retries = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(retries) == 2 and all("tester/flaky" in r.getMessage() for r in retries)


@pytest.mark.parametrize("fault", ["status", "drop"])
def test_persistent_failure_raises_one_clear_error(models, hub, fault):
    stage = models["adapter"]
    before = tree_hashes(stage)
    if fault == "status":
        hub.fail("commit", status=500)
    else:
        hub.drop("commit")
    with pytest.raises(HubPushError) as info:
        push_folder(stage, repo_id="tester/broken", retries=2, backoff_s=0.01, card_text=card_for(stage))
    err = info.value
    message = str(err)
    assert isinstance(err, AlignError)
    assert "tester/broken" in message and "after 3 attempts" in message
    assert "\n" not in message
    if fault == "status":
        assert "HTTP 500" in message and err.status == 500
    else:
        assert "disconnected" in message.lower() and err.status is None
    assert err.__cause__ is None and err.__suppress_context__  # no chained traceback
    assert hub.count("commit") == 3
    assert hub.files("tester/broken") == {}
    assert tree_hashes(stage) == before


def test_client_errors_are_not_retried(models, hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_wrong_token_000000000000000000")
    with pytest.raises(HubPushError, match=r"tester/denied.*HTTP 401") as info:
        push_folder(models["full"], repo_id="tester/denied", backoff_s=0.01)
    assert info.value.attempts == 1
    assert hub.count("create") == 1 and hub.count("commit") == 0
    assert "hf_wrong_token" not in str(info.value)


def test_missing_token_is_reported(models, hub, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubPushError, match="no Hugging Face token"):
        push_folder(models["full"], repo_id="tester/anon")
    assert hub.requests == []


def test_token_never_leaks(models, hub, caplog, capfd):
    """token=None: huggingface_hub picks HF_TOKEN up; it travels only in the Authorization header."""
    stage = models["adapter"]
    caplog.set_level(logging.DEBUG)
    card = card_for(stage)
    push_folder(stage, repo_id="tester/secret-ok", card_text=card)
    hub.fail("commit", status=500, echo_auth=True)  # the server error text carries the token
    with pytest.raises(HubPushError) as info:
        push_folder(stage, repo_id="tester/secret-fail", retries=1, backoff_s=0.01, card_text=card)

    secret = TOKEN.encode()
    assert TOKEN not in card
    assert all(secret not in data for data in hub.files("tester/secret-ok").values())
    assert all(secret not in body for body in hub.bodies)
    assert all(TOKEN not in path for _, _, path in hub.requests)
    assert all(secret not in (stage / name).read_bytes() for name in tree_hashes(stage))
    assert "Authorization: Bearer ***" in str(info.value)  # redacted, not dropped
    assert TOKEN not in str(info.value) and TOKEN not in repr(info.value)
    assert TOKEN not in caplog.text
    out, err = capfd.readouterr()
    assert TOKEN not in out and TOKEN not in err


def test_refuses_files_that_contain_the_token(models, hub, tmp_path):
    import shutil

    stage = tmp_path / "leaky"
    shutil.copytree(models["full"], stage)
    cfg = json.loads((stage / "tokenizer_config.json").read_text())
    cfg["token"] = TOKEN
    (stage / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(HubPushError, match=r"tokenizer_config\.json") as info:
        push_folder(stage, repo_id="tester/leaky")
    assert TOKEN not in str(info.value)
    with pytest.raises(HubPushError, match="model card"):
        push_folder(models["full"], repo_id="tester/leaky", card_text=f"---\n---\ntoken: {TOKEN}\n")
    assert hub.requests == []  # refused before anything was sent
