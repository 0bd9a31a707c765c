import dataclasses
import inspect
import json
import random

import pytest

from align import task as T


def _score(prompt_msgs, answer_msgs):
    return T.gold_score(prompt_msgs[0]["content"], answer_msgs[0]["content"])


def _key(prompt):
    op, letters = T.parse_prompt(prompt)
    return op, tuple(letters)


@pytest.fixture(scope="module")
def task():
    return T.build_task(T.TaskConfig(seed=3, n_sft=1000, n_pairs=1000, n_prompts=500, n_eval=200))


# ----------------------------------------------------------------------- generator


def test_deterministic_for_a_seed():
    cfg = T.TaskConfig(seed=7, n_sft=100, n_pairs=100, n_prompts=50, n_eval=40)
    assert T.build_task(cfg) == T.build_task(cfg)
    other = T.build_task(dataclasses.replace(cfg, seed=8))
    assert other["sft"] != T.build_task(cfg)["sft"]
    assert other["eval_prompts"] != T.build_task(cfg)["eval_prompts"]


def test_splits_have_requested_sizes(task):
    assert [len(task[k]) for k in T.FILE_NAMES] == [1000, 1000, 500, 200, 200]


@pytest.mark.parametrize("bad_fraction", [0.0, 0.15, 0.4, 0.7, 1.0])
def test_bad_fraction_is_realised(bad_fraction):
    rows = T.make_sft_rows(600, seed=1, bad_fraction=bad_fraction)
    poor = [_score(r["messages"][:1], r["messages"][1:]) < 1.0 for r in rows]
    assert abs(sum(poor) / len(rows) - bad_fraction) <= 0.01


def test_bad_rates_average_to_bad_fraction_and_follow_habits():
    for bf in (0.0, 0.1, 0.4, 0.6, 0.9, 1.0):
        rates = T.bad_rates(bf)
        assert set(rates) == set(T.OPS)
        assert all(0.0 <= r <= 1.0 for r in rates.values())
        assert sum(rates.values()) / len(rates) == pytest.approx(bf, abs=1e-6)
    rates = T.bad_rates(0.4)
    sloppy = [op for op, (_, w) in T.HABITS.items() if w > 1]
    # On the sloppy operations poor demonstrations are the majority (an imitating policy
    # copies the habit even when decoding greedily); elsewhere they are a minority.
    assert sloppy and all(rates[op] > 0.5 for op in sloppy)
    assert all(rates[op] < 0.5 for op in T.OPS if op not in sloppy)


def test_poor_demonstrations_follow_the_habit_of_their_operation():
    for r in T.make_sft_rows(300, seed=2, bad_fraction=0.4):
        prompt, answer = r["messages"][0]["content"], r["messages"][1]["content"]
        if answer != T.ideal_response(prompt):
            op, _ = T.parse_prompt(prompt)
            defect = T.HABITS[op][0]
            assert answer in {T.poor_response(prompt, defect, v) for v in range(12)}


@pytest.mark.parametrize("noise", [0.0, 0.1, 0.3])
def test_label_noise_is_realised(noise):
    rows = T.make_pref_rows(500, seed=4, label_noise=noise)
    flipped = [_score(r["prompt"], r["chosen"]) < _score(r["prompt"], r["rejected"]) for r in rows]
    assert abs(sum(flipped) / len(rows) - noise) <= 0.01


def test_pairs_mix_good_and_poor_answers(task):
    ideal_sides = sum(
        r[side][0]["content"] == T.ideal_response(r["prompt"][0]["content"])
        for r in task["prefs"]
        for side in ("chosen", "rejected")
    )
    share = ideal_sides / (2 * len(task["prefs"]))
    assert 0.2 < share < 0.5  # every pair has at most one ideal side; poor-vs-poor pairs exist


