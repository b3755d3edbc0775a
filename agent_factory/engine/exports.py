"""A package's public names, imported on first use (PEP 562 ``__getattr__``/``__dir__``)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, where: Mapping[str, str], default: str | None = None
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package``.

    ``where`` maps a name to the submodule (relative to ``package``) that
    defines it; a name of the package's ``__all__`` missing from it comes from
    ``default``. The value is cached in the package's namespace on first use.
    """

    def getattr_(name: str) -> Any:
        namespace = vars(sys.modules[package])
        module = where.get(name, default if name in namespace["__all__"] else None)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    def dir_() -> list[str]:
        namespace = vars(sys.modules[package])
        return sorted(set(namespace) | set(namespace["__all__"]))

    return getattr_, dir_
