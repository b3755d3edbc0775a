"""Imports run one way, down the layers of docs/architecture.md (read from the source)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "agent_factory"

#: What each layer may import of the package (besides itself).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "engine": {"errors"},
    "schema": {"errors"},
    "testing": {"errors"},
    "continuity": {"errors", "engine", "schema"},
    "core": {"errors", "engine", "continuity"},
    "memory": {"errors", "engine", "core"},
    "observability": {"errors", "engine", "core", "testing"},
    "integrations": {"errors", "engine", "core", "memory"},
    "cli": {"errors", "engine", "schema", "continuity", "core", "memory", "observability",
            "testing", "integrations", "__version__"},  # --version reads the face's
    "__init__": {"errors", "engine", "core", "memory"},
    "__main__": {"cli"},
}


def layer_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py") if len(rel.parts) > 1 else rel.stem


def imported_layers(path: Path) -> set[str]:
    """The package's top-level folders (or modules) that ``path`` imports, however deep."""
    # The package a relative import starts from (for an __init__.py, its own).
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = list(package[: len(package) - (node.level - 1)])
                target = base + (node.module.split(".") if node.module else [])
                if len(target) == 1:  # "from .. import x" at the top: x is the layer
                    found.update(alias.name for alias in node.names)
                    continue
            elif node.module and node.module.startswith("agent_factory."):
                target = node.module.split(".")
            else:
                continue
            found.add(target[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names
                         if a.name.startswith("agent_factory."))
    return found


def test_every_folder_imports_only_the_layers_below_it() -> None:
    wrong = []
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 40
    for path in files:
        layer = layer_of(path)
        assert layer in ALLOWED, f"{path.relative_to(PACKAGE)}: a layer docs/architecture.md lacks"
        for target in imported_layers(path) - {layer} - ALLOWED[layer]:
            wrong.append(f"{path.relative_to(PACKAGE)} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_only_the_face_stands_outside_a_folder() -> None:
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py", "errors.py"]
