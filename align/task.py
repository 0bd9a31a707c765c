"""A toy chat task with a gold judge, small enough for a few-million-parameter model on CPU.

The user asks for one of five operations on three to five distinct letters from ``a`` to
``p``::

    Reverse the letters: d a c        ->  Sure! The answer is c a d.
    Please capitalize: b e f          ->  Sure! The answer is B E F.
    Sort the letters: o c h           ->  Sure! The answer is c h o.
    What is the last letter? k n b    ->  Sure! The answer is b.
    How many letters? m p a j         ->  Sure! The answer is 4.

Letters are space separated, so a byte-level BPE tokenizer turns every letter into a
token of its own and the operations are token-level ones.

The gold judge (:func:`gold_score`) values exactly three things and multiplies them:

* **correctness** ``C``: the result is read from the text after ``The answer is`` (or from
  the whole reply, minus a leading ``Sure!``, when that phrase is missing) up to the first
  ``.``; it is compared position by position with the right result, each matching token
  counting 1 (a count that is off by one counts 0.5), divided by the longer of the two
  lengths, so missing, extra or misplaced tokens all cost;
* **format** ``F = 0.5 + 0.25 [reply starts with "Sure!"] + 0.25 [reply contains
  "The answer is"]``;
* **concision** ``L = 1 / (1 + 0.25 * extra)``, ``extra`` being how many more words the
  reply has than the ideal one.

The ideal reply scores 1.0. The demonstrators' poor answers each carry one
characteristic defect (see :data:`DEFECTS`): ``echo`` (the input letters handed back
unchanged, about 0 to 0.3), ``ramble`` (the right answer followed by a chatty sentence,
about 0.3), ``curt`` (the bare result, 0.5) and ``refuse`` (a non-answer, 0).

SFT demonstrations: a fraction ``bad_fraction`` of them are poor, but not evenly: the
demonstrators had habits (:data:`HABITS`), one fixed poor answer style per operation,
and were sloppier on two of the five operations (at the default 0.4: 70% poor on
``upper`` and ``last``, 20% on the others). Were 40% poor answers spread evenly, the
ideal answer would be the most likely continuation at every branch point and greedy
decoding of an imitating policy would already score about as well as one trained on
perfect demonstrations. With habits, the policy reproduces them: greedily it echoes on
``upper`` (0) and rambles on ``last`` (about 0.3) and answers the three other operations
properly, so a fully competent SFT policy gets about (0 + 0.3 + 3) / 5 = 0.66, less where
it has not quite learnt to reverse or sort; sampling gives a similar mean. Preference
learning can recover up to the ~0.95 of a policy trained on perfect demonstrations.

Preference pairs: both sides are drawn from the same kinds of answers (the ideal one with
probability 1/2, otherwise a defect chosen uniformly, on any operation), the pair is kept
only when the gold scores differ by at least :data:`MIN_GAP`, the gold-better side is
``chosen``, and exactly ``round(label_noise * n)`` pairs are then flipped.

Sort requests are never already sorted (echoing would be right). Evaluation prompts come
from a held-out part of the prompt space (a fixed hash of the operation and letters), so
they never coincide with a training prompt, for any seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import re
import string
from pathlib import Path
from typing import Any, Sequence

from align.rundir import write_jsonl

__all__ = [
    "TaskConfig",
    "OPS",
    "DEFECTS",
    "HABITS",
    "MIN_GAP",
    "FILE_NAMES",
    "make_prompt",
    "parse_prompt",
    "is_eval_prompt",
    "ideal_response",
    "poor_response",
    "gold_score",
    "judge_reward",
    "bad_rates",
    "make_sft_rows",
    "make_pref_rows",
    "make_prompt_rows",
    "make_eval_prompt_rows",
    "make_eval_pref_rows",
    "build_task",
    "write_task",
]


@dataclasses.dataclass(frozen=True)
class TaskConfig:
    """Sizes and knobs of the generated task (the defaults of :func:`write_task`)."""

    seed: int = 0
    n_sft: int = 2000  # SFT demonstrations
    n_pairs: int = 2000  # training preference pairs
    n_prompts: int = 1000  # prompt-only rows for RL
    n_eval: int = 200  # held-out prompts, and as many held-out gold pairs
    bad_fraction: float = 0.4  # share of SFT demonstrations that are poor
    label_noise: float = 0.1  # share of training pairs whose labels are flipped

    def __post_init__(self) -> None:
        for name in ("n_sft", "n_pairs", "n_prompts", "n_eval"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
        for name in ("bad_fraction", "label_noise"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value!r}")


# --------------------------------------------------------------------------- prompts

LETTERS = string.ascii_lowercase[:16]  # a..p: few enough for a tiny model to learn case and order
MIN_LEN, MAX_LEN = 3, 5

# operation -> phrasings; every phrasing is followed by " " and the letters.
OPS: dict[str, tuple[str, ...]] = {
    "reverse": ("Reverse the letters:", "Please reverse:"),
    "upper": ("Capitalize the letters:", "Please capitalize:"),
    "sort": ("Sort the letters:", "Please sort:"),
    "last": ("Give the last letter:", "What is the last letter?"),
    "count": ("Count the letters:", "How many letters?"),
}

_PROMPT_RE = re.compile(
    "(?P<phrase>"
    + "|".join(re.escape(p) for phrases in OPS.values() for p in phrases)
    + r") (?P<letters>[a-z](?: [a-z])*)(?![A-Za-z])"
)
_PHRASE_TO_OP = {p: op for op, phrases in OPS.items() for p in phrases}

EVAL_SHARE = 0.15  # share of the prompt space held out for evaluation


def _key(op: str, letters: Sequence[str]) -> str:
    return f"{op}:{''.join(letters)}"


def _in_eval_pool(op: str, letters: Sequence[str]) -> bool:
    digest = hashlib.blake2b(_key(op, letters).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < EVAL_SHARE


def make_prompt(op: str, letters: Sequence[str], phrasing: int = 0) -> str:
    """The user message asking for ``op`` on ``letters``."""
    return f"{OPS[op][phrasing]} {' '.join(letters)}"


def _prompt_text(prompt: Any) -> str:
    """Accept a string or a list of chat messages (the last user turn is used)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, dict):
        return str(prompt.get("content", ""))
    if isinstance(prompt, (list, tuple)):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        chosen = users[-1] if users else (prompt[-1] if prompt else {})
        return str(chosen.get("content", "")) if isinstance(chosen, dict) else str(chosen)
    raise TypeError(f"cannot read a prompt from {type(prompt).__name__}")


