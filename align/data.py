"""Datasets for every stage, loaded through `datasets` and mapped onto TRL's formats.

A recipe `dataset:` block is one source or a list of sources (a weighted mixture):

    dataset:
      path: data/sft.jsonl        # jsonl/json/csv/parquet file, a folder, or a Hub id
      name: null                  # Hub config name
      split: train[:1000]         # any `datasets` split expression
      columns: {question: prompt, answer: completion}   # rename onto TRL's column names
      format: alpaca              # or sharegpt; both are also recognised without it
      weight: 1.0                 # mixtures: rows taken = weight x rows (above 1 repeats rows)
      test_size: 0.05             # held-out fraction for evaluation (first source, or the block)

Stage kinds and the TRL formats they accept:
  lm          text | prompt + completion | messages   (SFT; pretrain takes text)
  preference  chosen + rejected, with an explicit `prompt` or an implicit one (shared prefix)
  prompt      prompt                                   (PPO, RLOO, GRPO, eval)
Each may be standard (strings) or conversational (lists of {role, content}).

Layouts users bring are normalised per source, before a mixture is concatenated:
  - ShareGPT (`conversations` of {from, value}) and Alpaca (`instruction`/`input`/`output`)
    become `messages`; for prompt data, `messages` become the prompt (turns before the answer).
  - A string `prompt` beside message-list answers (UltraFeedback-binarized, also prompt +
    completion) becomes a user turn, unless the answers already start with the prompt turns
    (UltraFeedback's do): then, as TRL's `maybe_extract_prompt` does, the shared leading turns
    are the prompt and the string is redundant.
  - Conversational preference pairs always get an explicit prompt (their shared leading turns,
    what TRL's DPO trainer extracts; the reward model sees the same text either way). Text
    pairs with an implicit prompt (HH-RLHF transcripts) stay text pairs, as TRL takes them;
    how rows become model text is align.render's rule.
Every row is checked (not only the first): a bad one is named by file, row (from 1) and field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from align.errors import AlignError, first_line
from align.recipe import check_keys

SOURCE_KEYS = {"path", "name", "split", "columns", "format", "weight", "test_size", "data_files"}
FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
OPTIONAL_COLUMNS = {"preference": ["margin"]}  # kept when present (RewardTrainer reads it)
FORMATS = {"lm": [{"text"}, {"prompt", "completion"}, {"messages"}],
           "text": [{"text"}],
           "preference": [{"prompt", "chosen", "rejected"}, {"chosen", "rejected"}],
           "prompt": [{"prompt"}]}
FORMATS["any"] = FORMATS["lm"] + FORMATS["preference"] + FORMATS["prompt"]  # e.g. text to train a tokenizer on
ROLES = ("system", "developer", "user", "assistant", "tool")
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "model": "assistant", "system": "system", "tool": "tool",
                  "function": "tool", "observation": "tool"}


def load(spec, kind: str, where: str, seed: int = 42):
    """Load a `dataset:` block for a stage of the given kind -> (train, eval or None)."""
    sources = spec if isinstance(spec, list) else [spec]
    if not sources or not all(isinstance(s, dict) for s in sources):
        raise AlignError(f"{where}: expected a mapping with `path` (or a list of them for a mixture)")
    parts = []
    for i, source in enumerate(sources):
        at = f"{where}[{i}]" if isinstance(spec, list) else where
        check_keys(source, SOURCE_KEYS, where=at)
        ds = _load_source(source, at)
        ds = _to_trl(ds, source, kind, at)
        parts.append((at, source["path"], _weighted(ds, source.get("weight", 1.0), at, seed)))
    ds = _combine(parts, seed) if len(parts) > 1 else parts[0][2]
    test_size = sources[0].get("test_size")
    if not test_size:
        return ds, None
    if not (0 < test_size < 1) and not (isinstance(test_size, int) and 0 < test_size < len(ds)):
        raise AlignError(f"{where}.test_size: expected a fraction in (0, 1) or a row count below {len(ds)}")
    split = ds.train_test_split(test_size=test_size, seed=seed)
    return split["train"], split["test"]


def _load_source(source: dict, where: str):
    import datasets

    datasets.disable_progress_bars()  # per-file bars bury the messages that matter (also when imported early)
    path = source.get("path")
    if not path or not isinstance(path, str):
        raise AlignError(f"{where}.path: required (a file, a folder or a Hub dataset id)")
    split = source.get("split") or "train"
    local = Path(path)
    try:
        if local.is_file():
            check_file(local)
            builder = FILE_BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise AlignError(f"{where}.path: '{path}' has an unknown extension; use {', '.join(FILE_BUILDERS)}")
            ds = datasets.load_dataset(builder, data_files=str(local), split=split)
        elif local.is_dir():
            files = [f for f in sorted(local.rglob("*")) if f.suffix.lower() in FILE_BUILDERS]
            if not files:
                raise AlignError(f"{where}.path: folder '{path}' holds no {'/'.join(FILE_BUILDERS)} files")
            for f in files:
                check_file(f)
            builder = FILE_BUILDERS[files[0].suffix.lower()]
            ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split=split)
        elif looks_local(path):
            raise AlignError(f"{where}.path: file '{path}' does not exist")
        else:
            ds = datasets.load_dataset(path, source.get("name"), split=split, data_files=source.get("data_files"))
    except AlignError:
        raise
    except PermissionError:
        raise AlignError(f"{where}.path: cannot read '{path}': permission denied") from None
    except Exception as e:  # datasets raises many types; the message is what the user needs
        raise AlignError(f"{where}: cannot load '{path}' (split {split}): {first_line(e)}") from None
    if len(ds) == 0:
        raise AlignError(f"{where}.path: '{path}' (split {split}) has no rows")
    return ds


def looks_local(path: str) -> bool:
    # A Hub id is "owner/name" or "name"; anything with an extension or several slashes is a path.
    return path.startswith((".", "/", "~")) or Path(path).suffix.lower() in FILE_BUILDERS or path.count("/") > 1


def check_file(path: Path):
    """Fail early, naming the line, on unreadable or malformed JSON Lines files."""
    try:
        with open(path, "rb") as f:
            head = f.read(1)
            f.seek(0)
            if path.suffix.lower() == ".json" and head == b"[":
                json.load(f)
                return
            if not head:
                raise AlignError(f"{path}: the file is empty (no rows)")
            if path.suffix.lower() == ".parquet":
                size = f.seek(0, 2)
                if size < 8 or f.seek(-4, 2) < 0 or f.read(4) != b"PAR1":
                    raise AlignError(f"{path}: cannot load: not a parquet file (corrupt or truncated)")
                return
            if path.suffix.lower() not in (".jsonl", ".json"):
                return
            rows = 0
            for number, line in enumerate(f, 1):
                if line.strip():
                    rows += 1
                    try:
                        row = json.loads(line)
                    except ValueError as e:
                        raise AlignError(f"{path}: line {number}: malformed JSON ({e.args[0].split(':')[0]})") from None
                    if not isinstance(row, dict):
                        raise AlignError(f"{path}: line {number}: expected a JSON object {{column: value}}, "
                                         f"got {type(row).__name__}")
            if not rows:
                raise AlignError(f"{path}: no rows (only blank lines)")
    except PermissionError:
        raise AlignError(f"{path}: cannot read: permission denied") from None
    except ValueError as e:
        raise AlignError(f"{path}: malformed JSON ({e})") from None


# ---------------------------------------------------------------------------------------------
# One source onto one TRL format


class BadRows:
    """Problems found while checking every row; raised as one line naming the first and the count."""

    def __init__(self, where: str, path: str):
        self.where, self.path, self.found = where, path, []

    def add(self, row: int, field: str, problem: str):
        self.found.append((row + 1, field, problem))  # rows are counted from 1, like lines

    def raise_if_any(self):
        if self.found:
            row, field, problem = self.found[0]
            rows = len({r for r, _, _ in self.found})
            raise AlignError(f"{self.where}: {self.path}: {rows} bad row(s); first at row {row}, '{field}': {problem}")


def _to_trl(ds, source: dict, kind: str, where: str):
    """The source's rows checked and normalised onto one TRL format for `kind` (a `Dataset`
    holding only that format's columns, plus `margin` for preference data)."""
    columns = source.get("columns") or {}
    if not isinstance(columns, dict):
        raise AlignError(f"{where}.columns: expected a mapping from the file's column to TRL's, e.g. {{question: prompt}}")
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise AlignError(f"{where}.columns: column '{missing[0]}' is not in the data (it has {', '.join(ds.column_names)})")
    for old, new in columns.items():
        if not isinstance(new, str) or not new:
            raise AlignError(f"{where}.columns.{old}: expected a column name, got {new!r}")
        if new in ds.column_names and new != old and new not in columns:
            raise AlignError(f"{where}.columns.{old}: the data already has a column '{new}'; map that one away "
                             f"too (e.g. {{{new}: {new}_original}}) or drop this mapping")
    ds = ds.rename_columns({k: v for k, v in columns.items() if k != v})
    cols = set(ds.column_names)
    layout = source.get("format")
    if layout not in (None, "alpaca", "sharegpt"):
        raise AlignError(f"{where}.format: unknown format '{layout}'; use alpaca or sharegpt (or map columns)")
    match = next((f for f in FORMATS[kind] if f <= cols), None)
    if layout is None and match is None:
        layout = _community_layout(cols)
    if layout is not None and kind in ("preference", "text"):
        raise AlignError(f"{where}: {source['path']}: {layout} rows are conversations (SFT or prompt data); "
                         f"{kind} data needs {' or '.join('+'.join(sorted(f)) for f in FORMATS[kind])}")
    bad = BadRows(where, source["path"])
    if layout is not None:
        rows = _from_community(ds, layout, where, bad)
    elif match is None and kind == "prompt" and "messages" in cols:
        rows = {"messages": ds["messages"][:]}
    elif match is None:
        raise AlignError(_missing_columns(kind, cols, f"{where}: {source['path']}"))
    else:
        keep = sorted(match) + [c for c in OPTIONAL_COLUMNS.get(kind, []) if c in cols]
        rows = ds.select_columns(keep).to_dict()
    if kind == "prompt" and "messages" in rows:
        rows = {"prompt": _prompts_of(rows["messages"], bad)}
    bad.raise_if_any()
    rows = _check_rows(rows, kind, bad)
    bad.raise_if_any()
    if kind == "preference":
        rows = _drop_identical(rows, f"{where}: {source['path']}")
    from datasets import Dataset

    return Dataset.from_dict(rows)


