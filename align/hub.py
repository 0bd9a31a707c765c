"""Publish a stage output to the Hugging Face Hub, with a generated model card.

Two public entry points:

* :func:`build_model_card` renders ``README.md`` (YAML front matter + what the model is, how it
  was trained, its eval metrics, how to load it and the resolved recipe).
* :func:`push_folder` creates the repo (``exist_ok``) and commits the model files of a stage
  folder in one commit, retrying transient failures, and raises :class:`HubPushError` (one
  line, never the token) when it gives up.

Notes on ``huggingface_hub`` (written against 2.4, works with the 1.x API too):

* ``HF_ENDPOINT`` is copied into ``huggingface_hub.constants.ENDPOINT`` once, when the package
  is imported.  We resolve the endpoint at call time (argument, then ``HF_ENDPOINT``, then the
  import-time constant) and hand it to ``HfApi(endpoint=...)``, which threads it through every
  request of ``create_repo``/``create_commit`` (repo creation, README validation, preupload,
  LFS/Xet upload, commit).  Setting ``HF_ENDPOINT`` after import therefore works for pushes.
* Other switches (``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_XET``, ``HF_TOKEN_PATH``...) are also
  read at import time into ``huggingface_hub.constants``; only ``HF_TOKEN`` is read per call.
* We call ``create_commit`` rather than ``upload_folder``: we choose the files ourselves, the
  card goes up from memory (local files are never written), and with ``hf_xet`` installed
  ``upload_folder`` switches to a multi-commit pipeline that retries commits on its own.
  ``create_commit`` posts the commit once, so the retry policy below is the only one for it
  (the ``preupload`` and LFS calls have their own short internal backoff in huggingface_hub).
* Whether a file travels inline (base64 in the commit NDJSON) or through LFS/Xet is decided by
  the server's ``preupload`` answer; on huggingface.co ``*.safetensors`` go through Xet when
  ``hf_xet`` is installed, otherwise through the LFS batch API.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Iterable

import yaml

from align.errors import AlignError

__all__ = [
    "HubPushError",
    "build_model_card",
    "card_metrics",
    "hub_endpoint",
    "push_command",
    "push_folder",
    "push_model",
    "push_stage",
    "select_model_files",
    "stage_summaries",
]

logger = logging.getLogger(__name__)

DEFAULT_COMMIT_MESSAGE = "Upload model trained with align"
_MAX_BACKOFF_S = 30.0
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})

# Files a model repo needs, matched on the file name (top level of the stage folder only).
_MODEL_FILE_NAMES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "adapter_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "vocab.txt",
        "merges.txt",
        "tokenizer.model",
        "spiece.model",
        "sentencepiece.bpe.model",
        "chat_template.jinja",
        "chat_template.json",
        "preprocessor_config.json",
        "README.md",
    }
)
_MODEL_FILE_SUFFIXES = (".safetensors", ".safetensors.index.json")
# Never uploaded, whatever their extension: training state, not model.
_EXCLUDED_PREFIXES = ("optimizer", "scheduler", "rng_state", "trainer_state", "training_args", "checkpoint")

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]{0,95}(/[A-Za-z0-9][\w.\-]{0,95})?$")
_DATA_FILE_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet", ".arrow", ".txt", ".yaml", ".yml")


class HubPushError(AlignError):
    """Pushing to the Hub failed; the message names the repo and the cause, never the token."""

    def __init__(self, message: str, *, repo_id: str, status: int | None = None, attempts: int = 0):
        super().__init__(message)
        self.repo_id = repo_id
        self.status = status
        self.attempts = attempts


# --------------------------------------------------------------------------- model card


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _looks_like_hub_id(value: Any) -> bool:
    """True for ``owner/name`` or ``name`` ids; False for local paths and data files."""
    if not isinstance(value, str) or not _HUB_ID_RE.match(value):
        return False
    if ".." in value or value.lower().endswith(_DATA_FILE_SUFFIXES):
        return False
    return not os.path.exists(value)


def _dataset_names(dataset: Any) -> list[str]:
    """Dataset identifiers from a stage summary's ``dataset`` (a string, a mapping or a list)."""
    if dataset is None:
        return []
    if isinstance(dataset, str):
        return [dataset]
    if isinstance(dataset, dict):
        for key in ("name", "path", "id", "repo_id", "dataset"):
            if isinstance(dataset.get(key), str):
                return [dataset[key]]
        return []
    if isinstance(dataset, (list, tuple)):
        return [name for item in dataset for name in _dataset_names(item)]
    return [str(dataset)]


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt_value(v) for v in value) + "]"
    return str(value)


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\r", " ").replace("\n", " ").strip() or "–"


