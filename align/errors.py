"""The one exception type the CLI turns into a single-line message."""


class AlignError(Exception):
    """A user-facing error: one clear message, no traceback."""
