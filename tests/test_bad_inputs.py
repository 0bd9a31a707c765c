"""Bad inputs across recipe, data, models, the command line and multi-process runs: each gives
exit status 2 and one line `error: ...` naming the field, file or row, no traceback, and, where
nothing should change, leaves the case folder (run folder included) byte-identical.

Each case is (id, files to write, argv, expected substrings, changes). In files and argv, `@D` is
the case folder, `@MODEL` a tiny causal LM, `@RM` a tiny reward model (a sequence classifier).
Most cases fail at recipe load or in the pre-flight checks, so the table runs in-process; those
that must fail mid-stage (`changes=True`) assert only that nothing was marked complete."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from align.cli import main
from conftest import REPO, run_align

U = lambda t: {"role": "user", "content": t}  # noqa: E731
A = lambda t: {"role": "assistant", "content": t}  # noqa: E731
CHAT = {"messages": [U("hi"), A("hello")]}
PAIR = {"prompt": "p", "chosen": "a", "rejected": "b"}


def jsonl(*rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


COMMON = {  # written into every case folder
    "good.jsonl": jsonl(*[CHAT] * 4),
    "prompts.jsonl": jsonl(*[{"prompt": "say a"}] * 4),
    "prefs.jsonl": jsonl(*[PAIR] * 4),
    "run/notes.txt": "an earlier run's folder: nothing in it may change\n",
    "run/done/model.safetensors": b"\x00" * 64,
}


def recipe(stages: dict, **top) -> str:
    return yaml.safe_dump({"name": "bad", "output_dir": "@D/run", **top, "stages": stages}, sort_keys=False)


def sft(**fields) -> dict:
    return {"model": "@MODEL", "dataset": {"path": "@D/good.jsonl"}, "max_steps": 1, **fields}


def ppo(**fields) -> dict:
    return {"model": "@MODEL", "dataset": {"path": "@D/prompts.jsonl"}, "reward_funcs": "tests.rewards:letter_a",
            "num_train_steps": 1, "response_length": 4, "per_device_train_batch_size": 2, **fields}


def rloo(**fields) -> dict:
    return {"model": "@MODEL", "dataset": {"path": "@D/prompts.jsonl"}, "reward_funcs": "tests.rewards:letter_a",
            "max_steps": 1, "num_generations": 2, "per_device_train_batch_size": 2, "max_completion_length": 4, **fields}


def data_case(id, rows_or_text, expected, kind="sft", **source):
    """A recipe whose only problem is the data file `in.jsonl` (or `in.<ext>`)."""
    name = source.pop("name", "in.jsonl")
    stage = {"sft": sft, "reward": lambda **f: sft(**f), "ppo": ppo}[kind](dataset={"path": f"@D/{name}", **source})
    content = rows_or_text if isinstance(rows_or_text, (str, bytes)) else jsonl(*rows_or_text)
    return (id, {name: content, "r.yaml": recipe({kind: stage})}, ["run", "@D/r.yaml"], expected)


def run_case(id, stages, expected, extra_args=(), files=None, **top):
    return (id, {"r.yaml": recipe(stages, **top), **(files or {})}, ["run", "@D/r.yaml", *extra_args], expected)


GOOD4 = [CHAT] * 5
CASES = [
    # ------------------------------------------------------------------ recipe
    ("recipe: invalid yaml", {"r.yaml": "stages: [unclosed\n"}, ["run", "@D/r.yaml"], ["r.yaml", "line", "invalid YAML"]),
    ("recipe: not a mapping", {"r.yaml": "- a\n- b\n"}, ["run", "@D/r.yaml"], ["r.yaml", "expected a mapping"]),
    ("recipe: file missing", {}, ["run", "@D/nope.yaml"], ["nope.yaml", "cannot read"]),
    run_case("recipe: top-level typo", {"sft": sft()}, ["outptu_dir", "'output_dir'"], outptu_dir="x"),
    run_case("recipe: no stages", {}, ["stages", "at least one stage"]),
    run_case("recipe: stage not a mapping", {"sft": 3}, ["stages.sft", "expected a mapping"]),
    run_case("recipe: unknown stage type", {"sft": sft(type="sftt")}, ["stages.sft.type", "'sft'"]),
    run_case("recipe: field typo", {"sft": sft(learnig_rate=1e-4)}, ["stages.sft.learnig_rate", "'learning_rate'"]),
    run_case("recipe: wrong field type", {"sft": sft(max_steps="ten")}, ["stages.sft.max_steps", "expected int"]),
    run_case("recipe: seed not int", {"sft": sft()}, ["seed", "integer"], seed="x"),
    run_case("recipe: max_steps -5", {"sft": sft(max_steps=-5)}, ["stages.sft.max_steps", "-1", "got -5"]),
    run_case("recipe: max_steps 0", {"sft": sft(max_steps=0)}, ["stages.sft.max_steps", "got 0"]),
    run_case("recipe: max_length -1", {"sft": sft(max_length=-1)}, ["stages.sft.max_length", "positive", "got -1"]),
    run_case("recipe: reward max_length 0", {"reward": {**sft(max_length=0), "dataset": {"path": "@D/prefs.jsonl"}}},
             ["stages.reward.max_length", "got 0"]),
    run_case("recipe: rloo max_completion_length -8", {"rloo": rloo(max_completion_length=-8)},
             ["stages.rloo.max_completion_length", "got -8"]),
    run_case("recipe: learning_rate 0", {"sft": sft(learning_rate=0)}, ["stages.sft.learning_rate", "positive"]),
    run_case("recipe: batch size 0", {"sft": sft(per_device_train_batch_size=0)},
             ["stages.sft.per_device_train_batch_size", "positive"]),
    run_case("recipe: unknown stage ref", {"sft": sft(model="${sftt}")}, ["${sftt}", "not a stage"]),
    run_case("recipe: later stage ref", {"a": sft(type="sft", model="${b}"), "b": sft(type="sft")}, ["${b}", "later stage"]),
    run_case("recipe: no dataset", {"sft": {"model": "@MODEL"}}, ["stages.sft.dataset", "required"]),
    run_case("recipe: peft typo", {"sft": sft(peft={"r": 8, "lora_alpah": 16})}, ["stages.sft.peft.lora_alpah", "'lora_alpha'"]),
    run_case("recipe: peft method", {"sft": sft(peft={"method": "loraa"})}, ["stages.sft.peft.method", "'lora'"]),
    run_case("recipe: 4-bit full fine-tune", {"sft": sft(quantization={"load_in_4bit": True})},
             ["stages.sft.quantization", "peft"]),
    run_case("recipe: quantization typo", {"sft": sft(peft={"r": 4}, quantization={"load_in_4bits": True})},
             ["stages.sft.quantization.load_in_4bits", "'load_in_4bit'"]),
    run_case("recipe: hub unknown stage", {"sft": sft()}, ["hub.stages", "unknown stage 'dpo'"],
             hub={"repo_id": "me/x", "stages": ["dpo"]}),
    run_case("recipe: model block typo", {"sft": sft()}, ["model.dtyp", "did you mean 'dtype'"],
             model={"name_or_path": "x", "dtyp": "bf16"}),
    run_case("recipe: ppo without reward", {"ppo": ppo(reward_funcs=None)}, ["stages.ppo.reward_model", "needs a reward"]),
    run_case("recipe: ppo reward_weights count", {"ppo": ppo(reward_weights=[1.0, 2.0])},
             ["stages.ppo.reward_weights", "2 weights for 1"]),
    run_case("recipe: ppo peft method", {"ppo": ppo(peft={"method": "ia3"})}, ["stages.ppo.peft.method", "lora"]),
    run_case("recipe: ppo negative response_length", {"ppo": ppo(response_length=-1)}, ["stages.ppo", "response_length"]),
    run_case("recipe: rloo without reward", {"rloo": rloo(reward_funcs=None)},
             ["stages.rloo", "reward_model"]),
    run_case("recipe: reward_funcs form", {"ppo": ppo(reward_funcs="tests.rewards.letter_a")},
             ["stages.ppo.reward_funcs", "module:function"]),
    run_case("recipe: judge form", {"eval": {"prompts": "@D/prompts.jsonl", "judge": "nocolon"}},
             ["stages.eval.judge", "module:function"]),
    run_case("recipe: eval without data", {"eval": {"judge": "align.task:gold_score"}}, ["stages.eval", "prompts"]),
    run_case("recipe: unwritable output_dir", {"sft": sft()}, ["output_dir", "cannot write"], output_dir="@D/good.jsonl/run"),
    run_case("recipe: bad --set", {"sft": sft()}, ["--set", "KEY=VALUE"], extra_args=["--set", "stages.sft.max_steps"]),
    run_case("recipe: unknown --stage", {"sft": sft()}, ["--stage dpo", "no such stage"], extra_args=["--stage", "dpo"]),
    run_case("recipe: --stage before earlier", {"a": sft(type="sft"), "b": sft(type="sft")}, ["--stage b", "'a'"],
             extra_args=["--stage", "b"]),
    # ------------------------------------------------------------------ data
    run_case("data: missing file", {"sft": sft(dataset={"path": "@D/missing.jsonl"})}, ["missing.jsonl", "does not exist"]),
    data_case("data: empty file", "", ["in.jsonl", "empty"]),
    data_case("data: blank lines only", "\n\n", ["in.jsonl", "no rows"]),
    data_case("data: malformed line 3", jsonl(CHAT, CHAT) + "{oops\n", ["in.jsonl", "line 3", "malformed JSON"]),
    data_case("data: line not an object", jsonl(CHAT) + "[1, 2]\n", ["in.jsonl", "line 2", "JSON object"]),
    data_case("data: corrupt parquet", b"not parquet", ["in.parquet", "not a parquet file"], name="in.parquet"),
    data_case("data: unknown extension", "x", ["in.xml", "unknown extension"], name="in.xml"),
    run_case("data: folder without files", {"sft": sft(dataset={"path": "@D/empty_folder"})}, ["empty_folder", "no"],
             files={"empty_folder/readme.md": "x"}),
    data_case("data: missing columns", [{"question": "a", "answer": "b"}], ["stages.sft.dataset", "missing column",
                                                                           "question", "columns:"]),
    data_case("data: columns names absent column", GOOD4, ["stages.sft.dataset.columns", "'q'"], columns={"q": "prompt"}),
    data_case("data: columns rename onto existing", [{"text": "a", "body": "b"}], ["columns.body", "already has", "'text'"],
              columns={"body": "text"}),
    data_case("data: unknown format", GOOD4, ["format", "alpacca"], format="alpacca"),
    data_case("data: null at row 6", GOOD4 + [{"messages": None}], ["in.jsonl", "row 6", "'messages'", "null"]),
    data_case("data: type changes at row 6", [{"prompt": "a", "completion": "b"}] * 5 + [{"prompt": [U("x")],
              "completion": "b"}], ["in.jsonl", "row 6", "'prompt'", "holds a list of messages where row 1 holds text"]),
    data_case("data: number as text at row 3", [{"text": "a"}] * 2 + [{"text": 5}], ["row 3", "'text'", "expected text"]),
    data_case("data: messages not a list", [{"messages": 5}], ["row 1", "'messages'", "int"]),
    data_case("data: empty message list", GOOD4 + [{"messages": []}], ["row 6", "empty list"]),
    data_case("data: turn without content", GOOD4 + [{"messages": [U("hi"), {"role": "assistant"}]}],
              ["row 6", "'messages'", "turn 2"]),
    data_case("data: unknown role", GOOD4 + [{"messages": [{"role": "bot", "content": "x"}, A("y")]}],
              ["row 6", "unknown role 'bot'"]),
    data_case("data: no assistant turn at row 5", [CHAT] * 4 + [{"messages": [U("hi")]}],
              ["row 5", "'messages'", "no assistant turn"]),
    data_case("data: empty assistant answer", [CHAT, {"messages": [U("hi"), A("  ")]}], ["row 2", "no assistant turn"]),
    data_case("data: sharegpt turn without value", [{"conversations": [{"from": "human", "value": "a"},
                                                                       {"from": "gpt", "value": "b"}]}] * 3
              + [{"conversations": [{"from": "human"}, {"from": "gpt", "value": "b"}]}],
              ["row 4", "'conversations'", "turn 1", "'value'"]),
    data_case("data: sharegpt unknown role", [{"conversations": [{"from": "human", "value": "a"},
                                                                 {"from": "gpt", "value": "b"}]}] * 3
              + [{"conversations": [{"from": "bot", "value": "a"}]}], ["row 4", "unknown 'from': 'bot'"]),
    data_case("data: sharegpt not a list", [{"conversations": "hello"}], ["row 1", "'conversations'", "list"]),
    data_case("data: alpaca empty output at row 2", [{"instruction": "a", "input": "", "output": "b"},
                                                     {"instruction": "a", "input": "", "output": ""}],
              ["row 2", "'output'", "empty"]),
    data_case("data: alpaca rows for a reward stage", [{"instruction": "a", "input": "", "output": "b"}],
              ["in.jsonl", "alpaca rows are conversations", "chosen+rejected"], kind="reward"),
    data_case("data: sft prompt without completion", [{"prompt": "a", "completion": None}], ["row 1", "'completion'"]),
    data_case("data: pairs empty rejected at row 3", [PAIR, PAIR, {**PAIR, "rejected": ""}],
              ["row 3", "'rejected'", "empty"], kind="reward"),
    data_case("data: pairs all identical", [{**PAIR, "rejected": "a"}] * 2, ["no usable preference pairs"], kind="reward"),
    data_case("data: chat pairs sharing no prompt", [{"chosen": [A("a")], "rejected": [A("b")]}],
              ["row 1", "share no leading prompt"], kind="reward"),
    data_case("data: chat prompt, text answers", [{"prompt": [U("q")], "chosen": "a", "rejected": "b"}],
              ["'prompt' holds message lists", "hold text"], kind="reward"),
    data_case("data: margin not a number at row 2", [{**PAIR, "margin": 1.0}, {**PAIR, "margin": "big"}],
              ["row 2", "'margin'", "number"], kind="reward"),
    data_case("data: ppo prompt null at row 3", [{"prompt": "a"}] * 2 + [{"prompt": None}],
              ["row 3", "'prompt'", "null"], kind="ppo"),
    data_case("data: ppo prompt conversation with only an answer", [{"messages": [A("x")]}],
              ["row 1", "no turns before"], kind="ppo"),
    run_case("data: mixture of text and messages", {"sft": sft(dataset=[{"path": "@D/good.jsonl"}, {"path": "@D/t.jsonl"}])},
             ["stages.sft.dataset[0]", "good.jsonl", "stages.sft.dataset[1]", "t.jsonl", "cannot be mixed"],
             files={"t.jsonl": jsonl({"text": "a b"})}),
    run_case("data: mixture of string and chat prompts", {"ppo": ppo(dataset=[{"path": "@D/prompts.jsonl"},
                                                                            {"path": "@D/cp.jsonl"}])},
             ["prompts.jsonl", "cp.jsonl", "cannot be mixed"], files={"cp.jsonl": jsonl({"prompt": [U("a")]})}),
    run_case("data: mixture bad row in second source", {"sft": sft(dataset=[{"path": "@D/good.jsonl"},
                                                                          {"path": "@D/b.jsonl"}])},
             ["stages.sft.dataset[1]", "b.jsonl", "row 2", "null"], files={"b.jsonl": jsonl(CHAT, {"messages": None})}),
    data_case("data: negative weight", GOOD4, ["weight", "positive"], weight=-1),
    data_case("data: test_size too big", GOOD4, ["test_size"], test_size=50),
    run_case("data: eval stage prompts checked before training", {"sft": sft(), "eval": {"prompts": "@D/bad.jsonl"}},
             ["stages.eval.prompts", "bad.jsonl", "row 2"], files={"bad.jsonl": jsonl({"prompt": "a"}, {"prompt": ""})}),
    run_case("recipe: eval stage judge imported before training", {"sft": sft(), "eval": {
        "prompts": "@D/prompts.jsonl", "judge": "missing_judge_mod:score"}},
        ["stages.eval.judge", "cannot import 'missing_judge_mod'"]),
    run_case("data: eval stage pairs checked before training", {"sft": sft(), "eval": {"pairs": "@D/x.jsonl"}},
             ["stages.eval.pairs", "x.jsonl", "does not exist"]),
    # ------------------------------------------------------------------ models
    run_case("models: missing local model", {"sft": sft(model="@D/no-such-model")}, ["stages.sft.model", "no-such-model",
                                                                                       "does not exist"]),
    run_case("models: missing top-level model", {"sft": {"dataset": {"path": "@D/good.jsonl"}}},
             ["model", "models/typo/x", "does not exist"], model="models/typo/x"),
    run_case("models: empty model folder", {"sft": sft(model="@D/empty")}, ["stages.sft.model", "empty", "holds no model"],
             files={"empty/.keep": ""}),
    run_case("models: model path is a file", {"sft": sft(model="@D/good.jsonl")}, ["stages.sft.model", "is a file"]),
    run_case("models: second stage model missing, first not trained", {"a": sft(type="sft"),
                                                                      "b": sft(type="sft", model="@D/typo")},
             ["stages.b.model", "typo", "does not exist"]),
    run_case("models: ppo reward_model ${sft}", {"sft": sft(), "ppo": ppo(model="${sft}", reward_model="${sft}")},
             ["stages.ppo.reward_model", "${sft}", "no trained score head"]),
    run_case("models: ppo reward_model a causal LM folder", {"ppo": ppo(reward_model="@MODEL")},
             ["stages.ppo.reward_model", "not a reward model"]),
    run_case("models: rloo reward_model a causal LM folder", {"rloo": rloo(reward_funcs=None, reward_model="@MODEL")},
             ["stages.rloo.reward_model", "not a reward model"]),
    run_case("models: eval reward_model a causal LM", {"eval": {"prompts": "@D/prompts.jsonl", "reward_model": "@MODEL",
                                                                "policies": ["@MODEL"]}},
             ["stages.eval.reward_model", "not a reward model"]),
    run_case("models: ppo value_model missing", {"ppo": ppo(value_model="@D/nothing")}, ["stages.ppo.value_model", "nothing"]),
    run_case("models: sft starting from a reward model", {"sft": sft(model="@RM")}, ["is a reward model", "policy"],
             ),
    # ------------------------------------------------------------------ command line
    ("cli: eval without data", {}, ["eval", "--policy", "@MODEL"], ["--prompts, --pairs or --texts"]),
    ("cli: eval --pairs missing", {}, ["eval", "--reward-model", "@RM", "--pairs", "@D/nope.jsonl"],
     ["--pairs.path", "nope.jsonl", "does not exist"]),
    ("cli: eval --pairs bad row", {"p.jsonl": jsonl(PAIR, {"prompt": "p", "chosen": None, "rejected": "b"})},
     ["eval", "--reward-model", "@RM", "--pairs", "@D/p.jsonl"], ["--pairs", "p.jsonl", "row 2", "'chosen'"]),
    ("cli: eval --prompts bad layout", {"p.jsonl": jsonl({"question": "a"})}, ["eval", "--policy", "@MODEL", "--prompts",
                                                                             "@D/p.jsonl"], ["--prompts", "missing column"]),
    ("cli: eval --reward-model a causal LM", {}, ["eval", "--reward-model", "@MODEL", "--pairs", "@D/prefs.jsonl"],
     ["--reward-model", "not a reward model"]),
    ("cli: eval --judge form", {}, ["eval", "--policy", "@MODEL", "--prompts", "@D/prompts.jsonl", "--judge", "x"],
     ["--judge", "module:function"]),
    ("cli: eval --judge module missing", {}, ["eval", "--policy", "@MODEL", "--prompts", "@D/prompts.jsonl", "--judge",
                                              "no_such_judge_mod:score"], ["--judge", "cannot import 'no_such_judge_mod'"]),
    ("cli: eval --judge function missing", {"cwd_judge_mod.py": "def other(p, r):\n    return 1.0\n"},
     ["eval", "--policy", "@MODEL", "--prompts", "@D/prompts.jsonl", "--judge", "cwd_judge_mod:score"],
     ["--judge", "'cwd_judge_mod' has no function 'score'"]),
    ("cli: eval --judge module raises", {"raising_judge_mod.py": "raise RuntimeError('boom')\n"},
     ["eval", "--policy", "@MODEL", "--prompts", "@D/prompts.jsonl", "--judge", "raising_judge_mod:score"],
     ["--judge", "RuntimeError: boom"]),
    ("cli: eval --policy missing", {}, ["eval", "--policy", "@D/gone", "--prompts", "@D/prompts.jsonl"], ["gone", "no such"]),
    ("cli: chat on a reward model", {}, ["chat", "@RM"], ["is a reward model", "policy"]),
    ("cli: generate on a reward model", {}, ["generate", "@RM", "--prompts", "@D/prompts.jsonl", "--out", "@D/g.jsonl"],
     ["is a reward model", "cannot generate"]),
    ("cli: generate --prompts missing", {}, ["generate", "@MODEL", "--prompts", "@D/nope.jsonl", "--out", "@D/g.jsonl"],
     ["--prompts", "nope.jsonl", "does not exist"]),
    ("cli: generate --prompts bad row", {"p.jsonl": jsonl({"prompt": "a"}, {"prompt": 3})},
     ["generate", "@MODEL", "--prompts", "@D/p.jsonl", "--out", "@D/g.jsonl"], ["--prompts", "row 2", "int"]),
    ("cli: generate --out a folder", {}, ["generate", "@MODEL", "--prompts", "@D/prompts.jsonl", "--out", "@D/run"],
     ["--out", "folder"]),
    ("cli: generate --temperature -1", {}, ["generate", "@MODEL", "--prompts", "@D/prompts.jsonl", "--temperature", "-1"],
     ["--temperature"]),
    ("cli: generate --top-p 2", {}, ["generate", "@MODEL", "--prompts", "@D/prompts.jsonl", "--top-p", "2"], ["--top-p"]),
    ("cli: chat target missing", {}, ["chat", "@D/nothing-here"], ["nothing-here", "no such folder"]),
    ("cli: chat on an empty folder", {"emptymodel/.keep": ""}, ["chat", "@D/emptymodel"], ["emptymodel", "holds no model"]),
    ("cli: generate on a run folder with no policy", {"r2/recipe.yaml": "name: x\nstages: {}\n"},
     ["generate", "@D/r2", "--prompts", "@D/prompts.jsonl"], ["r2", "no finished policy"]),
    ("cli: report on a non-run folder", {}, ["report", "@D/run"], ["run", "not a run folder"]),
    ("cli: merge a missing target", {}, ["merge", "@D/nothing", "--out", "@D/m"], ["nothing"]),
    ("cli: push a missing target", {}, ["push", "@D/nothing", "--repo-id", "me/x"], ["nothing", "no such folder"]),
]

# Cases that fail mid-stage, after training has started: the stage is not marked complete.
MID_STAGE = [
    run_case("stage: every pair dropped by max_length", {"reward": {**sft(max_length=2), "dataset": {"path": "@D/prefs.jsonl"}}},
             ["stages.reward.dataset", "dropped all 4 rows", "max_length=2"]),
    run_case("stage: ppo reward function returns strings",
             {"ppo": ppo(reward_funcs="str_reward_mod:reward")}, ["stages.ppo.reward_funcs", "str_reward_mod:reward",
                                                                 "'good'", "finite numbers"],
             files={"str_reward_mod.py": "def reward(prompts, completions, **kw):\n    return ['good'] * len(prompts)\n"}),
    run_case("stage: rloo reward function returns too few", {"rloo": rloo(reward_funcs="short_reward_mod:reward")},
        ["stages.rloo.reward_funcs", "short_reward_mod:reward", "returned 1 values"],
        files={"short_reward_mod.py": "def reward(prompts, completions, **kw):\n    return [1.0]\n"}),
    run_case("stage: chat template refuses a row", {"sft": sft(model="@NOSYS", dataset={"path": "@D/sys.jsonl"})},
             ["stages.sft.dataset", "row 1", "System role not supported"],
             files={"sys.jsonl": jsonl({"messages": [{"role": "system", "content": "be nice"}, U("hi"), A("yo")]})}),
]


def _write(case_dir: Path, files: dict, subst):
    for name, content in {**COMMON, **files}.items():
        path = case_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(subst(content))


def snapshot(folder: Path) -> dict:
    """Every file's size, mtime and hash, and every folder's name, under `folder`."""
    out = {}
    for path in sorted(folder.rglob("*")):
        rel = str(path.relative_to(folder))
        if path.is_dir():
            out[rel] = "dir"
        else:
            stat = path.stat()
            out[rel] = (stat.st_size, stat.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest())
    return out


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory, tiny_model) -> Path:
    """The tiny model with a one-logit score head, saved as a sequence classifier."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("rm") / "reward"
    AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1).save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def no_system_model(tmp_path_factory, tiny_model) -> Path:
    """The tiny model with a chat template that refuses system turns (as Gemma's does)."""
    out = tmp_path_factory.mktemp("nosys") / "nosys"
    shutil.copytree(tiny_model, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    template = ("{%- for m in messages %}{%- if m['role'] == 'system' %}{{ raise_exception('System role not "
                "supported') }}{%- endif %}{{- m['role'] + ': ' + m['content'] + '<|im_end|>' }}{%- endfor %}"
                "{%- if add_generation_prompt %}{{- 'assistant: ' }}{%- endif %}")
    (out / "chat_template.jinja").write_text(template)
    config.pop("chat_template", None)
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def _substituter(case_dir: Path, request):
    def subst(text: str) -> str:
        text = text.replace("@D", str(case_dir))
        if "@MODEL" in text:
            text = text.replace("@MODEL", str(request.getfixturevalue("tiny_model")))
        if "@RM" in text:
            text = text.replace("@RM", str(request.getfixturevalue("reward_model")))
        if "@NOSYS" in text:
            text = text.replace("@NOSYS", str(request.getfixturevalue("no_system_model")))
        return text
    return subst


def _run_in_process(case_dir, argv, request, capsys, monkeypatch):
    subst = _substituter(case_dir, request)
    monkeypatch.chdir(case_dir)  # modules named in the case are found in the current folder
    monkeypatch.setattr(sys, "path", [str(REPO), *sys.path])  # tests.rewards; the loader may add the cwd
    argv = [subst(a) for a in argv]  # builds the fixtures first: their load reports are not the case's output
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    return exit_info.value.code, lines


def _check(code, lines, expected, training=False):
    """Exit 2 and one line `error: ...`; a stage that started training has printed its progress
    and load reports before it: the error is then the only error line and the last one."""
    if os.environ.get("ALIGN_SHOW_ERRORS"):
        print(lines[-1:], file=sys.__stdout__)
    assert code == 2, (code, lines)
    if training:
        errors = [line for line in lines if "error" in line.lower()]
        assert not any("Traceback" in line for line in lines), "\n".join(lines)
        assert len(errors) == 1 and lines[-1].startswith("error: "), lines[-5:]
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    for text in expected:
        assert text in lines[0], (text, lines[0])


@pytest.mark.parametrize("case_id,files,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_one_line_nothing_changed(tmp_path, request, capsys, monkeypatch, case_id, files, argv, expected):
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    subst = _substituter(case_dir, request)
    _write(case_dir, files, subst)
    before = snapshot(case_dir)
    code, lines = _run_in_process(case_dir, argv, request, capsys, monkeypatch)
    _check(code, lines, [e.replace("@D", str(case_dir)) for e in expected])
    assert snapshot(case_dir) == before, "a failed command changed the case folder"


@pytest.mark.parametrize("case_id,files,argv,expected", MID_STAGE, ids=[c[0] for c in MID_STAGE])
def test_bad_input_mid_stage_one_line_nothing_marked_complete(tmp_path, request, case_id, files, argv, expected):
    """In a real process (in the case folder, as a user would run it): training output, then
    exactly one error line, last, and no traceback."""
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    subst = _substituter(case_dir, request)
    _write(case_dir, files, subst)
    result = subprocess.run([sys.executable, "-m", "align", *[subst(a) for a in argv]], capture_output=True, text=True,
                            cwd=case_dir, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
                                                            "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
    lines = [line for line in result.stderr.replace("\r", "\n").splitlines() if line.strip()]
    _check(result.returncode, lines, expected, training=True)
    assert not list((case_dir / "run").rglob(".align-complete.json"))


def test_table_size():
    assert len(CASES) + len(MID_STAGE) + len(PROCESS_CASES) >= 80


# ---------------------------------------------------------------------------------------------
# Real processes: what a user's terminal shows


def _process_case_dir(tmp_path, request, files):
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    _write(case_dir, files, _substituter(case_dir, request))
    return case_dir


PROCESS_CASES = ["reward functions found in the current folder", "full disk", "accelerate: bad data",
                 "accelerate: recipe field"]


def test_process_reward_module_in_current_folder_is_found_and_checked(tmp_path, request):
    """`align run` (the console script, not `python -m`) finds a reward module in the current
    folder, imports it before training, and its failure is one line."""
    files = {"r.yaml": recipe({"ppo": ppo(reward_funcs="local_rewards_mod:score")}),
             "local_rewards_mod.py": "import no_such_dependency_xyz\n"}
    case_dir = _process_case_dir(tmp_path, request, files)
    before = snapshot(case_dir)
    align = Path(sys.executable).with_name("align")
    launcher = [str(align)] if align.exists() else [sys.executable, "-m", "align"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # this checkout's align
    result = subprocess.run(launcher + ["run", str(case_dir / "r.yaml")], capture_output=True, text=True, cwd=case_dir,
                            env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "error: stages.ppo.reward_funcs: cannot import 'local_rewards_mod': No module named 'no_such_dependency_xyz'"]
    assert snapshot(case_dir) == before


def test_process_full_disk_is_one_line(tmp_path, request):
    """A stage writing into a full filesystem (a 400 KiB tmpfs in a private mount namespace)."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode:
        pytest.skip("needs unshare --mount (root or user namespaces) to mount a tiny tmpfs")
    files = {"r.yaml": recipe({"sft": sft(max_steps=2, save_steps=1)}, output_dir="/mnt/align-full/run")}
    case_dir = _process_case_dir(tmp_path, request, files)
    script = ("mkdir -p /mnt/align-full && mount -t tmpfs -o size=400k tmpfs /mnt/align-full && "
              f"{sys.executable} -m align run {case_dir / 'r.yaml'}; code=$?; "
              "ls -a /mnt/align-full/run/sft >&2; exit $code")
    result = subprocess.run(["unshare", "--mount", "sh", "-c", script], capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}, timeout=600)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert result.returncode == 2, result.stderr[-3000:]
    assert errors == ["error: stage sft: no space left on device while writing /mnt/align-full/run/sft"], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert ".align-complete.json" not in result.stderr  # the listing of the stage folder


ACCELERATE = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
              "-m", "align"]


@pytest.mark.slow
@pytest.mark.parametrize("stage,expected", [
    (sft(dataset={"path": "@D/bad.jsonl"}), "error: stages.sft.dataset: @D/bad.jsonl: 1 bad row(s); first at row 3"),
    (sft(max_steps=-5), "error: stages.sft.max_steps: must be positive (or -1 to train num_train_epochs), got -5"),
], ids=["bad data row", "recipe field"])
def test_accelerate_launch_prints_align_line_once_and_first(tmp_path, request, stage, expected):
    """Under `accelerate launch` align's line is printed once, first, by the main process; the
    other process stops with it (no gloo timeout, no worker traceback). torch's launcher then
    prints its own failure report (a traceback of the launcher process, exit status 1); align
    cannot suppress it from inside its workers, so it puts its message in that report's root
    cause through TORCHELASTIC_ERROR_FILE."""
    files = {"r.yaml": recipe({"sft": stage}), "bad.jsonl": jsonl(CHAT, CHAT, {"messages": None})}
    case_dir = _process_case_dir(tmp_path, request, files)
    before = snapshot(case_dir)
    result = run_align(["run", case_dir / "r.yaml"], launcher=ACCELERATE, timeout=300)
    expected = expected.replace("@D", str(case_dir))
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode != 0
    assert lines[0].startswith(expected), result.stderr[-3000:]
    assert len([line for line in lines if line.startswith("error")]) == 1
    assert "[rank" not in result.stderr and "gloo" not in result.stderr
    assert "/align/" not in result.stderr.split("ChildFailedError")[0], "no traceback through align's code"
    root_cause = result.stderr.split("Root Cause")[-1]
    assert expected in root_cause, "the launcher's report names align's message"
    assert snapshot(case_dir) == before