_SUMMARY_CORE_KEYS = ("name", "type", "dataset")


def _stage_hyperparameters(summary: dict) -> dict:
    params = summary.get("hyperparameters")
    if isinstance(params, dict):
        return params
    return {k: v for k, v in summary.items() if k not in _SUMMARY_CORE_KEYS}


def _fence(text: str, lang: str) -> str:
    fence = "```"
    while fence in text:
        fence += "`"
    return f"{fence}{lang}\n{text.rstrip()}\n{fence}"


def _detect_layout(stage_dir: Path) -> dict:
    """What the stage folder holds: adapter or full model, causal LM or sequence classifier."""
    adapter_cfg_path = stage_dir / "adapter_config.json"
    config_path = stage_dir / "config.json"
    has_adapter = adapter_cfg_path.is_file()
    has_full = config_path.is_file() and any(
        p.name.endswith(".safetensors") and not p.name.startswith("adapter_") for p in stage_dir.iterdir()
    )
    adapter_cfg = _read_json(adapter_cfg_path) if has_adapter else {}
    config = _read_json(config_path) if config_path.is_file() else {}
    architectures = config.get("architectures") or []
    seq_cls = adapter_cfg.get("task_type") == "SEQ_CLS" or any(
        str(a).endswith("ForSequenceClassification") for a in architectures
    )
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json"}
    has_tokenizer = any((stage_dir / name).is_file() for name in tokenizer_files)
    tok_cfg = _read_json(stage_dir / "tokenizer_config.json")
    has_chat_template = bool(tok_cfg.get("chat_template")) or (stage_dir / "chat_template.jinja").is_file()
    return {
        "adapter": has_adapter and not has_full,
        "has_adapter_files": has_adapter,
        "has_full_files": has_full,
        "adapter_config": adapter_cfg,
        "config": config,
        "seq_cls": seq_cls,
        "has_tokenizer": has_tokenizer,
        "has_chat_template": has_chat_template,
    }


def _load_snippet(*, repo_id: str, base_model: str | None, adapter: bool, classifier: bool,
                  tokenizer_in_repo: bool, chat_template: bool, num_labels: int) -> str:
    model_cls = "AutoModelForSequenceClassification" if classifier else "AutoModelForCausalLM"
    lines: list[str] = []
    if classifier:
        lines.append("import torch")
    if adapter:
        lines.append("from peft import PeftModel")
    lines.append(f"from transformers import {model_cls}, AutoTokenizer")
    lines.append("")
    if adapter:
        base = base_model or "<base-model-id>"
        lines.append(f"base_model_id = {json.dumps(base)}")
        lines.append(f"adapter_id = {json.dumps(repo_id)}")
        tok_source = "adapter_id" if tokenizer_in_repo else "base_model_id"
        lines.append(f"tokenizer = AutoTokenizer.from_pretrained({tok_source})")
        if classifier:
            lines.append(
                f"model = {model_cls}.from_pretrained(base_model_id, num_labels={num_labels}, dtype=\"auto\")"
            )
        else:
            lines.append(f"model = {model_cls}.from_pretrained(base_model_id, dtype=\"auto\")")
        lines.append("model = PeftModel.from_pretrained(model, adapter_id)  # attach the trained adapter")
        lines.append("# Optional: fold the adapter into the base weights for faster inference.")
        lines.append("# model = model.merge_and_unload()")
    else:
        lines.append(f"model_id = {json.dumps(repo_id)}")
        lines.append("tokenizer = AutoTokenizer.from_pretrained(model_id)")
        lines.append(f"model = {model_cls}.from_pretrained(model_id, dtype=\"auto\")")
    lines.append("model.eval()")
    lines.append("")
    if classifier:
        lines.append("# A reward model scores a whole (prompt + response) text; higher means preferred.")
        if chat_template:
            lines.append('messages = [{"role": "user", "content": "What is 2 + 2?"},')
            lines.append('            {"role": "assistant", "content": "2 + 2 = 4."}]')
            lines.append("text = tokenizer.apply_chat_template(messages, tokenize=False)")
        else:
            lines.append('text = "Question: What is 2 + 2? Answer: 2 + 2 = 4."')
        lines.append('inputs = tokenizer(text, return_tensors="pt")')
        lines.append("with torch.no_grad():")
        lines.append("    score = model(**inputs).logits[0, 0].item()")
        lines.append("print(score)")
    else:
        if chat_template:
            lines.append('messages = [{"role": "user", "content": "What is 2 + 2?"}]')
            lines.append(
                "inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, "
                'return_dict=True, return_tensors="pt")'
            )
        else:
            lines.append('inputs = tokenizer("What is 2 + 2?", return_tensors="pt")')
        lines.append("outputs = model.generate(**inputs, max_new_tokens=32)")
        lines.append('print(tokenizer.decode(outputs[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))')
    return "\n".join(lines)


