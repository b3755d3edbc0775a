"""Terminal output for the command line: Rich on a terminal, plain text elsewhere.

Rich is imported inside the functions that draw, so importing this module stays
cheap; pipes, logs and machines without Rich get plain aligned, greppable text.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["ms", "print_table", "rich_console", "scrub", "secs", "yes_no"]


def scrub(text: str, secrets: Sequence[str]) -> str:
    # The manager's outputs hold no password; this guards against a future
    # field or error text that would.
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def rich_console() -> Console | None:
    """Rich for a terminal; None (plain, greppable text) for pipes or without Rich."""
    if not sys.stdout.isatty():
        return None
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console()


def print_table(
    title: str, headers: Sequence[str], rows: Sequence[Sequence[str]],
    secrets: Sequence[str] = (),
) -> None:
    rows = [[scrub(cell, secrets) for cell in row] for row in rows]
    console = rich_console()
    if console is None:
        widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
        print(title)
        for line in [list(headers), *rows]:
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        return
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for h in headers:
        table.add_column(h, overflow="fold")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def yes_no(value: object) -> str:
    return "yes" if value is True else "no" if value is False else "?"


def ms(value: object) -> str:
    return f"{value:.1f} ms" if isinstance(value, (int, float)) else "-"


def secs(value: float | None) -> str:
    return "never" if value is None else f"{value:.3f} s"