def _community_layout(cols) -> str | None:
    if "conversations" in cols:
        return "sharegpt"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    return None


def _missing_columns(kind, cols, where) -> str:
    wanted = " or ".join("+".join(sorted(f)) for f in FORMATS[kind])
    return (f"{where}: missing column(s) for {kind} data: need {wanted}, the data has "
            f"{', '.join(sorted(cols)) or 'none'}; map yours with `columns: {{yours: theirs}}`")


def _from_community(ds, layout: str, where: str, bad: BadRows) -> dict:
    """ShareGPT or Alpaca rows as {"messages": [...]}."""
    if layout == "alpaca":
        for col in ("instruction", "output"):
            if col not in ds.column_names:
                raise AlignError(f"{where}: format alpaca needs columns instruction, input (optional), output; "
                                 f"'{col}' is missing")
        table = ds.to_dict()
        n = len(table["instruction"])
        messages = []
        for i in range(n):
            row = {k: table.get(k, [None] * n)[i] for k in ("system", "instruction", "input", "output")}
            for field in ("instruction", "output"):
                if not isinstance(row[field], str) or not row[field].strip():
                    bad.add(i, field, f"missing or empty (got {row[field]!r})")
            for field in ("input", "system"):
                if row[field] is not None and not isinstance(row[field], str):
                    bad.add(i, field, f"expected text, got {type(row[field]).__name__}")
            user = f"{row['instruction']}\n\n{row['input']}" if row["input"] else row["instruction"]
            messages.append(([{"role": "system", "content": row["system"]}] if row["system"] else [])
                            + [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}])
        return {"messages": messages}
    if "conversations" not in ds.column_names:
        raise AlignError(f"{where}: format sharegpt needs a 'conversations' column of {{from, value}} turns")
    messages = []
    for i, turns in enumerate(ds["conversations"][:]):
        if not isinstance(turns, list) or not turns:
            bad.add(i, "conversations", f"expected a non-empty list of {{from, value}} turns, got {_show(turns)}")
            messages.append([])
            continue
        converted = []
        for t, turn in enumerate(turns, 1):
            if isinstance(turn, dict) and turn.get("from") is None and turn.get("role") is not None:
                turn = {"from": turn["role"], "value": turn.get("content")}  # already role/content
            if not isinstance(turn, dict):
                bad.add(i, "conversations", f"turn {t} is {_show(turn)}, not a {{from, value}} mapping")
            elif SHAREGPT_ROLES.get(turn.get("from")) is None:
                bad.add(i, "conversations", f"turn {t} has unknown 'from': {turn.get('from')!r} "
                                            f"(known: {', '.join(SHAREGPT_ROLES)})")
            elif not isinstance(turn.get("value"), str):
                bad.add(i, "conversations", f"turn {t} has no text 'value' (got {_show(turn.get('value'))})")
            else:
                converted.append({"role": SHAREGPT_ROLES[turn["from"]], "content": turn["value"]})
        messages.append(converted)
    return {"messages": messages}


