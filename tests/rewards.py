"""Reward functions for the PPO tests, in TRL's shape: f(prompts, completions, **kw) -> list[float].

They reward something a freshly initialised tiny model can learn within a few dozen PPO
steps, so a rising mean reward is a real signal that the optimisation works."""


def _text(completion) -> str:
    if isinstance(completion, list):  # conversational: [{"role": "assistant", "content": ...}]
        return " ".join(m["content"] for m in completion)
    return completion


def letter_a(prompts, completions, **kwargs):
    """Share of the response's characters that are the letter 'a' (0 for an empty response)."""
    scores = []
    for completion in completions:
        text = _text(completion).replace(" ", "")
        scores.append(text.count("a") / len(text) if text else 0.0)
    return scores


def short(prompts, completions, completion_ids=None, **kwargs):
    """1 / (number of response tokens): rewards stopping early."""
    return [1.0 / max(1, len(ids)) for ids in completion_ids]


def judge_a(prompt, response) -> float:
    """A gold judge in align's shape, (prompt, response) -> [0, 1]: the share of 'a' in the response."""
    return letter_a([prompt], [response])[0]
