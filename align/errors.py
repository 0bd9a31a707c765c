"""The one exception type the CLI turns into a single-line message, and the two helpers every
message uses: the first line of a library's error, and a "did you mean" for typos."""

from __future__ import annotations

import difflib


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