def _prompts_of(conversations: list, bad: BadRows) -> list:
    """Prompt data from conversations: the turns before the final assistant answer."""
    prompts = []
    for i, turns in enumerate(conversations):
        if isinstance(turns, list) and turns and isinstance(turns[-1], dict) and turns[-1].get("role") == "assistant":
            turns = turns[:-1]
        if isinstance(turns, list) and not turns:
            bad.add(i, "messages", "no turns before the assistant's answer to use as a prompt")
        prompts.append(turns)
    return prompts


def _check_rows(rows: dict, kind: str, bad: BadRows) -> dict:
    """Every row of every column: text or a list of {role, content} messages, the same in every
    row, non-empty, with an assistant turn where one is learned from. Returns the normalised
    columns (string prompts beside conversational answers become turns; conversational pairs get
    an explicit prompt)."""
    fields = [c for c in ("text", "prompt", "completion", "chosen", "rejected", "messages") if c in rows]
    shapes = {}  # column -> (shape, first row) of the column's first good value
    for i in range(len(rows[fields[0]])):
        for field in fields:
            value = rows[field][i]
            shape = _shape(value, field, i, bad)
            if shape is None:
                continue
            first = shapes.setdefault(field, (shape, i))
            if first[0] != shape:
                bad.add(i, field, f"holds {_NAMES[shape]} where row {first[1] + 1} holds {_NAMES[first[0]]}; "
                                  f"use one format per column")
    if bad.found:
        return rows
    if "margin" in rows:
        for i, value in enumerate(rows["margin"]):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                bad.add(i, "margin", f"expected a finite number, got {_show(value)}")
    answers = [f for f in fields if f in ("completion", "chosen", "rejected")]
    kinds = {shapes[f][0] for f in answers}
    if len(kinds) > 1:
        raise AlignError(f"{bad.where}: {bad.path}: {', '.join(answers)} mix text and message lists "
                         f"(e.g. '{answers[0]}' holds {_NAMES[shapes[answers[0]][0]]}, '{answers[-1]}' holds "
                         f"{_NAMES[shapes[answers[-1]][0]]}); use one format")
    chat_answers = kinds == {"chat"}
    if "prompt" in shapes and answers and shapes["prompt"][0] == "chat" and not chat_answers:
        raise AlignError(f"{bad.where}: {bad.path}: 'prompt' holds message lists but {', '.join(answers)} hold text; "
                         f"make the answers lists of assistant messages, or the prompt text")
    if chat_answers and kind == "preference":
        rows = _explicit_chat_prompts(rows, bad)
    elif chat_answers and shapes.get("prompt", ("chat",))[0] == "text":  # prompt text + completion messages
        rows = {**rows, "prompt": [[{"role": "user", "content": p}] for p in rows["prompt"]]}
    for field in ("messages", "completion", "chosen", "rejected"):
        if field in shapes and shapes[field][0] == "chat":
            for i, turns in enumerate(rows[field]):
                if not any(m["role"] == "assistant" and _has_text(m["content"]) for m in turns):
                    bad.add(i, field, "no assistant turn with text (nothing to learn from); add the answer or drop "
                                      "the row")
    return rows