def parse_prompt(prompt: Any) -> tuple[str, list[str]]:
    """``(op, letters)`` of a task prompt.

    The prompt may be the bare user message, a chat-templated string containing it, or a
    list of messages. Raises ``ValueError`` when no task request is found.
    """
    text = _prompt_text(prompt)
    matches = list(_PROMPT_RE.finditer(text))
    if not matches:
        raise ValueError(f"not a task prompt: {text[:80]!r}")
    m = matches[-1]
    return _PHRASE_TO_OP[m.group("phrase")], m.group("letters").split(" ")


def is_eval_prompt(prompt: Any) -> bool:
    """Whether the prompt belongs to the held-out evaluation part of the prompt space."""
    op, letters = parse_prompt(prompt)
    return _in_eval_pool(op, letters)


def _result(op: str, letters: Sequence[str]) -> list[str]:
    if op == "reverse":
        return list(reversed(letters))
    if op == "upper":
        return [c.upper() for c in letters]
    if op == "sort":
        return sorted(letters)
    if op == "last":
        return [letters[-1]]
    if op == "count":
        return [str(len(letters))]
    raise ValueError(f"unknown op {op!r}")


# ------------------------------------------------------------------------- responses

OPENER = "Sure!"
FRAME = "The answer is"

# The poor answers' characteristic defects.
DEFECTS = ("echo", "ramble", "curt", "refuse")

