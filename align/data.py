"""Datasets for every stage, loaded through `datasets` and mapped onto TRL's formats.

A recipe `dataset:` block is one source or a list of sources (a weighted mixture):

    dataset:
      path: data/sft.jsonl        # jsonl/json/csv/parquet file, a folder, or a Hub id
      name: null                  # Hub config name
      split: train[:1000]         # any `datasets` split expression
      columns: {question: prompt, answer: completion}   # rename onto TRL's column names
      format: alpaca              # or sharegpt: common community layouts
      weight: 1.0                 # mixtures: rows taken = weight x rows (above 1 repeats rows)
      test_size: 0.05             # held-out fraction for evaluation (first source, or the block)

Stage kinds and the TRL formats they accept:
  lm          text | prompt + completion | messages   (SFT; pretrain takes text)
  preference  chosen + rejected, with an explicit `prompt` or an implicit one (shared prefix)
  prompt      prompt                                   (PPO, RLOO, GRPO, eval)
Each may be standard (strings) or conversational (lists of {role, content}).
"""

from __future__ import annotations

import json
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
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system", "model": "assistant"}


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
        parts.append(_weighted(ds, source.get("weight", 1.0), at, seed))
    from datasets import concatenate_datasets

    keep = set.intersection(*(set(p.column_names) for p in parts))
    ds = concatenate_datasets([p.select_columns(sorted(keep)) for p in parts]) if len(parts) > 1 else parts[0]
    if len(parts) > 1:
        ds = ds.shuffle(seed=seed)
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
                        json.loads(line)
                    except ValueError as e:
                        raise AlignError(f"{path}: line {number}: malformed JSON ({e.args[0].split(':')[0]})") from None
            if not rows:
                raise AlignError(f"{path}: no rows (only blank lines)")
    except PermissionError:
        raise AlignError(f"{path}: cannot read: permission denied") from None
    except ValueError as e:
        raise AlignError(f"{path}: malformed JSON ({e})") from None


# ---------------------------------------------------------------------------------------------
# Mapping onto TRL's formats


def _to_trl(ds, source: dict, kind: str, where: str):
    columns = source.get("columns") or {}
    if not isinstance(columns, dict):
        raise AlignError(f"{where}.columns: expected a mapping from the file's column to TRL's, e.g. {{question: prompt}}")
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise AlignError(f"{where}.columns: column '{missing[0]}' is not in the data (it has {', '.join(ds.column_names)})")
    ds = ds.rename_columns({k: v for k, v in columns.items() if k != v})
    fmt = source.get("format")
    if fmt == "alpaca":
        ds = _from_alpaca(ds, where)
    elif fmt == "sharegpt":
        ds = _from_sharegpt(ds, where)
    elif fmt is not None:
        raise AlignError(f"{where}.format: unknown format '{fmt}'; use alpaca or sharegpt (or map columns)")
    return check_format(ds, kind, where)