_NAMES = {"text": "text", "chat": "a list of messages"}


def _shape(value, field: str, i: int, bad: BadRows) -> str | None:
    """"text" or "chat" for a good value; None (and a problem recorded) for a bad one."""
    if field == "text" and not isinstance(value, str):
        bad.add(i, field, f"expected text, got {_show(value)}")
        return None
    if isinstance(value, str):
        if not value.strip():
            bad.add(i, field, "empty text")
            return None
        return "text"
    if value is None:
        bad.add(i, field, "missing (null)")
        return None
    if not isinstance(value, list):
        bad.add(i, field, f"expected text or a list of {{role, content}} messages, got {type(value).__name__} "
                          f"({_show(value)})")
        return None
    if not value:
        bad.add(i, field, "an empty list of messages")
        return None
    for t, message in enumerate(value, 1):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            bad.add(i, field, f"turn {t} is not a {{role, content}} message ({_show(message)})")
            return None
        if message["role"] not in ROLES:
            bad.add(i, field, f"turn {t} has unknown role {message['role']!r} (roles: {', '.join(ROLES)})")
            return None
        if not isinstance(message["content"], (str, list)) and not (message["role"] == "assistant"
                                                                    and message.get("tool_calls")):
            bad.add(i, field, f"turn {t} ({message['role']}) has no text content (got {_show(message['content'])})")
            return None
    return "chat"


