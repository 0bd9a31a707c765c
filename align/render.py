"""How an example becomes model text: the one rendering every stage uses.

The rule (SFT, reward, DPO, RLOO and GRPO through TRL; PPO, eval, chat and generate here):

1. Turns. A string `prompt` is one user turn; a string `completion`, `chosen` or `rejected`
   is one assistant turn; a string preference pair without a prompt is first split at its
   shared prefix (TRL's `extract_prompt`). The TRL stages get their data in that form
   (`conversational`, applied in align.training.load_datasets), so TRL renders what align
   renders; align's own consumers read strings the same way (`messages`). Only `text` rows
   (language modelling) stay plain text. Data normalisation must produce rows this rule reads.
2. Text. Turns become text through the chat template of the model that reads them (a
   tokenizer without one gets align's ChatML template, align.models.prepare_tokenizer): no
   system turn unless the data has one (a template's own default system prompt applies alike
   everywhere), no special tokens added outside the template.
   - A prompt to continue ends with the generation prompt (`prompt_text`).
   - An answer to score is the whole conversation (`reward_text`), closed by the template's
     end of turn when the answer stopped; an answer cut at the length limit ends right after
     its last character, so the reward model can tell it from a finished one.
   - A generated answer is its tokens decoded without special tokens, nothing stripped
     (`completion_text`): the reward model reads exactly what the policy wrote.
3. A reward model whose own tokenizer files carry no chat template was trained on plain text
   (TRL's standard format): it reads prompt + answer + EOS (no EOS when the answer was cut),
   with the tokenizer's own special tokens; its prompt must be a string or one user turn.
4. Length. A prompt longer than `max_prompt_length` tokens once rendered is dropped with a
   count (`fit_prompts`), never cut: cutting from the left loses the BOS and the chat header,
   from the right the question; the reward model sees the very prompt the policy saw.
"""

from __future__ import annotations

from align.errors import AlignError
from align.models import PLAIN_EOS

_CUT = "\ue000"  # a private-use character marks where a cut answer ends inside the rendered chat
_warned: set[str] = set()


def warn_once(message: str):
    if message not in _warned:
        _warned.add(message)
        print(f"warning: {message}", flush=True)


# --------------------------------------------------------------------------- rule 1: turns


def messages(value, role: str = "user") -> list[dict]:
    """A prompt (or answer, with role="assistant") as a list of turns."""
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def conversational(row: dict) -> dict:
    """A TRL row with every string prompt / completion / chosen / rejected made a turn;
    `text` and `messages` rows come back unchanged."""
    row = dict(row)
    if "prompt" not in row and isinstance(row.get("chosen"), str) and isinstance(row.get("rejected"), str):
        from trl.data_utils import extract_prompt

        split = extract_prompt({"chosen": row["chosen"], "rejected": row["rejected"]})
        if split["prompt"].strip():
            row.update(split)
    if isinstance(row.get("prompt"), str):
        row["prompt"] = messages(row["prompt"])
    for key in ("completion", "chosen", "rejected"):
        if isinstance(row.get(key), str):
            row[key] = messages(row[key], "assistant")
    return row


def conversational_dataset(ds):
    """`conversational` over a datasets.Dataset (no copy when nothing is a string)."""
    if ds is None or not any(isinstance(ds[0].get(k), str) for k in ("prompt", "completion", "chosen", "rejected")):
        return ds
    return ds.map(conversational, desc=None)


# --------------------------------------------------------------------------- rule 2: text


def reads_chat(tokenizer) -> bool:
    """Whether a model reads chat-template text: its tokenizer files carried a template
    (not one align added while loading it)."""
    return tokenizer.chat_template is not None and not hasattr(tokenizer, PLAIN_EOS)


def prompt_text(tokenizer, prompt) -> str:
    """A prompt (string or turns) rendered with the chat template, ready to continue."""
    return tokenizer.apply_chat_template(messages(prompt), tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, prompt) -> list[int]:
    """The token ids of `prompt_text`, as TRL tokenizes a conversational prompt."""
    return tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]


def completion_text(tokenizer, ids) -> str:
    """A generated answer as text: special tokens (the end of turn) dropped, nothing stripped."""
    return tokenizer.decode(ids, skip_special_tokens=True)


def reward_text(tokenizer, prompt, completion, finished: bool = True) -> str:
    """The text a reward model scores for (prompt, completion); see the module docstring."""
    if not reads_chat(tokenizer):
        text = _plain(prompt, "prompt") + _plain(completion, "answer")
        eos = getattr(tokenizer, PLAIN_EOS, tokenizer.eos_token) or ""
        return text + eos if finished and not text.endswith(eos) else text
    if finished or not isinstance(completion, str):
        return tokenizer.apply_chat_template(messages(prompt) + messages(completion, "assistant"), tokenize=False)
    marked = tokenizer.apply_chat_template(messages(prompt) + messages(completion + _CUT, "assistant"), tokenize=False)
    end = marked.rfind(_CUT)
    return marked[:end] if end >= 0 else prompt_text(tokenizer, prompt) + completion


def reward_inputs(tokenizer, texts: list[str], **kwargs):
    """Right-padded tensors of `reward_text` strings, tokenized as the reward model was
    trained: no added special tokens after a chat template, the tokenizer's own on plain text."""
    return tokenizer(texts, padding=True, padding_side="right", add_special_tokens=not reads_chat(tokenizer),
                     return_tensors="pt", **kwargs)


def _plain(value, what: str) -> str:
    if isinstance(value, str):
        return value
    if not value:
        return ""
    if len(value) == 1:
        return value[0]["content"]
    raise AlignError(f"reward_model: its tokenizer has no chat template, so it reads plain text, but a {what} has "
                     f"{len(value)} turns; give it string prompts (or one user turn), or a reward model trained on "
                     f"conversations")


# --------------------------------------------------------------------------- rule 4: length


def fit_prompts(ds, tokenizer, max_length: int | None, where: str):
    """`ds` without the prompts longer than `max_length` tokens once rendered, with a count."""
    if not max_length:
        return ds
    keep = [i for i, prompt in enumerate(ds["prompt"]) if len(prompt_ids(tokenizer, prompt)) <= max_length]
    if len(keep) == len(ds):
        return ds
    if not keep:
        raise AlignError(f"{where}: every prompt is longer than max_prompt_length={max_length} tokens (with the "
                         f"chat template); raise max_prompt_length")
    warn_once(f"{where}: dropped {len(ds) - len(keep)} of {len(ds)} prompts longer than max_prompt_length="
              f"{max_length} tokens (with the chat template); prompts are never cut")
    return ds.select(keep)