def _framework_versions() -> list[tuple[str, str]]:
    found = []
    for dist in ("align-rlhf", "transformers", "peft", "trl", "torch", "huggingface_hub"):
        try:
            found.append((dist, metadata.version(dist)))
        except metadata.PackageNotFoundError:
            continue
    return found


def build_model_card(
    stage_dir: str | os.PathLike,
    *,
    repo_id: str,
    base_model: str | None,
    stage_summaries: list[dict],
    metrics: dict | None,
    recipe_text: str | None,
    merged: bool,
) -> str:
    """Render the ``README.md`` for a stage output folder.

    ``stage_summaries`` lists the run's stages in order, each a dict with ``name``, ``type``,
    ``dataset`` (a string, a mapping with ``name``/``path``, or a list) and either a
    ``hyperparameters`` dict or the key hyperparameters as extra keys.  ``metrics`` is a flat
    mapping of floats (``None``: read ``metrics.json`` from the folder).  ``merged`` says a LoRA
    adapter was merged into the base weights, so the folder is a full model.
    """
    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        raise AlignError(f"cannot build a model card: {stage_dir} is not a directory")
    layout = _detect_layout(stage_dir)
    if not (layout["has_adapter_files"] or layout["has_full_files"]):
        raise AlignError(
            f"cannot build a model card: {stage_dir} holds neither a PEFT adapter (adapter_config.json) "
            "nor a full model (config.json + *.safetensors)"
        )
    if merged and not layout["has_full_files"]:
        raise AlignError(
            f"cannot build a model card: merged=True but {stage_dir} only holds adapter files; "
            "merge the adapter into the base model before pushing"
        )
    adapter = layout["adapter"]
    summaries = [dict(s) for s in (stage_summaries or [])]
    this_stage = next((s for s in summaries if s.get("name") == stage_dir.name), summaries[-1] if summaries else {})
    classifier = layout["seq_cls"] or this_stage.get("type") == "reward"
    if metrics is None:
        metrics = _read_json(stage_dir / "metrics.json")
    if base_model is None and adapter:
        base_model = layout["adapter_config"].get("base_model_name_or_path") or None
    name = repo_id.split("/")[-1]

    stage_types: list[str] = []
    for s in summaries:
        t = s.get("type")
        if isinstance(t, str) and t and t not in stage_types:
            stage_types.append(t)
    tags = ["align", "trl", *[t for t in stage_types if t not in ("align", "trl")]]
    peft_type = str(layout["adapter_config"].get("peft_type", "")).upper()
    if adapter and peft_type == "LORA":
        tags.append("lora")
    if classifier and "reward-model" not in tags:
        tags.append("reward-model")

    datasets: list[str] = []
    for s in summaries:
        for ds in _dataset_names(s.get("dataset")):
            if _looks_like_hub_id(ds) and ds not in datasets:
                datasets.append(ds)

    front: dict[str, Any] = {"library_name": "peft" if adapter else "transformers"}
    if base_model and _looks_like_hub_id(base_model):
        front["base_model"] = base_model
    front["tags"] = tags
    if datasets:
        front["datasets"] = datasets
    front["pipeline_tag"] = "text-classification" if classifier else "text-generation"
    front_matter = yaml.safe_dump(front, sort_keys=False, allow_unicode=True, default_flow_style=False)

    # -- what it is
    if base_model:
        base_ref = f"[`{base_model}`](https://huggingface.co/{base_model})" if _looks_like_hub_id(base_model) else f"`{base_model}`"
    else:
        base_ref = "its base model"
    kind = "reward model (a sequence classifier that outputs one scalar score per text)" if classifier else "causal language model"
    pipeline = " → ".join(f"{s.get('name', '?')} ({s.get('type', '?')})" for s in summaries) or "unknown"
    if adapter:
        adapter_kind = "LoRA adapter" if peft_type == "LORA" else f"{peft_type or 'PEFT'} adapter"
        what = (f"This repository holds a {adapter_kind} (PEFT) for {base_ref}, trained as a {kind}. "
                "It contains only the adapter weights: load the base model first, then attach the adapter.")
        cfg = layout["adapter_config"]
        details = [f"{k}={_fmt_value(cfg[k])}" for k in ("r", "lora_alpha", "lora_dropout", "target_modules") if k in cfg]
        if details:
            what += f" Adapter settings: {', '.join(details)}."
    elif merged:
        what = (f"This repository holds the full weights of a {kind} fine-tuned from {base_ref}; "
                "the LoRA adapter trained by align was merged into the base weights, so no PEFT is needed to load it.")
    else:
        what = f"This repository holds the full weights of a {kind} fine-tuned from {base_ref}."

    out: list[str] = ["---", front_matter.rstrip(), "---", "", f"# {name}", "", what, "",
                      f"It was trained with align (YAML recipes over TRL), stages: {pipeline}.", ""]

    # -- how it was trained
    out += ["## Training procedure", ""]
    if summaries:
        out += ["| # | Stage | Type | Dataset | Key hyperparameters |", "|---|---|---|---|---|"]
        for i, s in enumerate(summaries, 1):
            params = _stage_hyperparameters(s)
            hp = ", ".join(f"{k}={_fmt_value(v)}" for k, v in params.items()) if params else "–"
            ds = ", ".join(_dataset_names(s.get("dataset"))) or "–"
            out.append(f"| {i} | {_cell(s.get('name', '?'))} | {_cell(s.get('type', '?'))} | {_cell(ds)} | {_cell(hp)} |")
    else:
        out.append("No stage information was recorded.")
    out.append("")

    # -- eval metrics
    out += ["## Evaluation", ""]
    if metrics:
        out += ["| Metric | Value |", "|---|---|"]
        for key, value in metrics.items():
            out.append(f"| {_cell(key)} | {_cell(_fmt_value(value))} |")
    else:
        out.append("No evaluation metrics were recorded for this stage.")
    out.append("")

    # -- how to load
    num_labels = 1
    if layout["config"].get("id2label"):
        num_labels = len(layout["config"]["id2label"])
    snippet = _load_snippet(
        repo_id=repo_id,
        base_model=base_model,
        adapter=adapter,
        classifier=classifier,
        tokenizer_in_repo=layout["has_tokenizer"],
        chat_template=layout["has_chat_template"],
        num_labels=num_labels,
    )
    requirement = "`pip install transformers peft`" if adapter else "`pip install transformers`"
    out += ["## How to use", "", f"Requires {requirement}.", "", _fence(snippet, "python"), ""]

    # -- recipe
    if recipe_text and recipe_text.strip():
        out += ["## Training recipe", "", "The resolved align recipe this model was trained with:", "",
                _fence(recipe_text, "yaml"), ""]

    versions = _framework_versions()
    if versions:
        out += ["## Framework versions", ""] + [f"- {dist}: {ver}" for dist, ver in versions] + [""]
    return "\n".join(out)


