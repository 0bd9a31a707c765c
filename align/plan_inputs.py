"""What the planner reads from a recipe without loading a model or a dataset: model configs (local
folders, adapters, Hub ids, and the configs stages that have not run yet will write), dataset rows,
and token lengths (a sample of a local data file through the model's tokenizer, when both exist).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any, Mapping

from align.errors import first_line

#: Rows of a data file tokenized to estimate sequence lengths.
LENGTH_SAMPLE = 512


def key(path) -> str:
    return str(Path(str(path)))


class Configs:
    """Model configs by path: local folders and adapters from disk, outputs of stages not run yet
    from what they will hold, Hub ids through ``AutoConfig`` (online only)."""

    def __init__(self, recipe):
        self.recipe = recipe
        self.future: dict[str, Any] = {}  # stage folder -> config it will hold (None: unknown)
        self.errors: dict[str, str] = {}
        self.cache: dict[str, Any] = {}

    def get(self, path: str, depth: int = 0):
        """(config or None, note or None)."""
        k = key(path)
        if k in self.cache:
            return self.cache[k], self.errors.get(k)
        folder = Path(path).expanduser()
        config, note = None, None
        if (folder / "config.json").is_file():
            config, note = self._auto(str(folder))
        elif (folder / "adapter_config.json").is_file() and depth < 5:
            try:
                base = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
            except (OSError, ValueError, KeyError) as e:
                note = f"unreadable adapter_config.json in '{path}': {first_line(e)}"
            else:
                config, note = self.get(base, depth + 1)
        elif k in self.future:
            config = self.future[k]
            if config is None:
                note = f"the model '{path}' will hold is unknown (its stage has no config)"
        elif folder.exists() or str(path).startswith((".", "/", "~")) or str(path).count("/") > 1:
            note = f"'{path}' has no config.json (not a model folder)"
        else:
            config, note = self._auto(str(path), hub=True)
        self.cache[k] = config
        if note:
            self.errors[k] = note
        return config, note

    def _auto(self, path: str, hub: bool = False):
        from transformers import AutoConfig

        model = self.recipe.model or {}
        kwargs = {"trust_remote_code": bool(model.get("trust_remote_code", False))}
        if hub and model.get("revision") and path == model.get("name_or_path"):
            kwargs["revision"] = model["revision"]
        try:
            return AutoConfig.from_pretrained(path, **kwargs), None
        except Exception as e:  # noqa: BLE001  (offline, gated, missing...)
            what = "Hub config" if hub else "config"
            return None, f"cannot read the {what} of '{path}' (offline?): {first_line(e)}"


def init_config(stage):
    """The LlamaConfig an ``init`` stage will write (vocab_size = the tokenizer's target size)."""
    import dataclasses

    from transformers import LlamaConfig

    cfg = stage.config()
    sizes = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
             if f.name != "tokenizer_samples" and getattr(cfg, f.name) is not None}
    return LlamaConfig(**sizes)


def seq_cls_config(config):
    """The config a fully fine-tuned reward model built on ``config`` saves (one label)."""
    import copy

    out = copy.deepcopy(config)
    arch = (getattr(config, "architectures", None) or [type(config).__name__.replace("Config", "ForCausalLM")])[0]
    out.architectures = [arch.replace("ForCausalLM", "ForSequenceClassification")]
    out.num_labels = 1
    return out


# --------------------------------------------------------------------------- dataset rows


