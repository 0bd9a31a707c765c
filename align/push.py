"""Publishing a stage output to the Hugging Face Hub: which files go, the repo, the commit and its
retries, the push record of a recipe's ``hub:`` stages, and the ``align push`` command.

Notes on ``huggingface_hub`` (written against 2.4, works with the 1.x API too):

* ``HF_ENDPOINT`` is copied into ``huggingface_hub.constants.ENDPOINT`` once, when the package
  is imported. We resolve the endpoint at call time (argument, then ``HF_ENDPOINT``, then the
  import-time constant) and hand it to ``HfApi(endpoint=...)``, which threads it through every
  request of a push. Other switches (``HF_HUB_OFFLINE``, ``HF_HUB_DISABLE_XET``, ``HF_TOKEN_PATH``)
  are also read at import time; only ``HF_TOKEN`` is read per call.
* We call ``preupload_lfs_files`` then ``create_commit`` rather than ``upload_folder``: we choose
  the files ourselves, the card goes up from memory (local files are never written), and with
  ``hf_xet`` installed ``upload_folder`` switches to a multi-commit pipeline that retries on its
  own. Whether a file goes inline or through LFS/Xet is the server's ``preupload`` answer.
* Retries: huggingface_hub retries each preupload and LFS request itself (6 tries, 1-8 s apart),
  hf_xet its own transfers; repo creation, README validation and the commit it sends once. align
  retries only those, from one small budget per push. Retrying the whole upload multiplied the
  two policies: issue 12 saw a cut LFS upload tried 48 times over 114 s.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, TypeVar

from huggingface_hub import CommitInfo, CommitOperationAdd, HfApi, constants, get_token
from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

from align.card import base_model_of, build_model_card, card_metrics, eval_results, model_layout, stage_summaries
from align.errors import AlignError
from align.merge import merge_adapter
from align.recipe import dump_yaml, parse_yaml
from align.rundir import RECIPE, resolve_target, write_atomic
from align.secrets import redact_secrets

__all__ = ["PUSH_RECORD", "HubPushError", "hub_endpoint", "is_pushed", "push_command", "push_folder", "push_model",
           "push_stage", "read_push_record", "select_model_files"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

PUSH_RECORD = ".align-pushed.json"  # in a stage folder, written after a successful recipe push
DEFAULT_COMMIT_MESSAGE = "Upload model trained with align"
_TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
_MAX_BACKOFF_S = 30.0
_RETRY_BUDGET_S = 60.0
_OFFLINE = "offline mode is on (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE); unset it to push"
# The HTTP client's own errors (refused or dropped connections, timeouts) reach us unwrapped.
# HfHubHTTPError derives from that client's HTTPError (httpx2's in huggingface_hub 2.x, httpx's in
# 1.x), so its base names them without importing either client.
_CLIENT_ERROR = HfHubHTTPError.__bases__[0]

# Files a model repo needs, matched on the file name (top level of the stage folder only).
_MODEL_FILE_NAMES = frozenset({
    "config.json", "generation_config.json", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json",
    "preprocessor_config.json", "README.md",
})
_MODEL_FILE_SUFFIXES = (".safetensors", ".safetensors.index.json")
# Never uploaded, whatever their extension: training state, not model.
_EXCLUDED_PREFIXES = ("optimizer", "scheduler", "rng_state", "trainer_state", "training_args", "checkpoint")


class HubPushError(AlignError):
    """Pushing to the Hub failed; the message names the repo and the cause (``reason``), never the token."""

    def __init__(self, message: str, *, repo_id: str, status: int | None = None, attempts: int = 0,
                 reason: str = ""):
        super().__init__(message)
        self.repo_id = repo_id
        self.status = status
        self.attempts = attempts
        self.reason = reason or message


def hub_endpoint(endpoint: str | None = None) -> str:
    """The Hub endpoint to talk to, resolved now (huggingface_hub resolves HF_ENDPOINT at import)."""
    if endpoint:
        return endpoint.rstrip("/")
    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def select_model_files(folder: str | os.PathLike) -> list[Path]:
    """The files of ``folder`` that belong in a model repo, sorted by name.

    Top level only (``checkpoints/`` and other sub-folders are never uploaded): safetensors
    weights and their index, model/adapter/generation configs, tokenizer files and README.md.
    Optimizer, scheduler, RNG and trainer state are excluded whatever their extension.
    """
    selected = []
    for path in sorted(Path(folder).iterdir()):
        name = path.name
        if not path.is_file() or name.lower().startswith(_EXCLUDED_PREFIXES):
            continue
        if name in _MODEL_FILE_NAMES or name.endswith(_MODEL_FILE_SUFFIXES):
            selected.append(path)
    return selected


# --------------------------------------------------------------------------- secrets and errors


def _file_contains(path: Path, needle: bytes, chunk_size: int = 1 << 20) -> bool:
    overlap = len(needle) - 1
    tail = b""
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            if needle in tail + chunk:
                return True
            tail = chunk[-overlap:] if overlap > 0 else b""
    return False


def _resolve_secret(token: str | bool | None) -> str | None:
    """The token that will be sent, only to keep it out of files, messages and logs."""
    if isinstance(token, str):
        return token or None
    if token is False:
        return None
    try:
        return get_token()
    except Exception:  # noqa: BLE001 - resolution failures surface later as push errors
        return None


def _redact(text: str, secret: str | None) -> str:
    """``text`` without the token we send (``***``: a proxy may echo it in an error) or any other token."""
    if secret:
        text = text.replace(secret, "***")
    return redact_secrets(text)


def _causes(exc: BaseException) -> Iterable[BaseException]:
    """``exc`` and what it was raised from (huggingface_hub wraps a failed LFS upload in a RuntimeError)."""
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_transport(err: BaseException) -> bool:
    """No answer at all: refused, dropped or timed out (offline mode is a ConnectionError too, but final)."""
    if isinstance(err, (OfflineModeIsEnabled, HfHubHTTPError)):
        return False
    return isinstance(err, (_CLIENT_ERROR, ConnectionError, TimeoutError))


def _is_transient(exc: BaseException) -> bool:
    for err in _causes(exc):
        if isinstance(err, OfflineModeIsEnabled):
            return False
        if isinstance(err, HfHubHTTPError):
            status = err.response.status_code
            return status in _TRANSIENT_STATUS or status >= 500
        if _is_transport(err):
            return True
    return False


def _describe(exc: BaseException, endpoint: str) -> tuple[str, int | None]:
    """A one-line cause and the HTTP status, if any."""
    for err in _causes(exc):
        if isinstance(err, OfflineModeIsEnabled):
            return _OFFLINE, None
        if isinstance(err, HfHubHTTPError):
            status, reason = err.response.status_code, err.response.reason_phrase or ""
            detail = " ".join(str(err.server_message or ("" if reason else err)).split())
            text = f"HTTP {status}{' ' + reason if reason else ''} from {endpoint}"
            if detail:
                text += f" ({detail[:300]})"
            if status == 401:
                text += "; check the token (HF_TOKEN or `hf auth login`)"
            elif status == 403:
                text += "; the token needs write access to this namespace"
            return text, status
        if _is_transport(err):
            msg = " ".join(str(err).split()) or type(err).__name__
            return f"connection to {endpoint} failed ({type(err).__name__}: {msg})", None
    msg = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {msg[:500]}", None


# --------------------------------------------------------------------------- push a folder


def push_folder(folder: str | os.PathLike, *, repo_id: str, private: bool = False, token: str | bool | None = None,
                commit_message: str = DEFAULT_COMMIT_MESSAGE, card_text: str | None = None, retries: int = 3,
                endpoint: str | None = None, backoff_s: float = 1.0) -> CommitInfo:
    """Create ``repo_id`` if needed and commit the model files of ``folder`` to it.

    Only :func:`select_model_files` are sent (never checkpoints/ or optimizer state); with
    ``card_text`` the card is uploaded as ``README.md`` from memory instead of a local one.
    Local files are only read. ``token=None`` lets huggingface_hub find it (``HF_TOKEN``, then
    the saved login). ``endpoint=None`` uses ``HF_ENDPOINT`` read now (see module docstring).
    A plain ``name`` goes to the token owner's namespace. Repo creation and the commit are
    retried on HTTP 408/429/5xx and lost connections within one budget (see module docstring).

    Returns huggingface_hub's ``CommitInfo`` (``commit_url``, ``oid``, ``repo_url.repo_id``).
    Raises :class:`HubPushError` with the repo id and the cause; the token never appears in it.
    """
    folder = Path(folder)
    base_url = hub_endpoint(endpoint)
    secret = _resolve_secret(token)

    def fail(reason: str, status: int | None = None, attempts: int = 0) -> HubPushError:
        reason = _redact(reason, secret)
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        return HubPushError(_redact(f"could not push {folder} to Hugging Face Hub repo '{repo_id}'{tries}: {reason}",
                                    secret), repo_id=repo_id, status=status, attempts=attempts, reason=reason)

    if not folder.is_dir():
        raise fail("the folder does not exist")
    if secret is None:
        raise fail("no Hugging Face token found; set HF_TOKEN or run `hf auth login`")
    if constants.is_offline_mode():
        raise fail(_OFFLINE)

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
    # One retry budget for the whole push, spent only on what huggingface_hub sends once: at most
    # `retries` in all, `backoff_s` then twice as long each time, none starting after the deadline.
    retried, deadline = 0, time.monotonic() + _RETRY_BUDGET_S

    def send(step: str, request: Callable[[], T]) -> T:
        nonlocal retried
        for attempt in itertools.count(1):
            try:
                return request()
            except Exception as exc:  # noqa: BLE001 - classified here, re-raised as HubPushError
                reason, status = _describe(exc, base_url)
                delay = min(backoff_s * 2 ** retried, _MAX_BACKOFF_S)
                if not _is_transient(exc) or retried >= retries or time.monotonic() + delay > deadline:
                    raise fail(reason, status, attempt) from None
                retried += 1
                logger.warning("%s", _redact(f"push to {repo_id}: {step}, attempt {attempt} failed ({reason}); "
                                             f"retrying in {delay:.1f}s", secret))
                time.sleep(delay)

    logger.info("Pushing %d file(s)%s from %s to %s at %s", len(files), " + model card" if card_text else "",
                folder, repo_id, base_url)
    # The answer names the repo in full: a plain name resolves to the token owner's namespace here.
    repo_id = send("creating the repo", lambda: api.create_repo(repo_id, private=private, exist_ok=True,
                                                                repo_type="model")).repo_id
    # Made once: a retried commit reuses them, so it does not upload the large files again.
    operations = [CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files]
    if card_text is not None:
        operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card_text.encode("utf-8")))
    try:  # huggingface_hub retries each of these requests itself: not again here
        api.preupload_lfs_files(repo_id, additions=operations, repo_type="model")
    except Exception as exc:  # noqa: BLE001
        raise fail(*_describe(exc, base_url), 1) from None
    info = send("commit", lambda: api.create_commit(repo_id, operations=operations, commit_message=commit_message,
                                                    repo_type="model"))
    logger.info("Pushed %s: %s", repo_id, info.commit_url)
    return info


# --------------------------------------------------------------------------- push records


def read_push_record(stage_dir: str | os.PathLike) -> dict | None:
    """What a recipe push of this stage folder sent where: repo_id, commit, url, stage_hash, merged."""
    try:
        record = json.loads((Path(stage_dir) / PUSH_RECORD).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_pushed(stage, repo_id: str, merged: bool = False) -> bool:
    """Whether this stage's current output (same config hash, same merged-ness) is on ``repo_id``;
    a plain name matches the name part of the recorded ``owner/name``."""
    record = read_push_record(stage.dir)
    if not record or record.get("stage_hash") != stage.hash or bool(record.get("merged")) != bool(merged):
        return False
    pushed_to = str(record.get("repo_id", ""))
    return pushed_to == repo_id or ("/" not in repo_id and pushed_to.split("/")[-1] == repo_id)


def _write_push_record(stage, info: CommitInfo, merged: bool) -> None:
    write_atomic(stage.dir / PUSH_RECORD, json.dumps({
        "repo_id": info.repo_url.repo_id, "commit": info.oid, "url": info.commit_url, "stage_hash": stage.hash,
        "merged": merged, "pushed": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }, indent=2))


# --------------------------------------------------------------------------- stages and runs


def _read_recipe(run_dir: Path) -> tuple[dict | None, str | None]:
    path = run_dir / RECIPE
    if not path.is_file():
        return None, None
    text = path.read_text(encoding="utf-8")
    try:
        data = parse_yaml(text, str(path))
    except AlignError:
        return None, text
    return (data if isinstance(data, dict) else None), text


def push_model(stage_dir, *, repo_id: str, private: bool = False, merged: bool = False,
               recipe: dict | None = None, recipe_text: str | None = None) -> CommitInfo:
    """Push a stage output (adapter or full model) with its model card.

    The card is built from the resolved recipe (default: the run's recipe.yaml next to the stage
    folder), the stage's metrics.json and the run's eval results. With `merged`, an adapter is
    merged into its base in a temporary folder first and that full model is pushed."""
    from align import models

    stage_dir = Path(stage_dir)
    if not stage_dir.is_dir():
        raise AlignError(f"push: '{stage_dir}' is not a folder")
    if recipe is None and recipe_text is None:
        recipe, recipe_text = _read_recipe(stage_dir.parent)
    layout = model_layout(stage_dir)
    if not (layout["has_adapter_files"] or layout["has_full_files"]):
        raise AlignError(f"push: '{stage_dir}' holds no model (adapter_config.json or config.json + *.safetensors)")
    base = base_model_of(stage_dir, recipe)
    if merged and not layout["adapter"]:
        print(f"note: {stage_dir} already holds full weights; pushing it as it is", file=sys.stderr)
        merged = False
    if layout["adapter"] and not merged and base and os.path.exists(base):
        print(f"note: the adapter's base is the local folder {base}; Hub users will need that base too "
              f"(push it, or use --merged)", file=sys.stderr)

    def card_and_push(folder: Path) -> CommitInfo:
        card = build_model_card(folder, repo_id=repo_id, base_model=base, merged=merged, recipe_text=recipe_text,
                                stage_summaries=stage_summaries(recipe, stage_dir.name),
                                metrics=card_metrics(stage_dir, recipe), eval_results=eval_results(stage_dir, recipe))
        return push_folder(folder, repo_id=repo_id, private=private, card_text=str(card))

    if not merged:
        return card_and_push(stage_dir)
    with tempfile.TemporaryDirectory(prefix="align-push-", ignore_cleanup_errors=True) as tmp:
        folder = Path(tmp) / stage_dir.name  # the card finds this stage by the folder name
        merge_adapter(stage_dir, folder)
        if models.is_adapter(folder):  # pragma: no cover - merge_adapter writes a full model
            raise AlignError(f"push: merging {stage_dir} did not produce a full model")
        return card_and_push(folder)


def push_stage(recipe, stage, *, repo_id: str, private: bool = False, merged: bool = False) -> CommitInfo | None:
    """Push a finished stage of a run (the recipe `hub:` block), unless its push record says this
    output is already on `repo_id`; after a successful push, write the record.

    Returns None when the record said so. A failure raises one line naming the stage, the repo and
    the reason: the stage stays finished (training succeeded) and, with no record, a rerun pushes it."""
    if is_pushed(stage, repo_id, merged):
        print(f"  {stage.name} already pushed to {repo_id} ({read_push_record(stage.dir).get('url')})",
              file=sys.stderr)
        return None
    try:
        info = push_model(stage.dir, repo_id=repo_id, private=private, merged=merged, recipe=recipe.resolved,
                          recipe_text=dump_yaml(recipe.resolved))
    except AlignError as e:
        reason = e.reason if isinstance(e, HubPushError) else str(e)
        raise HubPushError(f"hub: pushing stage '{stage.name}' to {repo_id} failed: {reason} "
                           "(the stage itself is finished; rerun to retry the push)", repo_id=repo_id,
                           status=getattr(e, "status", None), attempts=getattr(e, "attempts", 0),
                           reason=reason) from None
    _write_push_record(stage, info, merged)
    print(f"  pushed {stage.name} to {info.repo_url.repo_id}: {info.commit_url}", file=sys.stderr)
    return info


def push_command(args):
    """`align push TARGET --repo-id ID [--private] [--merged]`; TARGET: stage output or run folder."""
    path = Path(resolve_target(args.target))
    if not path.is_dir():
        raise AlignError(f"{args.target}: no such folder (push takes a stage output or run folder)")
    info = push_model(path, repo_id=args.repo_id, private=args.private, merged=args.merged)
    print(f"pushed {path} to {args.repo_id}: {info.commit_url}")