# --------------------------------------------------------------------------- push


def hub_endpoint(endpoint: str | None = None) -> str:
    """The Hub endpoint to talk to, resolved now (huggingface_hub resolves HF_ENDPOINT at import)."""
    if endpoint:
        return endpoint.rstrip("/")
    env = os.environ.get("HF_ENDPOINT")
    if env:
        return env.rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def select_model_files(folder: str | os.PathLike) -> list[Path]:
    """The files of ``folder`` that belong in a model repo, sorted by name.

    Top level only (``checkpoints/`` and other sub-folders are never uploaded): safetensors
    weights and their index, model/adapter/generation configs, tokenizer files and README.md.
    Optimizer, scheduler, RNG and trainer state are excluded whatever their extension.
    """
    folder = Path(folder)
    selected = []
    for path in sorted(folder.iterdir()):
        name = path.name
        if not path.is_file() or name.lower().startswith(_EXCLUDED_PREFIXES):
            continue
        if name in _MODEL_FILE_NAMES or name.endswith(_MODEL_FILE_SUFFIXES):
            selected.append(path)
    return selected


def _file_contains(path: Path, needle: bytes, chunk_size: int = 1 << 20) -> bool:
    overlap = len(needle) - 1
    tail = b""
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(chunk_size)
            if not chunk:
                return False
            if needle in tail + chunk:
                return True
            tail = chunk[-overlap:] if overlap > 0 else b""


