"""Markdown tables for the results pages that commands and reproduce scripts write: one way to draw them."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

__all__ = ["markdown_table"]


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]], empty: str = "") -> list[str]:
    """A Markdown table as lines: the header, its rule, then a line per row; cells are ``str()``-ed, and a cell that is
    None or ``""`` shows ``empty``."""

    def line(cells: Iterable[Any]) -> str:
        return "| " + " | ".join(empty if c is None or c == "" else str(c) for c in cells) + " |"

    return [line(header), "|" + "---|" * len(header), *(line(r) for r in rows)]
