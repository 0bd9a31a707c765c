"""Evaluation: perplexity on text, reward-model pair accuracy on preferences, and for policies on
held-out prompts: mean reward-model score, gold score (when the task has a judge), mean
per-sequence KL to a reference, win rate against the reference as judged by the reward model,
and a table of sample generations. `align eval` and the `eval` stage both call `evaluate`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from align import infer, render
from align.markdown import table
from align.rundir import write_atomic


@torch.no_grad()
def perplexity(model, tokenizer, texts, batch_size=16) -> float:
    """exp(mean token cross-entropy) over all tokens of `texts`."""
    total, count = 0.0, 0
    tokenizer.padding_side = "right"
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], return_tensors="pt", padding=True,
                        add_special_tokens=False).to(model.device)
        logits = model(**enc).logits[:, :-1].float()
        labels = enc["input_ids"][:, 1:]
        mask = enc["attention_mask"][:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none")
        total += nll[mask].sum().item()
        count += mask.sum().item()
    return math.exp(total / max(count, 1))


@torch.no_grad()
def reward_scores(model, tokenizer, prompts, completions, finished=None, batch_size=32) -> list[float]:
    """The reward model's scalar for each (prompt, completion), read from the text
    `align.render.reward_text` gives: what the reward model was trained on and what PPO
    scores. `finished` (default: all) is false for an answer cut at the length limit. Text
    goes through the reward model's own tokenizer, so policy and RM tokenizers may differ."""
    finished = [True] * len(prompts) if finished is None else finished
    texts = [render.reward_text(tokenizer, p, c, f) for p, c, f in zip(prompts, completions, finished)]
    scores = []
    for start in range(0, len(texts), batch_size):
        enc = render.reward_inputs(tokenizer, texts[start:start + batch_size]).to(model.device)
        scores += model(**enc).logits[:, 0].float().tolist()
    return scores


def pair_accuracy(model, tokenizer, rows) -> dict:
    """Share of pairs where the reward model scores chosen above rejected, and the mean margin."""
    prompts = [r.get("prompt", []) for r in rows]
    chosen = reward_scores(model, tokenizer, prompts, [r["chosen"] for r in rows])
    rejected = reward_scores(model, tokenizer, prompts, [r["rejected"] for r in rows])
    margins = [c - r for c, r in zip(chosen, rejected)]
    return {"pair_accuracy": sum(m > 0 for m in margins) / len(margins), "mean_margin": sum(margins) / len(margins)}


@torch.no_grad()
def sequence_logprobs(model, pairs) -> list[float]:
    """Sum of log-probs of each completion given its prompt; `pairs` are (prompt_ids, completion_ids)."""
    out = []
    for prompt_ids, completion_ids in pairs:
        ids = torch.tensor([prompt_ids + completion_ids], device=model.device)
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()
        target = ids[0, len(prompt_ids):]
        out.append(torch.log_softmax(logits, -1).gather(-1, target[:, None]).sum().item())
    return out


def evaluate(*, policies: dict, prompts=None, reward_model=None, reference=None, judge=None, pairs=None,
             texts=None, max_new_tokens=48, batch_size=32, seed=0, num_samples=5) -> dict:
    """All metrics as {"policies": {name: {...}}, "reward_model": {...}, "samples": [...]}."""
    results = {"policies": {}, "samples": []}
    rm = infer.load(reward_model, kind="seq-cls") if reward_model else None
    if rm and pairs:
        results["reward_model"] = pair_accuracy(*rm, pairs)
    ref = infer.load(reference) if reference else None
    ref_texts = ref_finished = None
    if ref and prompts:
        ref_texts, ref_finished = _answers(*ref, prompts, max_new_tokens, batch_size)
    ref_scores = reward_scores(*rm, prompts, ref_texts, ref_finished) if rm and ref_texts else None

    for name, target in policies.items():
        model, tokenizer = infer.load(target)
        metrics = {}
        if texts:
            metrics["perplexity"] = perplexity(model, tokenizer, texts)
        if prompts:
            prompt_metrics, outputs = policy_metrics(
                model, tokenizer, prompts, rm=rm, ref_model=ref[0] if ref else None, ref_scores=ref_scores,
                judge=judge, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
            metrics.update(prompt_metrics)
            for i, (p, o) in enumerate(zip(prompts[:num_samples], outputs)):
                if len(results["samples"]) <= i:
                    results["samples"].append({"prompt": _show(p)})
                results["samples"][i][name] = o
        results["policies"][name] = metrics
    return results


def _answers(model, tokenizer, prompts, max_new_tokens, batch_size) -> tuple[list[str], list[bool]]:
    """Greedy answers and whether each stopped (False: cut at max_new_tokens)."""
    texts, ids = infer.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                return_ids=True)
    stops = infer.stop_token_ids(model, tokenizer)
    return texts, [bool(row) and row[-1] in stops for _, row in ids]