def _resolve_secret(token: str | bool | None) -> str | None:
    """The token that will be sent, only to keep it out of files, messages and logs."""
    if isinstance(token, str):
        return token or None
    if token is False:
        return None
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # noqa: BLE001 - resolution failures surface later as push errors
        return None


def _redact(text: str, secret: str | None) -> str:
    if secret:
        text = text.replace(secret, "***")
    return text


def _transport_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module_name in ("httpx2", "httpx", "requests"):
        try:
            module = __import__(module_name)
        except ImportError:
            continue
        for attr in ("TimeoutException", "NetworkError", "RemoteProtocolError", "ConnectionError", "Timeout"):
            cls = getattr(module, attr, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                errors.append(cls)
    return tuple(errors)


# hf_xet (Rust) reports HTTP failures of its own requests as a builtin ConnectionError whose text
# carries the status, e.g. "HTTP status client error (404 Not Found), domain: ...".
_XET_STATUS_RE = re.compile(r"HTTP status (?:client|server) error \((\d{3})")


def _http_status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int):
        return status
    if isinstance(exc, ConnectionError):
        match = _XET_STATUS_RE.search(str(exc))
        if match:
            return int(match.group(1))
    return None


def _causes(exc: BaseException) -> Iterable[BaseException]:
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_offline(exc: BaseException) -> bool:
    return any(type(err).__name__ == "OfflineModeIsEnabled" for err in _causes(exc))


def _is_transient(exc: BaseException) -> bool:
    if _is_offline(exc):
        return False
    transport = _transport_errors()
    for err in _causes(exc):
        status = _http_status(err)
        if status is not None:
            return status in _TRANSIENT_STATUS or status >= 500
        if isinstance(err, transport):
            return True
    return False


def _describe(exc: BaseException, endpoint: str) -> tuple[str, int | None]:
    """A one-line cause and the HTTP status, if any."""
    if _is_offline(exc):
        return "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE); unset it to push", None
    for err in _causes(exc):
        status = _http_status(err)
        if status is not None:
            reason = getattr(getattr(err, "response", None), "reason_phrase", "") or ""
            detail = getattr(err, "server_message", None) or ("" if reason else str(err))
            detail = " ".join(str(detail).split())
            text = f"HTTP {status}{' ' + reason if reason else ''} from {endpoint}"
            if detail:
                text += f" ({detail[:300]})"
            if status == 401:
                text += "; check the token (HF_TOKEN or `hf auth login`)"
            elif status == 403:
                text += "; the token needs write access to this namespace"
            return text, status
    for err in _causes(exc):
        if isinstance(err, _transport_errors()):
            msg = " ".join(str(err).split()) or type(err).__name__
            return f"connection to {endpoint} failed ({type(err).__name__}: {msg})", None
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {msg[:500]}", None


