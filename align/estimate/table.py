"""Plain-text tables of estimates: counts in K/M/B, memory in MiB/GiB, FLOPs in scientific notation,
time in s/min/h/d."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from align.estimate.params import GiB, MiB


def fmt_count(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def fmt_bytes(n) -> str:
    if n is None:
        return "-"
    n = float(n)
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n == 0:
        return "0"
    return f"{n / MiB:.1f} MiB"


def fmt_flops(n) -> str:
    return "-" if n is None else f"{float(n):.2e}"


def fmt_time(seconds) -> str:
    if seconds is None:
        return "-"
    s = float(seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{s / 60:.1f} min"
    if s < 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


COLUMNS = (
    ("name", "", str),
    ("engine", "engine", str),
    ("params", "params", fmt_count),
    ("trainable_params", "trainable", fmt_count),
    ("weights", "weights", fmt_bytes),
    ("gradients", "grads", fmt_bytes),
    ("optimizer", "optim", fmt_bytes),
    ("activations", "activ", fmt_bytes),
    ("kv_cache", "kv cache", fmt_bytes),
    ("runtime", "runtime", fmt_bytes),
    ("total", "total/dev", fmt_bytes),
    ("flops", "FLOPs", fmt_flops),
    ("seconds", "time", fmt_time),
)


def columns(header: Sequence[str], body: Sequence[Sequence[str]], left: int = 1) -> str:
    """Aligned columns under a header and a rule: the first ``left`` columns left-aligned."""
    widths = [max(len(c) for c in col) for col in zip(header, *body)]

    def line(cells):
        return "  ".join(c.ljust(w) if k < left else c.rjust(w)
                         for k, (c, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(cells) for cells in body)])


def format_plan(rows: Sequence[Mapping[str, Any]]) -> str:
    """A plain-text table, one row per stage or role.

    Each row is a mapping such as ``{"name": "sft", **estimate_memory(...), "flops": f, "seconds":
    t}``; missing keys print as ``-``. ``engine`` is e.g. ``zero3 x4`` (engine x processes);
    ``total`` is the model's memory per device; ``runtime`` (CPU plans) the resident set of the
    process before any model, so a CPU process peaks near ``runtime + total``.
    """
    header = [title for _, title, _ in COLUMNS]
    body = [[str(row.get(key) or "") if key == "name" else
             ("-" if row.get(key) is None else fmt(row[key])) for key, _, fmt in COLUMNS] for row in rows]
    return columns(header, body, left=2)