RAMBLES = (
    "I hope this helps you a lot with your task today!",
    "Let me know if you need anything else from me.",
    "That was a fun one, thanks for asking me!",
    "Feel free to ask me another question any time.",
)
REFUSALS = (
    "Sorry, I can not help with that.",
    "Hmm, I am not sure about this one.",
    "I would rather not answer that.",
)

# The demonstrators' habit on each operation: (defect of their poor answers, sloppiness
# weight). Poor demonstrations are spread over operations in proportion to the weight,
# and on a given operation they are all alike (same defect, same ramble or refusal
# sentence): a habit, not noise, so that an imitating policy picks it up even greedily.
HABITS: dict[str, tuple[str, float]] = {
    "reverse": ("curt", 1.0),
    "upper": ("echo", 3.5),
    "sort": ("refuse", 1.0),
    "last": ("ramble", 3.5),
    "count": ("ramble", 1.0),
}
_HABIT_VARIANT = {op: i for i, op in enumerate(HABITS)}


def ideal_response(prompt: Any) -> str:
    """The reply the judge scores 1.0."""
    op, letters = parse_prompt(prompt)
    return f"{OPENER} {FRAME} {' '.join(_result(op, letters))}."


def poor_response(prompt: Any, defect: str, variant: int = 0) -> str:
    """A poor reply with the given defect; ``variant`` picks the ramble/refusal sentence."""
    op, letters = parse_prompt(prompt)
    result = " ".join(_result(op, letters))
    if defect == "echo":
        return f"{OPENER} {FRAME} {' '.join(letters)}."
    if defect == "ramble":
        return f"{OPENER} {FRAME} {result}. {RAMBLES[variant % len(RAMBLES)]}"
    if defect == "curt":
        return result
    if defect == "refuse":
        return REFUSALS[variant % len(REFUSALS)]
    raise ValueError(f"unknown defect {defect!r}; expected one of {DEFECTS}")


# ------------------------------------------------------------------------------ judge

EXTRA_WORD_COST = 0.25