def push_folder(
    folder: str | os.PathLike,
    *,
    repo_id: str,
    private: bool = False,
    token: str | bool | None = None,
    commit_message: str = DEFAULT_COMMIT_MESSAGE,
    card_text: str | None = None,
    retries: int = 3,
    endpoint: str | None = None,
    backoff_s: float = 2.0,
) -> str:
    """Create ``repo_id`` if needed and commit the model files of ``folder`` to it.

    Only :func:`select_model_files` are sent (never checkpoints/ or optimizer state); with
    ``card_text`` the card is uploaded as ``README.md`` from memory instead of a local one.
    Local files are only read.  ``token=None`` lets huggingface_hub find it (``HF_TOKEN``, then
    the saved login).  ``endpoint=None`` uses ``HF_ENDPOINT`` read now (see module docstring).
    A transient failure (HTTP 408/429/5xx, dropped or refused connection) is retried up to
    ``retries`` times, waiting ``backoff_s``, then twice as long each time (capped at 30 s).

    Returns the commit URL (the commit oid if the server gave no URL).
    Raises :class:`HubPushError` with the repo id and the cause; the token never appears in it.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    folder = Path(folder)
    base_url = hub_endpoint(endpoint)
    secret = _resolve_secret(token)

    def fail(reason: str, status: int | None = None, attempts: int = 0) -> HubPushError:
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return HubPushError(
            _redact(f"could not push {folder} to Hugging Face Hub repo '{repo_id}'{tries}: {reason}", secret),
            repo_id=repo_id, status=status, attempts=attempts,
        )

    if not folder.is_dir():
        raise fail("the folder does not exist")
    if secret is None:
        raise fail("no Hugging Face token found; set HF_TOKEN or run `hf auth login`")
    if constants.is_offline_mode():
        raise fail("offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE); unset it to push")

    files = select_model_files(folder)
    if card_text is not None:
        files = [p for p in files if p.name != "README.md"]
    if not any(p.name.endswith(".safetensors") for p in files):
        raise fail("no *.safetensors weights in the folder")
    if not any(p.name in ("config.json", "adapter_config.json") for p in files):
        raise fail("no config.json or adapter_config.json in the folder")

    # The token must not leave in a file, the card or the commit message.
    needle = secret.encode()
    leaking = [p.name for p in files if _file_contains(p, needle)]
    if card_text is not None and secret in card_text:
        leaking.append("README.md (model card)")
    if secret in commit_message:
        leaking.append("the commit message")
    if leaking:
        raise fail(f"refusing to upload: your Hugging Face token appears in {', '.join(leaking)}")

    api = HfApi(endpoint=base_url, token=token, library_name="align")
    if "/" not in repo_id:
        # Plain names go to the token owner's namespace, as on the website.
        try:
            repo_id = f"{api.whoami()['name']}/{repo_id}"
        except Exception as exc:  # noqa: BLE001
            reason, status = _describe(exc, base_url)
            raise fail(f"could not resolve the namespace: {reason}", status, 1) from None

    card_bytes = card_text.encode("utf-8") if card_text is not None else None
    logger.info("Pushing %d file(s)%s from %s to %s at %s", len(files), " + model card" if card_bytes else "",
                folder, repo_id, base_url)

    attempts = max(0, int(retries)) + 1
    repo_ready = False
    for attempt in range(1, attempts + 1):
        try:
            if not repo_ready:
                api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
                repo_ready = True
            # Fresh operations each attempt: huggingface_hub mutates them during a commit.
            operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files]
            if card_bytes is not None:
                operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_bytes))
            info = api.create_commit(repo_id, operations=operations, commit_message=commit_message,
                                     repo_type="model")
        except Exception as exc:  # noqa: BLE001 - classified below, re-raised as HubPushError
            reason, status = _describe(exc, base_url)
            if not _is_transient(exc) or attempt == attempts:
                raise fail(reason, status, attempt) from None
            delay = min(backoff_s * (2 ** (attempt - 1)), _MAX_BACKOFF_S)
            logger.warning("%s", _redact(
                f"push to {repo_id}: attempt {attempt}/{attempts} failed ({reason}); retrying in {delay:.1f}s",
                secret))
            time.sleep(delay)
            continue
        result = str(info.commit_url or info.oid)
        logger.info("Pushed %s: %s", repo_id, result)
        return result
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------- align push

# Hyperparameters worth a column in the card's stage table, in this order.
_CARD_HPARAMS = (
    "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size", "gradient_accumulation_steps",
    "lr_scheduler_type", "warmup_steps", "warmup_ratio", "max_length", "beta", "loss_type", "kl_coef", "cliprange",
    "num_ppo_epochs", "num_generations", "rloo_k", "vocab_size", "hidden_size", "intermediate_size",
    "num_hidden_layers", "num_attention_heads",
)
_CARD_PEFT = ("method", "r", "lora_alpha", "lora_dropout", "target_modules")
# metrics.json bookkeeping that says nothing about the model.
_CARD_SKIP_METRICS = frozenset({"world_size", "resumed_from_step"})


def stage_summaries(recipe: dict | None, stage_name: str | None = None) -> list[dict]:
    """Summaries of a resolved recipe's stages, up to and including `stage_name`, for the card:
    name, type, dataset and the key hyperparameters (peft `r`/`lora_alpha`, quantization)."""
    stages = (recipe or {}).get("stages") or {}
    if not isinstance(stages, dict):
        return []
    names = list(stages)
    if stage_name in stages:
        names = names[: names.index(stage_name) + 1]
    out = []
    for name in names:
        block = stages[name] if isinstance(stages[name], dict) else {}
        params = {k: block[k] for k in _CARD_HPARAMS if k in block and block[k] is not None}
        peft = block.get("peft")
        if isinstance(peft, dict):
            params.update({k: peft[k] for k in _CARD_PEFT if k in peft})
        quant = block.get("quantization")
        if isinstance(quant, dict) and (quant.get("load_in_4bit") or quant.get("load_in_8bit")):
            bits = "4-bit " + str(quant.get("bnb_4bit_quant_type", "fp4")) if quant.get("load_in_4bit") else "8-bit"
            params["quantization"] = f"{bits} (QLoRA)" if isinstance(peft, dict) else bits
        summary = {"name": name, "type": block.get("type", name), "hyperparameters": params}
        dataset = block.get("dataset") or block.get("prompts")
        if dataset is not None:
            summary["dataset"] = dataset
        out.append(summary)
    return out


def _numbers(mapping: dict, prefix: str = "") -> dict:
    return {f"{prefix}{k}": v for k, v in mapping.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in _CARD_SKIP_METRICS}


def card_metrics(stage_dir: Path, recipe: dict | None = None) -> dict:
    """The stage's metrics.json, plus this stage's rows of the run's eval results (`eval/eval.json`
    and any other eval stage's folder) prefixed `eval/`."""
    stage_dir = Path(stage_dir)
    metrics = _numbers(_read_json(stage_dir / "metrics.json"))
    run_dir = stage_dir.parent
    stages = (recipe or {}).get("stages") or {}
    eval_dirs = [run_dir / "eval"] + [run_dir / name for name, block in stages.items()
                                      if isinstance(block, dict) and block.get("type") == "eval" and name != "eval"]
    for folder in eval_dirs:
        results = _read_json(folder / "eval.json")
        mine = (results.get("policies") or {}).get(stage_dir.name)
        if isinstance(mine, dict):
            metrics.update(_numbers(mine, "eval/"))
        this_type = (stages.get(stage_dir.name) or {}).get("type") if isinstance(stages, dict) else None
        if this_type == "reward" and isinstance(results.get("reward_model"), dict):
            metrics.update(_numbers(results["reward_model"], "eval/"))
    return metrics