def _file_rows(path: Path) -> int | None:
    """Rows in a local data file, counted without loading it (None when unsure)."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".jsonl":
            with open(path, "rb") as f:
                return sum(1 for line in f if line.strip())
        if suffix == ".json":
            with open(path) as f:
                try:
                    value = json.load(f)
                except ValueError:  # JSON Lines under a .json name
                    f.seek(0)
                    return sum(1 for line in f if line.strip())
            return len(value) if isinstance(value, list) else None
        if suffix == ".csv":
            import csv

            with open(path, newline="") as f:
                return max(sum(1 for _ in csv.reader(f)) - 1, 0)
        if suffix == ".txt":
            with open(path, "rb") as f:
                return sum(1 for _ in f)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.ParquetFile(path).metadata.num_rows
    except (OSError, ImportError, ValueError):
        return None
    return None


def _sources(spec) -> list[dict] | None:
    sources = spec if isinstance(spec, list) else [spec]
    if not sources or not all(isinstance(s, dict) and isinstance(s.get("path"), str) and not s.get("data_files")
                              for s in sources):
        return None
    return sources


def dataset_rows(spec, known: Mapping[str, int] | None = None) -> int | None:
    """Training rows of a recipe ``dataset:`` block (one source or a mixture), or None when it
    cannot be told without loading it (Hub datasets, folders). ``known`` maps file paths that do
    not exist yet (written by an earlier ``task`` stage) to their row counts. Mixture weights,
    ``split: train[:N]`` / ``[:N%]`` and ``test_size`` are applied."""
    known = known or {}
    sources = _sources(spec)
    if sources is None:
        return None
    total = 0.0
    for source in sources:
        local = Path(source["path"]).expanduser()
        n = _file_rows(local) if local.is_file() else known.get(key(source["path"]))
        if n is None:
            return None
        match = re.fullmatch(r"\s*\w+\s*\[\s*:\s*(\d+)\s*(%?)\s*\]\s*", str(source.get("split") or ""))
        if match:
            cut = int(match.group(1))
            n = min(n, round(n * cut / 100) if match.group(2) else cut)
        total += n * float(source.get("weight", 1.0) or 0.0)
    test_size = sources[0].get("test_size")
    if isinstance(test_size, (int, float)) and test_size > 0:
        total -= total * test_size if test_size < 1 else test_size
    return max(int(total), 0)


# --------------------------------------------------------------------------- token lengths


def _sample_rows(spec, limit: int = LENGTH_SAMPLE) -> list[dict] | None:
    """The first rows of the first source when it is a local JSON Lines file, else None."""
    sources = _sources(spec)
    if sources is None:
        return None
    path = Path(sources[0]["path"]).expanduser()
    if not path.is_file() or path.suffix.lower() not in (".jsonl", ".json"):
        return None
    rows = []
    try:
        with open(path) as f:
            for line in f:
                if line.strip():
                    rows.append(json.loads(line))
                if len(rows) >= limit:
                    break
    except (OSError, ValueError):
        return None
    return rows if rows and all(isinstance(r, dict) for r in rows) else None


def _tokenizer(folder: str):
    if not (Path(folder) / "tokenizer_config.json").is_file():
        return None
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(folder)
    except Exception:  # noqa: BLE001  (an unreadable tokenizer only costs the estimate its precision)
        return None


def _counter(tok):
    def count(value, generation_prompt: bool = False) -> int:
        if not isinstance(value, list):
            return len(tok(value)["input_ids"])
        # conversational: through the chat template, as TRL applies it
        text = tok.apply_chat_template(value, tokenize=False, add_generation_prompt=generation_prompt)
        return len(tok(text, add_special_tokens=False)["input_ids"])
    return count


def token_lengths(spec, tokenizer_folder: str) -> dict[str, list[int]] | None:
    """Token lengths of a sample of a local dataset, through the tokenizer in ``tokenizer_folder``
    (None when either is missing). Keys, by the columns found: ``sequence`` (a whole training
    example: text, prompt + completion, messages; for pairs prompt + chosen and prompt + rejected),
    ``prompt`` (with the generation prompt) and ``reply`` (completion, the assistant's last
    turn, or chosen: what a policy trained on it learns to generate)."""
    rows = _sample_rows(spec)
    tok = _tokenizer(tokenizer_folder) if rows else None
    if tok is None:
        return None
    count = _counter(tok)
    out: dict[str, list[int]] = {"sequence": [], "prompt": [], "reply": []}
    try:
        for row in rows:
            if "messages" in row:
                msgs = row["messages"]
                whole, before = count(msgs), count(msgs[:-1], True) if len(msgs) > 1 else 0
                out["sequence"].append(whole)
                out["reply"].append(whole - before)
            elif "text" in row:
                out["sequence"].append(count(row["text"]))
            elif "prompt" in row:
                prompt = count(row["prompt"], True)
                out["prompt"].append(prompt)
                for col in ("completion", "chosen", "rejected"):
                    if col in row:
                        value = row[col]
                        whole = count(row["prompt"] + value) if isinstance(value, list) else prompt + count(value)
                        out["sequence"].append(whole)
                        if col != "rejected":
                            out["reply"].append(whole - prompt)
    except Exception:  # noqa: BLE001  (rows the template rejects: fall back to the configured lengths)
        return None
    return {k: v for k, v in out.items() if v} or None


def padded_length(lengths: list[int], batch: int, cap: int | None = None, draws: int = 400) -> float:
    """Expected length of a batch padded to its longest member: the mean, over random batches of
    ``batch`` lengths from ``lengths``, of ``min(cap, max(batch))`` (TRL's collators pad to the
    longest sequence; generation runs until the longest reply ends)."""
    rng = random.Random(0)
    cap = cap or 10**9
    return sum(min(cap, max(rng.choices(lengths, k=batch))) for _ in range(draws)) / draws