def _completion_text(completion: Any) -> str:
    """Accept a string or a list of chat messages (assistant turns are joined)."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        parts = []
        for m in completion:
            if isinstance(m, dict):
                if m.get("role", "assistant") == "assistant":
                    parts.append(str(m.get("content", "")))
            else:
                parts.append(str(m))
        return " ".join(parts)
    raise TypeError(f"cannot read a completion from {type(completion).__name__}")


def _token_credit(got: str, want: str) -> float:
    if got == want:
        return 1.0
    if got.isdigit() and want.isdigit() and abs(int(got) - int(want)) == 1:
        return 0.5
    return 0.0


def gold_score(prompt: Any, response: Any) -> float:
    """The gold judge: a score in [0, 1] of ``response`` to the task ``prompt``.

    ``score = C * F * L`` with correctness ``C``, format ``F`` and concision ``L`` as
    described in the module docstring. ``prompt`` and ``response`` may be strings or
    lists of chat messages.
    """
    op, letters = parse_prompt(prompt)
    want = _result(op, letters)
    text = " ".join(_completion_text(response).split())
    if not text:
        return 0.0

    at = text.find(FRAME)
    if at >= 0:
        segment = text[at + len(FRAME):]
    else:
        segment = text[len(OPENER):] if text.startswith(OPENER) else text
    segment = segment.split(".", 1)[0]
    got = segment.split()
    correctness = sum(_token_credit(g, w) for g, w in zip(got, want)) / max(len(got), len(want))

    fmt = 0.5 + 0.25 * text.startswith(OPENER) + 0.25 * (at >= 0)

    ideal_words = len(OPENER.split()) + len(FRAME.split()) + len(want)
    extra = max(0, len(text.split()) - ideal_words)
    concision = 1.0 / (1.0 + EXTRA_WORD_COST * extra)

    return float(min(1.0, max(0.0, correctness * fmt * concision)))


def judge_reward(prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any) -> list[float]:
    """Gold scores in the shape of a TRL (GRPO/RLOO) reward function.

    ``prompts`` and ``completions`` may be strings or lists of message dicts; extra keyword
    arguments (``completion_ids``, dataset columns, ``trainer_state``...) are ignored.
    """
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    return [gold_score(p, c) for p, c in zip(prompts, completions)]


# ------------------------------------------------------------------------- generation

MIN_GAP = 0.15  # smallest gold-score difference between the two sides of a pair


def _rng(seed: int, part: str) -> random.Random:
    return random.Random(f"align-task:{seed}:{part}")


def _sample_prompt(rng: random.Random, op: str, *, held_out: bool) -> str:
    while True:
        letters = rng.sample(LETTERS, rng.randint(MIN_LEN, MAX_LEN))
        if op == "sort" and letters == sorted(letters):
            continue  # nothing to do: echoing the input would be the right answer
        if _in_eval_pool(op, letters) == held_out:
            return make_prompt(op, letters, rng.randrange(len(OPS[op])))


def _balanced_ops(rng: random.Random, n: int) -> list[str]:
    names = list(OPS)
    ops = [names[i % len(names)] for i in range(n)]
    rng.shuffle(ops)
    return ops


def bad_rates(bad_fraction: float) -> dict[str, float]:
    """Share of poor demonstrations per operation; their mean is ``bad_fraction``.

    Rates are ``min(1, lam * weight)`` with ``lam`` chosen so that they average to
    ``bad_fraction`` (weights from :data:`HABITS`).
    """
    if not 0.0 <= bad_fraction <= 1.0:
        raise ValueError(f"bad_fraction must be in [0, 1], got {bad_fraction!r}")
    weights = {op: w for op, (_, w) in HABITS.items()}
    lo, hi = 0.0, 1.0 / min(weights.values())
    for _ in range(100):
        lam = (lo + hi) / 2
        mean = sum(min(1.0, lam * w) for w in weights.values()) / len(weights)
        lo, hi = (lam, hi) if mean < bad_fraction else (lo, lam)
    lam = (lo + hi) / 2
    return {op: min(1.0, lam * w) for op, w in weights.items()}


def _bad_counts(ops: list[str], bad_fraction: float) -> dict[str, int]:
    """Integer numbers of poor demonstrations per op, summing to round(bf * n)."""
    per_op = {op: ops.count(op) for op in OPS}
    rates = bad_rates(bad_fraction)
    quota = {op: rates[op] * per_op[op] for op in OPS}
    counts = {op: min(per_op[op], math.floor(q)) for op, q in quota.items()}
    left = round(bad_fraction * len(ops)) - sum(counts.values())
    for op in sorted(OPS, key=lambda o: quota[o] - counts[o], reverse=True):
        if left <= 0:
            break
        if counts[op] < per_op[op]:
            counts[op] += 1
            left -= 1
    return counts


def _user(content: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


def _assistant(content: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": content}]


def make_sft_rows(n: int, *, seed: int = 0, bad_fraction: float = 0.4) -> list[dict]:
    """``n`` conversational SFT rows, ``round(bad_fraction * n)`` of them poor."""
    rng = _rng(seed, "sft")
    ops = _balanced_ops(rng, n)
    counts = _bad_counts(ops, bad_fraction)
    index_by_op: dict[str, list[int]] = {op: [] for op in OPS}
    for i, op in enumerate(ops):
        index_by_op[op].append(i)
    bad: set[int] = set()
    for op in OPS:
        bad.update(rng.sample(index_by_op[op], counts[op]))
    rows = []
    for i, op in enumerate(ops):
        prompt = _sample_prompt(rng, op, held_out=False)
        if i in bad:
            answer = poor_response(prompt, HABITS[op][0], _HABIT_VARIANT[op])
        else:
            answer = ideal_response(prompt)
        rows.append({"messages": _user(prompt) + _assistant(answer)})
    return rows


def _candidate(rng: random.Random, prompt: str) -> str:
    if rng.random() < 0.5:
        return ideal_response(prompt)
    return poor_response(prompt, rng.choice(DEFECTS), rng.randrange(12))


def _pairs(rng: random.Random, n: int, *, held_out: bool, label_noise: float) -> list[dict]:
    rows = []
    for op in _balanced_ops(rng, n):
        prompt = _sample_prompt(rng, op, held_out=held_out)
        while True:
            a, b = _candidate(rng, prompt), _candidate(rng, prompt)
            sa, sb = gold_score(prompt, a), gold_score(prompt, b)
            if abs(sa - sb) >= MIN_GAP:
                break
        chosen, rejected = (a, b) if sa > sb else (b, a)
        rows.append({"prompt": _user(prompt), "chosen": _assistant(chosen), "rejected": _assistant(rejected)})
    for i in rng.sample(range(n), round(label_noise * n)):
        rows[i]["chosen"], rows[i]["rejected"] = rows[i]["rejected"], rows[i]["chosen"]
    return rows


def make_pref_rows(n: int, *, seed: int = 0, label_noise: float = 0.1) -> list[dict]:
    """``n`` training preference pairs labelled by the judge, ``round(label_noise * n)`` flipped."""
    if not 0.0 <= label_noise <= 1.0:
        raise ValueError(f"label_noise must be in [0, 1], got {label_noise!r}")
    return _pairs(_rng(seed, "prefs"), n, held_out=False, label_noise=label_noise)


def make_prompt_rows(n: int, *, seed: int = 0) -> list[dict]:
    """``n`` prompt-only rows (training part of the prompt space) for RL."""
    rng = _rng(seed, "prompts")
    return [{"prompt": _user(_sample_prompt(rng, op, held_out=False))} for op in _balanced_ops(rng, n)]


def make_eval_prompt_rows(n: int, *, seed: int = 0) -> list[dict]:
    """``n`` held-out prompt-only rows, balanced over operations, none among training prompts."""
    rng = _rng(seed, "eval_prompts")
    return [{"prompt": _user(_sample_prompt(rng, op, held_out=True))} for op in _balanced_ops(rng, n)]


def make_eval_pref_rows(n: int, *, seed: int = 0) -> list[dict]:
    """``n`` held-out gold-labelled pairs (no label noise)."""
    return _pairs(_rng(seed, "eval_prefs"), n, held_out=True, label_noise=0.0)


FILE_NAMES = {
    "sft": "sft.jsonl",
    "prefs": "prefs.jsonl",
    "prompts": "prompts.jsonl",
    "eval_prompts": "eval_prompts.jsonl",
    "eval_prefs": "eval_prefs.jsonl",
}


def build_task(config: TaskConfig | None = None) -> dict[str, list[dict]]:
    """All splits in memory, keyed like :data:`FILE_NAMES`."""
    c = config or TaskConfig()
    return {
        "sft": make_sft_rows(c.n_sft, seed=c.seed, bad_fraction=c.bad_fraction),
        "prefs": make_pref_rows(c.n_pairs, seed=c.seed, label_noise=c.label_noise),
        "prompts": make_prompt_rows(c.n_prompts, seed=c.seed),
        "eval_prompts": make_eval_prompt_rows(c.n_eval, seed=c.seed),
        "eval_prefs": make_eval_pref_rows(c.n_eval, seed=c.seed),
    }


_DEFAULTS = TaskConfig()


def write_task(
    out_dir: str | Path,
    *,
    seed: int = _DEFAULTS.seed,
    n_sft: int = _DEFAULTS.n_sft,
    n_pairs: int = _DEFAULTS.n_pairs,
    n_prompts: int = _DEFAULTS.n_prompts,
    n_eval: int = _DEFAULTS.n_eval,
    bad_fraction: float = _DEFAULTS.bad_fraction,
    label_noise: float = _DEFAULTS.label_noise,
) -> dict[str, Path]:
    """Write the five jsonl files into ``out_dir``; returns ``{split: path}``.

    ``write_task(out, **dataclasses.asdict(config))`` writes a :class:`TaskConfig`.
    """
    config = TaskConfig(
        seed=seed,
        n_sft=n_sft,
        n_pairs=n_pairs,
        n_prompts=n_prompts,
        n_eval=n_eval,
        bad_fraction=bad_fraction,
        label_noise=label_noise,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in build_task(config).items():
        path = out / FILE_NAMES[split]
        write_jsonl(path, rows)
        paths[split] = path
    return paths