@torch.no_grad()
def policy_metrics(model, tokenizer, prompts, *, rm=None, ref_model=None, ref_scores=None, judge=None,
                   max_new_tokens=48, batch_size=32, seed=0) -> tuple[dict, list[str]]:
    """A policy's metrics on prompts, and its greedy completions: response length (words), gold
    score (judge x 100), mean reward-model score (`rm` = (model, tokenizer)), win rate against
    `ref_scores`, KL to `ref_model`. Also what RL stages log on held-out prompts (align/heldout.py)."""
    outputs, finished = _answers(model, tokenizer, prompts, max_new_tokens, batch_size)
    metrics = {"response_length": sum(len(o.split()) for o in outputs) / len(outputs)}
    if judge:
        metrics["gold_score"] = 100 * sum(judge(p, o) for p, o in zip(prompts, outputs)) / len(outputs)
    if rm:
        scores = reward_scores(*rm, prompts, outputs, finished)
        metrics["reward"] = sum(scores) / len(scores)
        if ref_scores:
            wins = [1.0 if s > r else 0.5 if s == r else 0.0 for s, r in zip(scores, ref_scores)]
            metrics["win_rate_vs_ref"] = sum(wins) / len(wins)
    if ref_model is not None:
        metrics["kl_to_ref"] = _kl_to_reference(model, tokenizer, ref_model, prompts, max_new_tokens, seed)
    return metrics, outputs


def _kl_to_reference(model, tokenizer, ref_model, prompts, max_new_tokens, seed) -> float:
    """Monte-Carlo KL(pi || ref) per sequence: completions sampled from the policy at T=1, then
    the mean of log pi(y|x) - log ref(y|x)."""
    _, ids = infer.generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=1.0,
                            top_k=0, seed=seed, return_ids=True)
    lp = sequence_logprobs(model, ids)
    lr = sequence_logprobs(ref_model, ids)
    return sum(a - b for a, b in zip(lp, lr)) / len(ids)


def _show(prompt) -> str:
    return prompt if isinstance(prompt, str) else " / ".join(m["content"] for m in prompt)


COLUMNS = [("gold_score", "gold", "{:.1f}"), ("reward", "RM score", "{:.3f}"), ("kl_to_ref", "KL to ref", "{:.2f}"),
           ("win_rate_vs_ref", "win vs ref", "{:.2f}"), ("perplexity", "perplexity", "{:.2f}"),
           ("response_length", "words", "{:.1f}")]


def markdown(results: dict) -> str:
    """The eval table, reward-model accuracy and sample generations as markdown."""
    policies = results["policies"]
    cols = [c for c in COLUMNS if any(c[0] in m for m in policies.values())]
    lines = table(["policy"] + [c[1] for c in cols],
                  [[name] + [c[2].format(m[c[0]]) if c[0] in m else "" for c in cols] for name, m in policies.items()])
    if "reward_model" in results:
        rm = results["reward_model"]
        lines += ["", f"Reward model: pair accuracy {rm['pair_accuracy']:.3f}, mean margin {rm['mean_margin']:.3f}"]
    if results["samples"]:
        names = ["prompt"] + list(policies)
        lines += ["", *table(names, [[s.get(k, "") for k in names] for s in results["samples"]], limit=80)]
    return "\n".join(lines) + "\n"


def write(results: dict, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(out_dir / "eval.json", json.dumps(results, indent=2))
    write_atomic(out_dir / "eval.md", markdown(results))