def _has_text(content) -> bool:
    return bool(content.strip()) if isinstance(content, str) else bool(content)


def _explicit_chat_prompts(rows: dict, bad: BadRows) -> dict:
    """Conversational pairs with an explicit list-of-messages prompt.

    A string prompt becomes a user turn, unless both answers start with non-assistant turns:
    then they carry the prompt themselves (UltraFeedback-binarized), and, as in TRL's
    `maybe_extract_prompt`, their shared leading turns are the prompt. Pairs without a prompt
    get the same split (what TRL's DPO trainer does)."""
    out = {"prompt": [], "chosen": [], "rejected": [], **({"margin": rows["margin"]} if "margin" in rows else {})}
    texts = rows.get("prompt")
    for i, (chosen, rejected) in enumerate(zip(rows["chosen"], rows["rejected"])):
        carries = chosen[0]["role"] != "assistant" and rejected[0]["role"] != "assistant"
        if texts is not None and isinstance(texts[i], list):
            prompt = texts[i]
        elif texts is not None and not carries:
            prompt = [{"role": "user", "content": texts[i]}]
        else:
            shared = 0
            while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
                shared += 1
            prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
            if not prompt:
                bad.add(i, "chosen", "chosen and rejected share no leading prompt turns; add a 'prompt' column or "
                                     "start both with the same user turn")
            elif not chosen or not rejected:
                bad.add(i, "chosen" if not chosen else "rejected",
                        "no answer after the shared prompt turns (chosen and rejected are identical there)")
                chosen = chosen or [{"role": "assistant", "content": ""}]
                rejected = rejected or [{"role": "assistant", "content": ""}]
        out["prompt"].append(prompt)
        out["chosen"].append(chosen)
        out["rejected"].append(rejected)
    return out


def _drop_identical(rows: dict, where: str) -> dict:
    """Pairs whose chosen equals rejected teach nothing: dropped, with a counted warning."""
    same = [i for i, (c, r) in enumerate(zip(rows["chosen"], rows["rejected"])) if c == r]
    if not same:
        return rows
    print(f"warning: {where}: dropped {len(same)} pair(s) whose chosen equals rejected (no preference signal)",
          flush=True)
    if len(same) == len(rows["chosen"]):
        raise AlignError(f"{where}: no usable preference pairs left after dropping identical ones")
    drop = set(same)
    return {k: [v for i, v in enumerate(values) if i not in drop] for k, values in rows.items()}


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ---------------------------------------------------------------------------------------------
# Mixtures


