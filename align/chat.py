"""`align chat`: a terminal chat that streams tokens and keeps the history (`/reset` clears it,
`/quit` or end of input exits); it works with stdin from a pipe too. Generation stops at the
end-of-turn token; the oldest turns are dropped when the conversation outgrows the context."""

from __future__ import annotations

import sys

import torch

from align.infer import check_sampling_args, cut_at_stop, load, sampling_kwargs, seed_all, stop_token_ids
from align.render import completion_text, prompt_ids, prompt_text
from align.rundir import resolve_target


def _streamer(tokenizer, out):
    """A TextStreamer that writes new tokens (prompt skipped, special tokens hidden) to `out`."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False):
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def _fit_history(tokenizer, history: list[dict], budget: int | None) -> list[dict]:
    """The latest turns that fit in `budget` prompt tokens (the newest user turn always stays)."""
    if not budget:
        return history
    kept = list(history)
    while len(kept) > 1 and len(prompt_ids(tokenizer, kept)) > budget:
        kept = kept[2:] if len(kept) > 2 else kept[1:]  # drop the oldest user/assistant pair
    return kept


@torch.no_grad()
def chat_reply(model, tokenizer, history: list[dict], *, out=None, max_new_tokens=256, temperature=0.0,
               top_p=1.0, top_k=0) -> str:
    """Generate the assistant's next turn for `history`, streaming it to `out`; returns the text.

    Generation stops at the end-of-turn token. The oldest turns are dropped when the
    conversation no longer fits the model's context."""
    out = out or sys.stdout
    context = getattr(model.config, "max_position_embeddings", None)
    budget = context - max_new_tokens if context and context > max_new_tokens else None
    messages = _fit_history(tokenizer, history, budget)
    enc = tokenizer(prompt_text(tokenizer, messages), return_tensors="pt", add_special_tokens=False)
    if budget and enc["input_ids"].shape[1] > budget:  # one message longer than the context: keep its end
        enc = {k: v[:, -budget:] for k, v in enc.items()}
    enc = {k: v.to(model.device) for k, v in enc.items()}
    stops = stop_token_ids(model, tokenizer)
    gen = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=stops, streamer=_streamer(tokenizer, out),
                         **sampling_kwargs(temperature, top_p, top_k))
    row = cut_at_stop(gen[0, enc["input_ids"].shape[1]:].tolist(), stops)
    return completion_text(tokenizer, row)


CHAT_HELP = "/reset clears the history, /quit (or end of input) exits"


def chat_loop(model, tokenizer, *, stdin=None, out=None, interactive=None, **gen) -> int:
    """Read user turns from `stdin` until /quit or end of input; returns the number of replies."""
    stdin = stdin or sys.stdin
    out = out or sys.stdout
    interactive = stdin.isatty() if interactive is None else interactive
    history: list[dict] = []
    replies = 0
    while True:
        try:
            if interactive:
                line = input("you> ")
            else:
                line = stdin.readline()
                if not line:
                    break  # end of input
        except EOFError:
            if interactive:
                out.write("\n")
            break
        except KeyboardInterrupt:
            out.write("\n")
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit", "/q"):
            break
        if text == "/reset":
            history.clear()
            out.write("(history cleared)\n")
            out.flush()
            continue
        if text in ("/help", "/?"):
            out.write(CHAT_HELP + "\n")
            continue
        if text.startswith("/") and " " not in text:
            out.write(f"unknown command {text}; {CHAT_HELP}\n")
            continue
        history.append({"role": "user", "content": text})
        out.write("assistant> ")
        out.flush()
        try:
            reply = chat_reply(model, tokenizer, history, out=out, **gen)
        except KeyboardInterrupt:  # Ctrl-C stops this reply, not the chat
            history.pop()
            out.write("\n(stopped)\n")
            continue
        history.append({"role": "assistant", "content": reply})
        replies += 1
    return replies


def chat_command(args):
    check_sampling_args(args)
    path = resolve_target(args.target)
    model, tokenizer = load(path, load_in_4bit=args.load_in_4bit, trust_remote_code=args.trust_remote_code)
    seed_all(args.seed)
    size = model.get_memory_footprint() / 2**20
    print(f"chatting with {path} ({size:,.1f} MiB{', nf4' if args.load_in_4bit else ''}); {CHAT_HELP}",
          file=sys.stderr, flush=True)
    chat_loop(model, tokenizer, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
              top_p=args.top_p, top_k=args.top_k)
