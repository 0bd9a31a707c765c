"""`align push` and the recipe `hub:` block, end to end through the real CLI, against the loopback
fake Hub of tests/fake_hub.py (nothing in huggingface_hub is mocked).

The CLI runs in a subprocess, which imports huggingface_hub afresh: HF_ENDPOINT, HF_TOKEN,
HF_HUB_OFFLINE=0 and HF_HUB_DISABLE_XET=1 in its environment are all it needs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import run_align, write_jsonl, write_recipe  # noqa: E402
from fake_hub import FakeHub  # noqa: E402

from align.errors import AlignError  # noqa: E402

TOKEN = "hf_PuShSeCrEt0123456789abcdefXYZ"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished run, built directly: a tiny base, an `sft` LoRA adapter stage with metrics, and
    an `eval` stage with eval.json, plus the resolved recipe.yaml the run loop writes."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from align import models

    root = tmp_path_factory.mktemp("push")
    tokenizer = models.train_tokenizer([f"reverse {w} = {w[::-1]}" for w in ("abc", "fed", "cab", "bead")] * 20, 300)
    base = root / "base"
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    LlamaForCausalLM(config).save_pretrained(base)
    tokenizer.save_pretrained(base)

    run = root / "run"
    stages = {
        "sft": {"type": "sft", "model": str(base), "dataset": {"path": "data/messages.jsonl"},
                "peft": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                "learning_rate": 2e-4, "max_steps": 40, "logging_steps": 5, "save_steps": 20},
        "eval": {"type": "eval", "prompts": {"path": "data/prompts.jsonl"}, "judge": "align.task:gold_score"},
    }
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({"name": "tiny-push", "seed": 0, "output_dir": str(run),
                                                     "model": {}, "stages": stages}, sort_keys=False))
    lora = get_peft_model(LlamaForCausalLM.from_pretrained(base),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                                     init_lora_weights=False))
    lora.save_pretrained(run / "sft")
    tokenizer.save_pretrained(run / "sft")
    (run / "sft" / "metrics.json").write_text(json.dumps({"train_loss": 1.5, "train_loss_last": 0.75,
                                                          "world_size": 1, "global_step": 40}))
    (run / "sft" / "optimizer.pt").write_bytes(b"training state")
    (run / "eval").mkdir()
    (run / "eval" / "eval.json").write_text(json.dumps({"policies": {"sft": {"gold_score": 87.5, "reward": 0.25}},
                                                        "samples": []}))
    for name, kind in (("sft", "sft"), ("eval", "eval")):
        (run / name / ".align-complete.json").write_text(json.dumps({"hash": "x", "type": kind, "finished": "now"}))
    return run


@pytest.fixture
def hub():
    server = FakeHub(token=TOKEN).start()
    yield server
    server.stop()


def hub_env(hub, tmp_path, token=TOKEN) -> dict:
    return {"HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HUGGING_FACE_HUB_TOKEN": "", "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_XET": "1", "HF_TOKEN_PATH": str(tmp_path / "no-saved-token"),
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", "NO_PROXY": "127.0.0.1,localhost"}


def assert_no_token(result, hub):
    assert TOKEN not in result.stdout and TOKEN not in result.stderr
    assert all(TOKEN.encode() not in body for body in hub.bodies)


def test_push_adapter_with_card(run_dir, hub, tmp_path):
    result = run_align(["push", run_dir, "--repo-id", "tester/tiny-sft"], env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    repo = hub.repos["tester/tiny-sft"]
    assert f"pushed {run_dir / 'sft'} to tester/tiny-sft: {hub.url}/tester/tiny-sft/commit/{repo.head}" in result.stdout
    assert not repo.private
    remote = hub.files("tester/tiny-sft")
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "README.md"} <= set(remote)
    assert remote["adapter_model.safetensors"] == (run_dir / "sft" / "adapter_model.safetensors").read_bytes()
    assert not {"metrics.json", "optimizer.pt", "config.json"} & set(remote)

    card = remote["README.md"].decode()
    assert "library_name: peft" in card
    assert ("| 1 | sft | sft | data/messages.jsonl | learning_rate=0.0002, max_steps=40, r=4, lora_alpha=8, "
            "target_modules=[q_proj, v_proj] |") in card
    assert "| 2 | eval |" not in card  # only the stages up to the pushed one
    assert "| train_loss | 1.5 |" in card and "| eval/gold_score | 87.5 |" in card and "world_size" not in card
    assert f'base_model_id = "{run_dir.parent / "base"}"' in card
    assert "```yaml\n" + (run_dir / "recipe.yaml").read_text().rstrip() + "\n```" in card
    assert "local folder" in result.stderr  # the base is not on the Hub: say so
    assert_no_token(result, hub)


def test_push_merged_private(run_dir, hub, tmp_path):
    before = sorted(p.name for p in (run_dir / "sft").iterdir())
    result = run_align(["push", run_dir / "sft", "--repo-id", "tester/tiny-merged", "--merged", "--private"],
                       env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    repo = hub.repos["tester/tiny-merged"]
    assert repo.private
    remote = hub.files("tester/tiny-merged")
    assert {"model.safetensors", "config.json", "tokenizer.json", "README.md"} <= set(remote)
    assert not any(name.startswith("adapter_") for name in remote)
    card = remote["README.md"].decode()
    assert "library_name: transformers" in card and "merged into the base weights" in card
    assert "| eval/gold_score | 87.5 |" in card
    assert sorted(p.name for p in (run_dir / "sft").iterdir()) == before  # merged in a temporary folder
    assert_no_token(result, hub)


def test_push_stage_from_recipe_object(run_dir, hub, monkeypatch, tmp_path):
    """push_stage, as the run loop calls it, in-process."""
    from huggingface_hub import constants

    from align.push import PUSH_RECORD, push_stage, read_push_record
    from align.recipe import load_recipe

    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-saved-token"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    recipe = load_recipe(run_dir / "recipe.yaml")
    stage = recipe.stage("sft")
    (stage.dir / PUSH_RECORD).unlink(missing_ok=True)
    info = push_stage(recipe, stage, repo_id="tester/from-stage", private=False, merged=False)
    assert info.commit_url.startswith(f"{hub.url}/tester/from-stage/commit/")
    assert "| eval/gold_score | 87.5 |" in hub.files("tester/from-stage")["README.md"].decode()
    assert read_push_record(stage.dir) == {
        "repo_id": "tester/from-stage", "commit": hub.repos["tester/from-stage"].head, "url": info.commit_url,
        "stage_hash": stage.hash, "merged": False, "pushed": read_push_record(stage.dir)["pushed"]}
    requests = len(hub.requests)
    assert push_stage(recipe, stage, repo_id="tester/from-stage") is None  # the record says it is there
    assert len(hub.requests) == requests

    hub.fail("commit", status=403)
    with pytest.raises(AlignError) as info:
        push_stage(recipe, stage, repo_id="tester/denied", private=False, merged=False)
    message = str(info.value)
    assert message.startswith("hub: pushing stage 'sft' to tester/denied failed: HTTP 403 Forbidden")
    assert message.endswith("(the stage itself is finished; rerun to retry the push)") and "\n" not in message
    assert read_push_record(stage.dir)["repo_id"] == "tester/from-stage"  # the failed push wrote nothing


def init_recipe_pushed_to(tmp_path, repo_id: str):
    """A one-stage recipe (a tiny `init` model, run folder tmp_path/run) whose `hub:` block pushes it."""
    data = write_jsonl(tmp_path / "text.jsonl", ({"text": f"reverse {w} = {w[::-1]}"} for w in ["abc", "fed"] * 20))
    return write_recipe(tmp_path / "r.yaml", tmp_path / "run", {"init": {
        "dataset": {"path": str(data)}, "vocab_size": 300, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 1, "num_attention_heads": 2}}, hub={"repo_id": repo_id, "stages": ["init"]})


def test_recipe_hub_block_pushes_after_the_stage(tmp_path, hub):
    recipe = init_recipe_pushed_to(tmp_path, "tester/from-run")
    result = run_align(["run", recipe], env=hub_env(hub, tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    remote = hub.files("tester/from-run")
    assert {"model.safetensors", "config.json", "README.md"} <= set(remote)
    assert remote["model.safetensors"] == (tmp_path / "run" / "init" / "model.safetensors").read_bytes()
    card = remote["README.md"].decode()
    assert "| 1 | init | init |" in card and "hidden_size=32" in card and "| parameters |" in card
    assert "pushed init to tester/from-run" in result.stderr
    assert_no_token(result, hub)


def test_failed_hub_push_is_retried_on_rerun(tmp_path, hub):
    """The stage stays finished when its push fails; the push record, written only after a
    successful push, is what makes a rerun push it (without training it again)."""
    recipe = init_recipe_pushed_to(tmp_path, "tester/retry-run")
    stage = tmp_path / "run" / "init"
    hub.fail("commit", status=503)
    first = run_align(["run", recipe], env=hub_env(hub, tmp_path))
    last = first.stderr.strip().splitlines()[-1]
    assert first.returncode == 2, first.stderr[-3000:]
    assert last.startswith("error: hub: pushing stage 'init' to tester/retry-run failed: HTTP 503 Service Unavailable")
    assert last.endswith("(the stage itself is finished; rerun to retry the push)")
    assert "Traceback" not in first.stderr
    assert hub.count("commit") == 4  # 1 + 3 retries, then it gives up
    assert (stage / ".align-complete.json").is_file() and not (stage / ".align-pushed.json").exists()
    weights = (stage / "model.safetensors").stat().st_mtime_ns

    hub.clear_faults()
    second = run_align(["run", recipe], env=hub_env(hub, tmp_path))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "init       finished earlier" in second.stdout
    assert (stage / "model.safetensors").stat().st_mtime_ns == weights  # not trained again
    record = json.loads((stage / ".align-pushed.json").read_text())
    assert record["repo_id"] == "tester/retry-run" and record["commit"] == hub.repos["tester/retry-run"].head
    assert "pushed init to tester/retry-run" in second.stderr
    assert hub.files("tester/retry-run")["model.safetensors"] == (stage / "model.safetensors").read_bytes()
    assert_no_token(first, hub)
    assert_no_token(second, hub)


def test_push_errors_are_one_line(run_dir, hub, tmp_path, capsys):
    from align import cli

    # No token: a real subprocess, so no saved login or earlier import can help it.
    result = run_align(["push", run_dir, "--repo-id", "tester/x"], env=hub_env(hub, tmp_path, token=""))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith("error: ") and "no Hugging Face token" in lines[-1], \
        result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    for argv, message in [(["push", tmp_path / "missing", "--repo-id", "tester/x"], "no such folder"),
                          (["push", run_dir / "eval", "--repo-id", "tester/x"], "holds no model")]:
        with pytest.raises(SystemExit) as info:
            cli.main([str(a) for a in argv])
        err = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert hub.count("commit") == 0