def _combine(parts: list, seed: int):
    """Concatenate normalised sources. Sources in different formats of the same kind are brought
    to one where nothing is lost (implicit text prompts extracted as TRL's DPO trainer does,
    conversational prompt + completion as messages, a missing `margin` as 0); anything else
    (text vs message lists, text vs prompt + completion) is refused naming both sources."""
    from datasets import concatenate_datasets

    formats = [_format_of(ds) for _, _, ds in parts]
    if len({f for f in formats}) > 1:
        parts = [(at, path, _unify(ds, formats)) for at, path, ds in parts]
        formats = [_format_of(ds) for _, _, ds in parts]
    first = parts[0]
    for (at, path, ds), fmt in zip(parts, formats):
        if fmt != formats[0]:
            raise AlignError(f"{first[0]} ({first[1]}: {_describe(formats[0])}) and {at} ({path}: {_describe(fmt)}) "
                             f"cannot be mixed: a stage trains on one format; convert one source so both are "
                             f"text or both are message lists")
    try:
        ds = concatenate_datasets([d for _, _, d in parts])
    except ValueError:
        ds = concatenate_datasets([parts[0][2]] + [d.cast(parts[0][2].features) for _, _, d in parts[1:]])
    return ds.shuffle(seed=seed)


def _format_of(ds) -> tuple:
    row = ds[0]
    columns = tuple(sorted(ds.column_names))
    return columns, next((isinstance(v, list) for k, v in row.items() if k != "margin"), False)


def _describe(fmt) -> str:
    columns, chat = fmt
    names = [c for c in columns if c != "margin"]
    if names in (["text"], ["messages"]):
        return names[0]
    return f"{'+'.join(names)} as {'message lists' if chat else 'text'}"


def _unify(ds, formats):
    columns = set().union(*(set(c) for c, _ in formats))
    chat = {c for _, c in formats}
    if "margin" in columns and "margin" not in ds.column_names:
        ds = ds.add_column("margin", [0.0] * len(ds))
    if "prompt" in columns and {"chosen", "rejected"} <= set(ds.column_names) and "prompt" not in ds.column_names \
            and chat == {False}:
        from trl.data_utils import extract_prompt

        ds = ds.map(extract_prompt)
    if "messages" in columns and chat == {True} and "completion" in ds.column_names:
        ds = ds.map(lambda row: {"messages": row["prompt"] + row["completion"]}, remove_columns=["prompt", "completion"])
    return ds


def _weighted(ds, weight, where: str, seed: int):
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
        raise AlignError(f"{where}.weight: expected a positive number, got {weight!r}")
    if weight == 1:
        return ds
    n = max(1, round(weight * len(ds)))
    indices = [i % len(ds) for i in range(n)]
    return ds.shuffle(seed=seed).select(indices)


# ---------------------------------------------------------------------------------------------
# Reading rows for evaluation and tokenizers


def texts_of(ds, limit: int | None = None):
    """Plain text from any format, e.g. to train a tokenizer on a stage's data."""
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            return
        for value in row.values():
            if isinstance(value, str):
                yield value
            elif isinstance(value, list):
                for m in value:
                    if isinstance(m, dict) and isinstance(m.get("content"), str):
                        yield m["content"]


def read_rows(spec, kind: str, where: str, limit: int | None = None) -> list[dict]:
    """Rows of a dataset block (or a plain path) as dicts, e.g. held-out prompts or pairs."""
    if isinstance(spec, str):
        spec = {"path": spec}
    ds, _ = load(spec, kind, where)
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    return [dict(r) for r in ds]


def first_unrenderable(ds, tokenizer) -> str | None:
    """"<row>: <why>" for the first row whose conversations the tokenizer's chat template
    refuses (e.g. "System role not supported"), or None. Called only after a trainer failed, to
    name the row TRL could not say."""
    if ds is None or not hasattr(ds, "column_names"):
        return None
    columns = [c for c in ("messages", "prompt", "completion", "chosen", "rejected") if c in ds.column_names]
    for i, row in enumerate(ds):
        prompt = row.get("prompt") if isinstance(row.get("prompt"), list) else []
        for column in columns:
            value = row[column]
            if not isinstance(value, list):
                continue
            turns = value if column in ("messages", "prompt") else prompt + value
            try:
                tokenizer.apply_chat_template(turns, tokenize=False)
            except Exception as e:  # noqa: BLE001  (jinja2's and templates' own raise_exception)
                return (f"row {i + 1} of the training split ({_show(turns[0].get('content'))}), '{column}': the "
                        f"model's chat template refuses it: {first_line(e)}")
    return None