def test_eval_prompts_are_disjoint_from_training_prompts(task):
    train = {_key(r["messages"][0]["content"]) for r in task["sft"]}
    train |= {_key(r["prompt"][0]["content"]) for r in task["prefs"] + task["prompts"]}
    held = {_key(r["prompt"][0]["content"]) for r in task["eval_prompts"] + task["eval_prefs"]}
    assert train and held and not (train & held)
    assert all(T.is_eval_prompt(r["prompt"]) for r in task["eval_prompts"])
    assert not any(T.is_eval_prompt(r["prompt"]) for r in task["prompts"])
    # Disjoint across seeds too: the split is a fixed function of the request.
    other = T.make_sft_rows(300, seed=99)
    assert not ({_key(r["messages"][0]["content"]) for r in other} & held)


def test_eval_prompts_cover_every_operation(task):
    ops = [T.parse_prompt(r["prompt"])[0] for r in task["eval_prompts"]]
    assert {op: ops.count(op) for op in T.OPS} == {op: 40 for op in T.OPS}


def test_noise_free_eval_pairs_prefer_the_gold_better_side(task):
    for r in task["eval_prefs"]:
        assert _score(r["prompt"], r["chosen"]) >= _score(r["prompt"], r["rejected"]) + T.MIN_GAP


# --------------------------------------------------------------------------- judge


def test_judge_scores_ideal_answers_one_and_poor_answers_clearly_lower():
    rng = random.Random(0)
    for op in T.OPS:
        for _ in range(20):
            letters = rng.sample(T.LETTERS, rng.randint(T.MIN_LEN, T.MAX_LEN))
            if op == "sort" and letters == sorted(letters):
                continue  # the generator never asks to sort sorted letters
            prompt = T.make_prompt(op, letters, rng.randrange(2))
            assert T.gold_score(prompt, T.ideal_response(prompt)) == 1.0
            for defect in T.DEFECTS:
                for v in range(4):
                    s = T.gold_score(prompt, T.poor_response(prompt, defect, v))
                    assert 0.0 <= s <= 0.6, (prompt, defect, s)


def test_judge_examples_and_partial_credit():
    p = "Reverse the letters: d a c"
    assert T.ideal_response(p) == "Sure! The answer is c a d."
    assert T.gold_score(p, "Sure! The answer is c a d.") == 1.0
    assert T.gold_score(p, "  Sure!  The answer is c a d. ") == 1.0  # whitespace is free
    assert T.gold_score(p, "Sure! The answer is c a x.") == pytest.approx(2 / 3)
    assert T.gold_score(p, "Sure! The answer is d a c.") == pytest.approx(1 / 3)  # echo
    assert T.gold_score(p, "c a d") == 0.5  # curt: no opener, no frame
    assert T.gold_score(p, "The answer is c a d.") == 0.75  # no opener
    assert T.gold_score(p, "Sure! c a d.") == 0.75  # no frame
    assert T.gold_score(p, "Sure! The answer is c a d. Bye now.") == pytest.approx(1 / 1.5)
    assert T.gold_score(p, "") == 0.0
    assert T.gold_score(p, "Sorry, I can not help with that.") == 0.0
    assert T.gold_score("How many letters? a b c d", "Sure! The answer is 5.") == 0.5
    assert T.gold_score("Please capitalize: a b", "Sure! The answer is a b.") == 0.0


def test_judge_is_bounded_on_arbitrary_text():
    rng = random.Random(1)
    alphabet = "abcXYZ .!Sure Theansweris012"
    prompt = "Sort the letters: o c h"
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        assert 0.0 <= T.gold_score(prompt, text) <= 1.0


