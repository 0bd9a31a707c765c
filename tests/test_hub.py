"""align.push against a loopback fake Hub: the real huggingface_hub client speaks HTTP to
tests/fake_hub.py, nothing in huggingface_hub is mocked.

huggingface_hub copies several environment variables into ``huggingface_hub.constants`` at
import time (HF_ENDPOINT, HF_HUB_OFFLINE, HF_HUB_DISABLE_XET, HF_TOKEN_PATH).  The fixture
sets HF_ENDPOINT/HF_TOKEN in the environment *after* import (align.push resolves the endpoint at
call time, HF_TOKEN is read per request) and pins the import-time switches it depends on through
``monkeypatch.setattr(constants, ...)`` so a developer's login or an offline CI setting cannot
leak into the tests.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fake_hub import FakeHub  # noqa: E402
from tiny_stages import NOT_MODEL_FILES, card_for, models, tree_hashes  # noqa: E402,F401

from align.errors import AlignError  # noqa: E402
from align.push import HubPushError, push_folder, select_model_files  # noqa: E402

TOKEN = "hf_SeCrEtToKeN0123456789abcdefXYZ"


def _serve(monkeypatch, tmp_path, **options):
    """A started FakeHub; HF_ENDPOINT/HF_TOKEN point at it (set after huggingface_hub's import)."""
    from huggingface_hub import constants

    server = FakeHub(token=TOKEN, **options).start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    # Import-time copies of env vars: no saved login, not offline, no Xet (this server speaks LFS).
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    return server


@pytest.fixture
def hub(monkeypatch, tmp_path):
    server = _serve(monkeypatch, tmp_path)
    yield server
    server.stop()


@pytest.fixture
def lfs_hub(monkeypatch, tmp_path):
    """Files of 10 kB or more go through the LFS batch API ("basic" transfer)."""
    server = _serve(monkeypatch, tmp_path, lfs_threshold=10_000)
    yield server
    server.stop()


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


# --------------------------------------------------------------------------- push


def test_push_adapter_exact_bytes(models, hub):
    from huggingface_hub import constants

    stage = models["adapter"]
    before = tree_hashes(stage)
    card = card_for(stage)
    assert constants.ENDPOINT != hub.url  # HF_ENDPOINT was set after import: align.push resolves it itself
    info = push_folder(stage, repo_id="tester/tiny-adapter", private=True, card_text=card)

    repo = hub.repos["tester/tiny-adapter"]
    assert repo.private
    assert info.commit_url == f"{hub.url}/tester/tiny-adapter/commit/{repo.head}"
    assert info.oid == repo.head and info.repo_url.repo_id == "tester/tiny-adapter"
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
    assert first.commit_url == second.commit_url and first.oid == second.oid
    assert hub.count("commit") == 1 and len(hub.repos["tester/again"].commits) == 1


def test_plain_repo_name_goes_to_token_owner(models, hub):
    info = push_folder(models["full"], repo_id="bare-name")
    assert hub.count("whoami") == 0  # create_repo's answer names the namespace
    assert info.repo_url.repo_id == "tester/bare-name"
    assert "model.safetensors" in hub.files("tester/bare-name")


@pytest.mark.parametrize("fault", ["status", "drop"])
def test_transient_failures_are_retried(models, hub, caplog, fault):
    stage = models["adapter"]
    if fault == "status":
        hub.fail("commit", status=503, times=2)
    else:
        hub.drop("commit", times=2)
    caplog.set_level(logging.INFO, logger="align.push")
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


# --------------------------------------------------------------------------- retry bounds (issue 12)


def test_cut_upload_is_not_retried_on_top_of_huggingface_hub(models, lfs_hub):
    """A cut LFS upload was tried 48 times over 114 s: align retried the whole push around
    huggingface_hub's own per-request retries. Now the upload is huggingface_hub's alone."""
    lfs_hub.drop("lfs_upload")  # every upload connection is cut
    start = time.monotonic()
    with pytest.raises(HubPushError) as info:
        push_folder(models["full"], repo_id="tester/cut", retries=3, backoff_s=0.01)
    elapsed = time.monotonic() - start
    assert 1 <= lfs_hub.count("lfs_upload") <= 6  # one huggingface_hub upload call: 1 try + its 5 retries
    assert lfs_hub.count("create") == lfs_hub.count("preupload") == lfs_hub.count("lfs_batch") == 1
    assert lfs_hub.count("commit") == 0
    assert elapsed < 40  # huggingface_hub's own backoff (1+2+4+8+8 s), nothing on top
    message = str(info.value)
    assert "\n" not in message and "tester/cut" in message and "connection to" in message
    assert info.value.attempts == 1


def test_commit_retry_does_not_upload_again(models, lfs_hub):
    lfs_hub.fail("commit", status=503, times=1)
    info = push_folder(models["full"], repo_id="tester/recommit", backoff_s=0.01)
    assert info.oid == lfs_hub.repos["tester/recommit"].head
    assert lfs_hub.count("commit") == 2
    assert lfs_hub.count("lfs_upload") == 1 and lfs_hub.count("preupload") == 1


def test_retries_are_one_budget_for_the_whole_push(models, hub):
    hub.fail("create", status=503, times=2)
    hub.fail("commit", status=503, times=5)
    with pytest.raises(HubPushError) as info:
        push_folder(models["full"], repo_id="tester/budget", retries=3, backoff_s=0.01)
    # 3 retries in all: two spent creating the repo, one left for the commit.
    assert hub.count("create") == 3 and hub.count("commit") == 2
    assert info.value.attempts == 2 and info.value.status == 503