def _base_model_of(stage_dir: Path, recipe: dict | None) -> str | None:
    """An adapter's base; for a full model, the run's starting model (recipe `model`)."""
    if (stage_dir / "adapter_config.json").is_file():
        base = _read_json(stage_dir / "adapter_config.json").get("base_model_name_or_path")
        if base:
            return base
    recipe = recipe or {}
    model = recipe.get("model") or {}
    if isinstance(model, str) and model:
        return model
    if isinstance(model, dict) and model.get("name_or_path"):
        return model["name_or_path"]
    # No top-level model: the first stage that starts from a model outside the run.
    run_dir = str(recipe.get("output_dir") or stage_dir.parent)
    stages = recipe.get("stages") if isinstance(recipe.get("stages"), dict) else {}
    for name, block in stages.items():
        start = block.get("model") if isinstance(block, dict) else None
        if isinstance(start, str) and start and not start.startswith(run_dir.rstrip("/") + "/"):
            return start
        if name == stage_dir.name:
            break
    return None


def _read_recipe(run_dir: Path) -> tuple[dict | None, str | None]:
    path = run_dir / "recipe.yaml"
    if not path.is_file():
        return None, None
    from align.recipe import parse_yaml

    text = path.read_text(encoding="utf-8")
    try:
        data = parse_yaml(text, str(path))
    except AlignError:
        return None, text
    return (data if isinstance(data, dict) else None), text


