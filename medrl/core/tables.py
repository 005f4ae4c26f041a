"""Markdown tables, written one way everywhere (reports, summaries, the terminal)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """The lines of a GitHub-flavoured markdown table.

    >>> print("\\n".join(markdown_table(["k", "v"], [["a", "1"]])))
    | k | v |
    |---|---|
    | a | 1 |
    """
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines
