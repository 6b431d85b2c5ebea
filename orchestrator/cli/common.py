"""What the command modules share: plain text tables and the subparsers type."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence

Subparsers = argparse._SubParsersAction  # what ``add_subparsers`` returns (argparse names it privately)


def format_table(rows: Sequence[Mapping[str, object]], columns: Sequence[str]) -> str:
    """A plain aligned text table (floats to 2 decimals)."""

    def cell(v: object) -> str:
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    body = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) if body else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.ljust(w) for v, w in zip(b, widths)) for b in body]
    return "\n".join(lines)


def metrics_table(metrics: dict[str, float], prefix: str = "") -> str:
    keys = [k for k in sorted(metrics) if k.startswith(prefix)]
    return format_table([{"metric": k, "value": float(metrics[k])} for k in keys], ["metric", "value"])
