"""Shared helpers of the Markdown reports: number formats, table rows, target rows."""

from __future__ import annotations

from collections.abc import Iterable


def yes(ok: bool) -> str:
    """The *met* column of a targets table."""
    return "yes" if ok else "**no**"


def signed(value: float, digits: int = 1) -> str:
    """A signed difference, without a "-0" for values that round to zero."""
    text = f"{value:+.{digits}f}"
    return text.replace("-", "+") if float(text) == 0 else text


def row(*cells: object) -> str:
    """One Markdown table row."""
    return "| " + " | ".join(str(c) for c in cells) + " |"


def targets(rows: Iterable[tuple[str, str, bool]]) -> list[str]:
    """A targets table: one (target, result, met) per row."""
    return ["| target | result | met |", "|---|---|---|"] + [
        row(target, result, yes(ok)) for target, result, ok in rows
    ]
