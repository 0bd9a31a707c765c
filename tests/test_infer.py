"""`align chat`, `align generate` and `align merge` on a tiny LoRA (and QLoRA) SFT run.

One short training run feeds every test: chat is driven through stdin in a real subprocess; the
other commands go through `align.cli.main` in-process (the same code path, without paying for a
fresh interpreter each time)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import torch

from align import chat, cli, infer, models
from conftest import REPO, run_align, write_jsonl, write_recipe

QUANT = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model, data_dir):
    """A run with two finished adapter stages: `qlora` (a few QLoRA steps) then `sft` (LoRA)."""
    out = tmp_path_factory.mktemp("infer")
    sft = {"model": str(tiny_model), "dataset": {"path": str(data_dir / "messages.jsonl")}, "learning_rate": 1e-2,
           "max_steps": 40, "per_device_train_batch_size": 16, "logging_steps": 10, "save_strategy": "no",
           "lr_scheduler_type": "constant", "peft": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"}}
    stages = {"qlora": {"type": "sft", **sft, "max_steps": 4, "quantization": QUANT}, "sft": sft}
    run_align(["run", write_recipe(out / "r.yaml", out / "run", stages)], check=True)
    return out / "run"


def cli_main(capsys, *argv):
    """Run the CLI in-process: (exit code, stdout, stderr)."""
    try:
        cli.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_chat_through_stdin(run_dir):
    result = subprocess.run([sys.executable, "-m", "align", "chat", str(run_dir), "--temperature", "0",
                             "--max-new-tokens", "24"], input="reverse abc\n/reset\nreverse fed\n/quit\nreverse x\n",
                            capture_output=True, text=True, cwd=REPO, timeout=300,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
                                 "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"chatting with {run_dir / 'sft'}" in result.stderr  # a run folder means its last policy stage
    replies = [line for line in result.stdout.splitlines() if line.startswith("assistant> ")]
    assert len(replies) == 2, result.stdout  # /quit stopped before the third prompt
    assert "(history cleared)" in result.stdout
    assert "<|im_end|>" not in result.stdout and "<|im_start|>" not in result.stdout


def test_chat_keeps_history_resets_and_stops_at_end_of_turn(run_dir, monkeypatch):
    model, tokenizer = infer.load(str(run_dir))
    seen, real = [], chat.chat_reply

    def spy(model, tokenizer, history, **kw):
        seen.append([m["role"] for m in history])
        return real(model, tokenizer, history, **kw)

    monkeypatch.setattr(chat, "chat_reply", spy)
    out = io.StringIO()
    replies = chat.chat_loop(model, tokenizer, stdin=io.StringIO("reverse ab\nreverse cd\n/reset\nreverse ef\n"),
                              out=out, max_new_tokens=8)
    assert replies == 3
    assert seen == [["user"], ["user", "assistant", "user"], ["user"]]

    # Force the end-of-turn token at the third step: generation must stop there.
    steps = []

    def force_eos(module, inputs, logits):
        steps.append(1)  # the trained model may stop on its own: hold it off until step 3
        logits[..., tokenizer.eos_token_id] = 1e4 if len(steps) == 3 else -1e4
        return logits

    handle = model.get_output_embeddings().register_forward_hook(force_eos)
    try:
        text = real(model, tokenizer, [{"role": "user", "content": "reverse abc"}], out=io.StringIO(), max_new_tokens=40)
    finally:
        handle.remove()
    assert len(steps) == 3, "generation went on after the end-of-turn token"
    assert "<|im_end|>" not in text


def test_generate_writes_one_row_per_prompt(run_dir, data_dir, tmp_path, capsys):
    prompts = write_jsonl(tmp_path / "p.jsonl", ({"prompt": f"reverse {w}"} for w in ("ab", "cde", "fa", "bd", "ce")))
    out = tmp_path / "out" / "gen.jsonl"
    code, stdout, stderr = cli_main(capsys, "generate", run_dir / "sft", "--prompts", prompts, "--out", out,
                                    "--temperature", "0", "--max-new-tokens", "12", "--batch-size", "2")
    assert code == 0, stderr
    assert stdout.strip().splitlines()[-1] == str(out)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["reverse ab", "reverse cde", "reverse fa", "reverse bd", "reverse ce"]
    assert all(set(r) == {"prompt", "completion"} and isinstance(r["completion"], str) for r in rows)
    assert sorted(p.name for p in out.parent.iterdir()) == ["gen.jsonl"]  # no temporary file left behind

    # Conversational prompts and sampling with a seed: same seed, same completions.
    conv = tmp_path / "conv.jsonl"
    write_jsonl(conv, (json.loads(line) for line in (data_dir / "prompts.jsonl").read_text().splitlines()[:3]))
    outs = []
    for name in ("a", "b"):
        code, _, stderr = cli_main(capsys, "generate", run_dir / "sft", "--prompts", conv, "--out", tmp_path / name,
                                   "--temperature", "1.0", "--top-k", "20", "--top-p", "0.9", "--seed", "7",
                                   "--max-new-tokens", "8")
        assert code == 0, stderr
        outs.append([json.loads(line) for line in (tmp_path / name).read_text().splitlines()])
    assert outs[0] == outs[1] and len(outs[0]) == 3
    assert outs[0][0]["prompt"][0]["role"] == "user"


def test_load_in_4bit(run_dir, tmp_path, capsys):
    from bitsandbytes.nn import Linear4bit

    before = sorted(p.name for p in (run_dir / "sft").iterdir())
    model, tokenizer = infer.load(str(run_dir / "sft"), load_in_4bit=True)
    assert sum(isinstance(m, Linear4bit) for m in model.modules()) >= 7 * 2  # every linear of 2 layers
    assert infer.generate(model, tokenizer, ["reverse abc"], max_new_tokens=6)[0] is not None
    assert sorted(p.name for p in (run_dir / "sft").iterdir()) == before  # nothing written next to the adapter

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "reverse abc"}, {"prompt": "reverse fed"}])
    code, _, stderr = cli_main(capsys, "generate", run_dir, "--prompts", prompts, "--out", tmp_path / "g.jsonl",
                               "--load-in-4bit", "--temperature", "0", "--max-new-tokens", "6")
    assert code == 0, stderr
    assert len((tmp_path / "g.jsonl").read_text().splitlines()) == 2


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("stage", ["sft", "qlora"])
def test_merge_matches_adapter(run_dir, tmp_path, capsys, stage):
    from peft import PeftModel

    adapter = run_dir / stage
    out = tmp_path / "merged"
    # The run folder resolves to its last policy stage, sft.
    code, stdout, stderr = cli_main(capsys, "merge", run_dir if stage == "sft" else adapter, "--out", out)
    assert code == 0, stderr
    assert stdout.strip() == str(out)
    files = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= files
    assert "adapter_config.json" not in files and not any(p.name.endswith(".bin") for p in out.iterdir())
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not list(tmp_path.glob(".merged.*"))

    # The adapter as trained: on the fp32 base for LoRA; on the nf4 base for QLoRA, whose merge goes
    # into the dequantized nf4 weights (the weights the adapter was trained against).
    base_path = models.adapter_base(adapter)
    merged = models.load_model(str(out), dtype="float32").eval()
    ids = torch.randint(4, len(models.load_tokenizer(str(out))), (2, 12), generator=torch.Generator().manual_seed(0))
    got = _logits(merged, ids)
    if stage == "sft":
        reference = PeftModel.from_pretrained(models.load_model(base_path, dtype="float32"), str(adapter)).eval()
        expected = _logits(reference, ids)
        torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
        plain = models.load_model(base_path, dtype="float32").eval()
        assert (_logits(plain, ids) - expected).abs().max() > 1e-2  # the adapter really changed the model
        return
    dequantized = models.load_model(base_path, dtype="float32", quantization=QUANT).dequantize(dtype=torch.float32)
    exact = _logits(PeftModel.from_pretrained(dequantized, str(adapter)).eval(), ids)
    torch.testing.assert_close(got, exact, atol=1e-4, rtol=1e-4)
    # Against the nf4 model itself: bitsandbytes' CPU kernel computes in bf16, so only bf16-level
    # agreement is possible there, but far closer than a merge into the original fp32 weights.
    as_trained = _logits(PeftModel.from_pretrained(models.load_model(base_path, dtype="float32", quantization=QUANT),
                                                   str(adapter)).eval(), ids)
    naive = _logits(PeftModel.from_pretrained(models.load_model(base_path, dtype="float32"), str(adapter))
                    .merge_and_unload().eval(), ids)
    err, naive_err = (got - as_trained).abs().max().item(), (naive - as_trained).abs().max().item()
    assert err < 2e-2 and err < naive_err / 3, (err, naive_err)


def test_errors_are_one_line(tmp_path, tiny_model, run_dir, capsys):
    cases = [
        (["chat", tmp_path / "missing"], "no such folder"),
        (["generate", tmp_path / "missing", "--prompts", tmp_path / "p.jsonl"], "does not exist"),
        (["merge", tmp_path / "missing", "--out", tmp_path / "m"], "no such folder"),
        (["merge", tiny_model, "--out", tmp_path / "m"], "not a LoRA adapter"),
        (["chat", run_dir, "--top-p", "0"], "--top-p"),
    ]
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    cases.append((["merge", run_dir / "sft", "--out", tmp_path / "busy"], "not empty"))
    for argv, message in cases:
        code, _, stderr = cli_main(capsys, *argv)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (argv, stderr)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