def test_judge_accepts_message_lists_and_templated_prompts():
    user = [{"role": "user", "content": "Please sort: o c h"}]
    good = [{"role": "assistant", "content": "Sure! The answer is c h o."}]
    bad = [{"role": "assistant", "content": "Sure! The answer is o c h."}]
    assert T.gold_score(user, good) == 1.0
    templated = "<|user|>Please sort: o c h<|end|>\n<|assistant|>"
    assert T.gold_score(templated, good[0]["content"]) == 1.0
    system = [{"role": "system", "content": "Be nice."}] + user
    rewards = T.judge_reward([system, user, templated], [good, bad, "c h o"], completion_ids=None, trainer_state=None)
    assert rewards == [1.0, 0.0, 0.5]
    assert all(isinstance(r, float) for r in rewards)
    with pytest.raises(ValueError):
        T.judge_reward([user], [good, bad])
    with pytest.raises(ValueError):
        T.gold_score("What is the weather like?", "Sunny.")


# --------------------------------------------------------------------------- files


def _read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    return [json.loads(line) for line in lines]


def _is_turns(value, role):
    return (
        isinstance(value, list)
        and len(value) == 1
        and set(value[0]) == {"role", "content"}
        and value[0]["role"] == role
        and isinstance(value[0]["content"], str)
        and value[0]["content"]
    )


def test_write_task_writes_valid_trl_jsonl(tmp_path):
    paths = T.write_task(
        tmp_path / "data", seed=5, n_sft=40, n_pairs=30, n_prompts=20, n_eval=10, bad_fraction=0.4, label_noise=0.1
    )
    assert set(paths) == set(T.FILE_NAMES)
    assert {p.name for p in paths.values()} == set(T.FILE_NAMES.values())
    rows = {split: _read_jsonl(path) for split, path in paths.items()}
    assert [len(rows[k]) for k in T.FILE_NAMES] == [40, 30, 20, 10, 10]

    for r in rows["sft"]:
        assert set(r) == {"messages"}
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert all(isinstance(m["content"], str) and m["content"] for m in r["messages"])
    for split in ("prefs", "eval_prefs"):
        for r in rows[split]:
            assert set(r) == {"prompt", "chosen", "rejected"}
            assert _is_turns(r["prompt"], "user")
            assert _is_turns(r["chosen"], "assistant") and _is_turns(r["rejected"], "assistant")
            assert r["chosen"] != r["rejected"]
    for split in ("prompts", "eval_prompts"):
        for r in rows[split]:
            assert set(r) == {"prompt"} and _is_turns(r["prompt"], "user")

    # Same content as the in-memory generator.
    cfg = T.TaskConfig(seed=5, n_sft=40, n_pairs=30, n_prompts=20, n_eval=10)
    assert rows == T.build_task(cfg)


def test_task_config_maps_onto_write_task(tmp_path):
    fields = [f.name for f in dataclasses.fields(T.TaskConfig)]
    assert fields == ["seed", "n_sft", "n_pairs", "n_prompts", "n_eval", "bad_fraction", "label_noise"]
    params = inspect.signature(T.write_task).parameters
    for f in dataclasses.fields(T.TaskConfig):
        assert params[f.name].kind is inspect.Parameter.KEYWORD_ONLY
        assert params[f.name].default == f.default
    cfg = T.TaskConfig(n_sft=5, n_pairs=5, n_prompts=5, n_eval=5)
    assert set(T.write_task(tmp_path, **dataclasses.asdict(cfg))) == set(T.FILE_NAMES)
    with pytest.raises(ValueError):
        T.TaskConfig(bad_fraction=1.5)
    with pytest.raises(ValueError):
        T.TaskConfig(n_sft=-1)


def test_answers_are_short():
    for r in T.make_sft_rows(200, seed=6) + [
        {"messages": r["prompt"] + r["rejected"]} for r in T.make_pref_rows(200, seed=6)
    ]:
        for m in r["messages"]:
            assert len(m["content"].split()) <= 20


def test_every_generated_request_separates_ideal_from_poor(task):
    prompts = [r["prompt"][0]["content"] for r in task["prompts"] + task["eval_prompts"]]
    for p in prompts:
        assert T.gold_score(p, T.ideal_response(p)) == 1.0
        assert max(T.gold_score(p, T.poor_response(p, d, v)) for d in T.DEFECTS for v in range(4)) <= 0.6