def push_model(stage_dir, *, repo_id: str, private: bool = False, merged: bool = False,
               recipe: dict | None = None, recipe_text: str | None = None) -> str:
    """Push a stage output (adapter or full model) with its model card; returns the commit URL.

    The card is built from the resolved recipe (default: the run's recipe.yaml next to the stage
    folder), the stage's metrics.json and the run's eval results. With `merged`, an adapter is
    merged into its base in a temporary folder first and that full model is pushed."""
    from align import models
    from align.merge import merge_adapter

    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        raise AlignError(f"push: '{stage_dir}' is not a folder")
    if recipe is None and recipe_text is None:
        recipe, recipe_text = _read_recipe(stage_dir.parent)
    summaries = stage_summaries(recipe, stage_dir.name)
    metrics = card_metrics(stage_dir, recipe)
    base = _base_model_of(stage_dir, recipe)
    layout = _detect_layout(stage_dir)
    if not (layout["has_adapter_files"] or layout["has_full_files"]):
        raise AlignError(f"push: '{stage_dir}' holds no model (adapter_config.json or config.json + *.safetensors)")
    is_adapter = layout["adapter"]
    if merged and not is_adapter:
        print(f"note: {stage_dir} already holds full weights; pushing it as it is", file=sys.stderr)
        merged = False
    if is_adapter and not merged and base and os.path.exists(base):
        print(f"note: the adapter's base is the local folder {base}; Hub users will need that base too "
              f"(push it, or use --merged)", file=sys.stderr)

    def card_and_push(folder: Path) -> str:
        card = build_model_card(folder, repo_id=repo_id, base_model=base, stage_summaries=summaries,
                                metrics=metrics, recipe_text=recipe_text, merged=merged)
        return push_folder(folder, repo_id=repo_id, private=private, card_text=card)

    if not merged:
        return card_and_push(stage_dir)
    with tempfile.TemporaryDirectory(prefix="align-push-", ignore_cleanup_errors=True) as tmp:
        folder = Path(tmp) / stage_dir.name  # the card finds this stage by the folder name
        merge_adapter(stage_dir, folder)
        if models.is_adapter(folder):  # pragma: no cover - merge_adapter writes a full model
            raise AlignError(f"push: merging {stage_dir} did not produce a full model")
        return card_and_push(folder)


def push_stage(recipe, stage, *, repo_id: str, private: bool = False, merged: bool = False) -> str:
    """Push a finished stage of a run (the recipe `hub:` block calls this after the stage)."""
    from align.recipe import dump_yaml

    try:
        url = push_model(stage.dir, repo_id=repo_id, private=private, merged=merged, recipe=recipe.resolved,
                         recipe_text=dump_yaml(recipe.resolved))
    except HubPushError as e:
        # The stage is finished and will be skipped on a rerun: say how to push it later.
        hint = f"align push {stage.dir} --repo-id {repo_id}{' --merged' if merged else ''}{' --private' if private else ''}"
        raise HubPushError(f"{e}; the stage is saved, push it later with `{hint}`", repo_id=e.repo_id,
                           status=e.status, attempts=e.attempts) from None
    print(f"  {stage.name} -> {url}", file=sys.stderr)
    return url


def push_command(args):
    """`align push TARGET --repo-id ID [--private] [--merged]`; TARGET: stage output or run folder."""
    from align.rundir import resolve_target

    path = Path(resolve_target(args.target))
    if not path.is_dir():
        raise AlignError(f"{args.target}: no such folder (push takes a stage output or run folder)")
    url = push_model(path, repo_id=args.repo_id, private=args.private, merged=args.merged)
    print(f"pushed {path} to {args.repo_id}: {url}")
