"""Broken inputs: each gives a non-zero exit and one line naming the field or file (and line),
no traceback, and nothing marked complete."""

import json
from pathlib import Path

import pytest
import yaml

from align.cli import main
from conftest import run_align

GOOD_ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _files(d: Path) -> dict:
    d.mkdir(parents=True, exist_ok=True)
    (d / "good.jsonl").write_text(json.dumps(GOOD_ROW) + "\n")
    (d / "empty.jsonl").write_text("")
    (d / "bad.jsonl").write_text(json.dumps(GOOD_ROW) + "\n" + json.dumps(GOOD_ROW) + "\n{oops\n")
    (d / "nocol.jsonl").write_text(json.dumps({"question": "a", "answer": "b"}) + "\n")
    (d / "alpaca.jsonl").write_text(json.dumps({"instruction": "a", "input": "", "output": "b"}) + "\n")
    (d / "wrongtype.jsonl").write_text(json.dumps({"messages": 5}) + "\n")
    (d / "corrupt.parquet").write_bytes(b"this is not parquet")
    (d / "a_file").write_text("x")
    return {k: str(d / k) for k in ("good.jsonl", "empty.jsonl", "bad.jsonl", "nocol.jsonl", "alpaca.jsonl",
                                     "wrongtype.jsonl", "corrupt.parquet", "a_file")}


def _recipe(f, out, **changes):
    sft = {"model": "/nonexistent-model-is-not-loaded-before-errors", "dataset": {"path": f["good.jsonl"]},
           "max_steps": 1}
    sft.update(changes.pop("sft", {}))
    recipe = {"name": "broken", "output_dir": str(out), "stages": {"sft": sft}}
    recipe.update(changes)
    return recipe


# (id, recipe changes or raw text, extra CLI args, substrings the one-line message must contain)
CASES = [
    ("top-level typo", {"outptu_dir": "x"}, [], ["outptu_dir", "did you mean 'output_dir'"]),
    ("stage field typo", {"sft": {"learning_rat": 1e-4}}, [], ["stages.sft.learning_rat", "'learning_rate'"]),
    ("unknown stage type", {"sft": {"type": "sftt"}}, [], ["stages.sft.type", "'sft'"]),
    ("missing file", {"sft": {"dataset": {"path": "data/missing.jsonl"}}}, [], ["missing.jsonl", "does not exist"]),
    ("unreadable file", {"sft": {"dataset": {"path": "@corrupt.parquet"}}}, [], ["corrupt.parquet", "not a parquet file"]),
    ("empty dataset", {"sft": {"dataset": {"path": "@empty.jsonl"}}}, [], ["empty.jsonl", "no rows"]),
    ("malformed jsonl", {"sft": {"dataset": {"path": "@bad.jsonl"}}}, [], ["bad.jsonl", "line 3"]),
    ("missing column", {"sft": {"dataset": {"path": "@nocol.jsonl"}}}, [], ["stages.sft.dataset", "missing column", "question"]),
    # an Alpaca file is recognised without `format:`; the next problem is the model path
    ("community layout, missing model", {"sft": {"dataset": {"path": "@alpaca.jsonl"}}}, [],
     ["stages.sft.model", "/nonexistent-model-is-not-loaded-before-errors", "does not exist"]),
    ("wrong column type", {"sft": {"dataset": {"path": "@wrongtype.jsonl"}}}, [], ["'messages'", "int"]),
    ("4-bit full fine-tune", {"sft": {"quantization": {"load_in_4bit": True}}}, [], ["stages.sft.quantization", "peft"]),
    ("non-positive lr", {"sft": {"learning_rate": 0}}, [], ["stages.sft.learning_rate", "positive"]),
    ("unknown stage ref", {"sft": {"model": "${sftt}"}}, [], ["${sftt}", "not a stage"]),
    ("unwritable output_dir", {"output_dir": "@a_file/out"}, [], ["output_dir", "cannot write"]),
    ("wrong field type", {"sft": {"max_steps": "ten"}}, [], ["stages.sft.max_steps", "expected int"]),
    ("peft typo", {"sft": {"peft": {"r": 8, "lora_alpah": 16}}}, [], ["stages.sft.peft.lora_alpah", "'lora_alpha'"]),
    ("quantization typo", {"sft": {"peft": {"r": 8}, "quantization": {"load_in_4bits": True}}}, [],
     ["stages.sft.quantization.load_in_4bits", "'load_in_4bit'"]),
    ("unknown format", {"sft": {"dataset": {"path": "@good.jsonl", "format": "alpacca"}}}, [], ["format", "alpacca"]),
    ("column map of absent column", {"sft": {"dataset": {"path": "@good.jsonl", "columns": {"q": "prompt"}}}}, [],
     ["columns", "'q'"]),
    ("no dataset", {"sft": {"dataset": None}}, [], ["stages.sft.dataset", "required"]),
    ("bad override", {}, ["--set", "stages.sft.max_steps"], ["--set", "KEY=VALUE"]),
    ("unknown --stage", {}, ["--stage", "dpo"], ["--stage dpo", "no such stage"]),
    ("invalid yaml", "stages: [unclosed\n", [], ["invalid YAML", "line"]),
]


def _materialise(value, files):
    if isinstance(value, dict):
        return {k: _materialise(v, files) for k, v in value.items()}
    if isinstance(value, str) and value.startswith("@"):
        name, _, rest = value[1:].partition("/")
        return files[name] + (f"/{rest}" if rest else "")
    return value


@pytest.mark.parametrize("case_id,changes,args,expected", CASES, ids=[c[0] for c in CASES])
def test_broken_input(tmp_path, capsys, case_id, changes, args, expected):
    files = _files(tmp_path / "data")
    out = tmp_path / "run"
    path = tmp_path / "recipe.yaml"
    if isinstance(changes, str):
        path.write_text(changes)
    else:
        recipe = _recipe(files, out, **_materialise(changes, files))
        recipe["stages"]["sft"] = {k: v for k, v in recipe["stages"]["sft"].items() if v is not None}
        path.write_text(yaml.safe_dump(recipe))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(path), *args])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code not in (0, None)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    assert not list(tmp_path.rglob(".align-complete.json"))


def test_error_has_no_traceback_in_a_real_process(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "stages": {"sft": {
        "dataset": {"path": str(tmp_path / "nope.jsonl")}, "learnig_rate": 1}}}))
    result = run_align(["run", path])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == \
        "error: stages.sft.learnig_rate: unknown SFTConfig field; did you mean 'learning_rate'?"


def test_error_on_a_non_main_process_names_the_process(tmp_path, capsys, monkeypatch):
    """Under `accelerate launch` an error raised only on process N would otherwise look like
    the main process's: it is printed as `error (process N): ...`."""
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "stages": {"sft": {"learnig_rate": 1}}}))
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_info:
        main(["run", str(path)])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error (process 1): stages.sft.learnig_rate")
