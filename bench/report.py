"""Shared helpers of the Markdown reports: number formats, table rows, targets, sections."""

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


def section(title: str, *blocks: str | list[str] | None) -> list[str]:
    """A section's lines: ``title``, then each block followed by a blank line.

    A block is a paragraph, or the lines of a table or a list; an empty or
    None block is left out (with its blank line).
    """
    lines = [title, ""]
    for block in blocks:
        if block:
            lines += [block] if isinstance(block, str) else block
            lines.append("")
    return lines
