"""Aligned plain-text columns, for listings read by people or by awk when stdout is no terminal."""

from __future__ import annotations

from collections.abc import Sequence


def plain_columns(rows: Sequence[Sequence[str]]) -> str:
    """Rows (the first one the headings) as aligned columns, like ps(1).

    The last column is not padded: it holds paths, which nothing follows.
    """
    if not rows:
        return ""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return "".join(
        "  ".join(
            [*(cell.ljust(w) for cell, w in zip(row, widths, strict=False)), row[-1]]
        ).rstrip()
        + "\n"
        for row in rows
    )
