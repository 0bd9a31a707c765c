"""The one exception type the CLI turns into a single-line message, and the two helpers every
message uses: the first line of a library's error, and a "did you mean" for typos; plus the one
place that recognises a full disk, whichever library was writing."""

from __future__ import annotations

import difflib
import errno
import os
import shutil


class AlignError(Exception):
    """A user-facing error: one clear message, no traceback."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's text (libraries often append pages)."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def suggest(word: str, choices) -> str:
    """"; did you mean 'x'?" for the closest valid choice, or "" when none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


FULL_DISK = {errno.ENOSPC, errno.EDQUOT}  # no space left, disk quota exceeded
# torch.save reports a failed write without errno ("unexpected pos ...", "file write failed").
TORCH_WRITE_FAILED = ("inline_container.cc", "PytorchStreamWriter")


def disk_full(error: BaseException, folder: str | os.PathLike | None = None) -> str | None:
    """If `error` (or one it was raised from) is a write that failed for lack of space, the path
    being written (or `folder`, or "?" when unknown); else None. safetensors and torch do not
    raise OSError, so their messages are read too; torch's only when `folder` is nearly full."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in FULL_DISK:
            return seen.filename or (str(folder) if folder else "?")
        text = str(seen)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return str(folder) if folder else "?"
        if folder and any(t in text for t in TORCH_WRITE_FAILED) and _nearly_full(folder):
            return str(folder)
        seen = seen.__cause__ or seen.__context__
    return None


def _nearly_full(folder) -> bool:
    try:
        return shutil.disk_usage(folder).free < 64 * 2**20
    except OSError:
        return False
