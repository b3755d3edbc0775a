"""Argument types shared by the commands (argparse ``type=`` callables); no I/O, cheap to import."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

__all__ = ["positive_float", "positive_int"]


def positive_int(text: str) -> int:
    """An argparse ``type``: a whole number >= 1."""
    return int(_positive(text, int, "an integer"))


def positive_float(text: str) -> float:
    """An argparse ``type``: a finite number > 0."""
    return _positive(text, float, "a number")


def _positive(text: str, kind: Callable[[str], float], noun: str) -> float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {noun}: {text!r}") from None
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value
