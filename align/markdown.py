"""Markdown tables, for eval.md, report.md, PPO's samples.md and model cards."""

from __future__ import annotations


def cell(value, limit: int | None = None) -> str:
    """One table cell: a chat (list of messages) as "role: content / ...", pipes escaped, line
    breaks shown as a visible `\\n` so a cell stays on its row; cut to `limit` characters."""
    if isinstance(value, list):
        value = " / ".join(f"{m.get('role')}: {m.get('content')}" if isinstance(m, dict) else str(m) for m in value)
    text = str(value).replace("|", "\\|").replace("\r", "").replace("\n", "\\n")
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


def table(header: list[str], rows: list[list], limit: int | None = None) -> list[str]:
    """Lines of a markdown table; every value goes through `cell`."""
    return ["| " + " | ".join(cell(h) for h in header) + " |", "|" + "---|" * len(header),
            *("| " + " | ".join(cell(v, limit) for v in row) + " |" for row in rows)]