def _from_alpaca(ds, where):
    for col in ("instruction", "output"):
        if col not in ds.column_names:
            raise AlignError(f"{where}: format alpaca needs columns instruction, input (optional), output; '{col}' is missing")

    def convert(row):
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        messages = ([{"role": "system", "content": row["system"]}] if row.get("system") else [])
        return {"messages": messages + [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}

    return ds.map(convert, remove_columns=ds.column_names)


def _from_sharegpt(ds, where):
    if "conversations" not in ds.column_names:
        raise AlignError(f"{where}: format sharegpt needs a 'conversations' column of {{from, value}} turns")

    def convert(row):
        turns = []
        for turn in row["conversations"]:
            role = SHAREGPT_ROLES.get(turn.get("from"))
            if role is None:
                raise AlignError(f"{where}: sharegpt turn with unknown 'from': {turn.get('from')!r}")
            turns.append({"role": role, "content": turn["value"]})
        return {"messages": turns}

    return ds.map(convert, remove_columns=ds.column_names)


def check_format(ds, kind: str, where: str):
    """Require one of the column sets TRL accepts for this kind, with the right value types."""
    cols = set(ds.column_names)
    match = next((f for f in FORMATS[kind] if f <= cols), None)
    if match is None:
        wanted = " or ".join("+".join(sorted(f)) for f in FORMATS[kind])
        hint = ""
        if {"instruction", "output"} <= cols:
            hint = "; set `format: alpaca`"
        elif "conversations" in cols:
            hint = "; set `format: sharegpt`"
        else:
            hint = "; map yours with `columns: {yours: theirs}`"
        raise AlignError(f"{where}: missing column(s) for {kind} data: need {wanted}, the data has "
                         f"{', '.join(sorted(cols)) or 'none'}{hint}")
    row = ds[0]
    for col in match:
        value = row[col]
        if value is not None and not (isinstance(value, str) or _is_messages(value)):
            raise AlignError(f"{where}: column '{col}' must hold text or a list of {{role, content}} messages, "
                             f"got {type(value).__name__} ({str(value)[:40]!r})")
    extra = [c for c in OPTIONAL_COLUMNS.get(kind, []) if c in cols]
    ds = ds.select_columns(sorted(match) + extra)
    return check_preferences(ds, where) if kind == "preference" else ds


def check_preferences(ds, where: str):
    """Reject pairs that cannot teach a preference; drop identical pairs with a warning.

    Errors: a missing or empty side, or a prompt whose format (text vs messages) contradicts the
    answers'. Warning: chosen == rejected (no signal either way), those rows are dropped.
    """
    empty, mixed, same = [], [], []
    for i, row in enumerate(ds):
        chosen, rejected = row["chosen"], row["rejected"]
        if _blank(chosen) or _blank(rejected) or ("prompt" in row and _blank(row["prompt"])):
            empty.append(i)
            continue
        kinds = {isinstance(v, str) for k, v in row.items() if k in ("prompt", "chosen", "rejected")}
        if len(kinds) > 1:
            mixed.append(i)
        elif chosen == rejected:
            same.append(i)
    if empty:
        raise AlignError(f"{where}: {len(empty)} preference row(s) have a missing or empty prompt/chosen/rejected "
                         f"(first at row {empty[0]}); remove or fill them")
    if mixed:
        raise AlignError(f"{where}: {len(mixed)} row(s) mix text and message lists across prompt/chosen/rejected "
                         f"(first at row {mixed[0]}); use one format: all strings or all lists of messages")
    if same:
        print(f"warning: {where}: dropped {len(same)} pair(s) whose chosen equals rejected (no preference signal)",
              flush=True)
        keep = set(range(len(ds))) - set(same)
        ds = ds.select(sorted(keep))
        if len(ds) == 0:
            raise AlignError(f"{where}: no usable preference pairs left after dropping identical ones")
    return ds


def _blank(value) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    return not value or any(not str(m.get("content") or "").strip() for m in value if m.get("role") == "assistant")


def _is_messages(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)


def _weighted(ds, weight, where: str, seed: int):
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or weight <= 0:
        raise AlignError(f"{where}.weight: expected a positive number, got {weight!r}")
    if weight == 1:
        return ds
    n = max(1, round(weight * len(ds)))
    indices = [i % len(ds) for i in range(n)]
    return ds.shuffle(seed=seed).select(indices)


def texts_of(ds, limit: int | None = None):
    """Plain text from any format, e.g. to train a tokenizer on a stage's data."""
    for i, row in enumerate(ds):
        if limit is not None and i >= limit:
            return
        for value in row.values():
            if isinstance(value, str):
                yield value
            elif _is_messages(value):
                for m in value:
                    yield m["content"]


def read_rows(spec, kind: str, where: str, limit: int | None = None) -> list[dict]:
    """Rows of a dataset block (or a plain path) as dicts, e.g. held-out prompts or pairs."""
    if isinstance(spec, str):
        spec = {"path": spec}
    ds, _ = load(spec, kind, where)
    if limit:
        ds = ds.select(range(min(limit, len(ds))))
    return [dict(r) for r in ds]
