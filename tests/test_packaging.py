"""What an installed distribution shows: version, entry points, licence; no database needed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import agent_factory

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11")

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(cwd)}
    return subprocess.run([sys.executable, *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def test_version_comes_from_the_installed_metadata() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert agent_factory.__version__ == pyproject["project"]["version"]
    assert "__version__" in dir(agent_factory)


def test_version_without_an_installed_distribution(tmp_path: Path) -> None:
    # A source tree on sys.path that was never installed has no metadata to read.
    code = (
        "import importlib.metadata as m\n"
        "def missing(name): raise m.PackageNotFoundError(name)\n"
        "m.version = missing\n"
        "import agent_factory\n"
        "print(agent_factory.__version__)\n"
    )
    proc = _run("-c", code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0+unknown"


def test_version_flag_and_python_dash_m_are_the_cli(tmp_path: Path) -> None:
    expected = f"agent-factory-db {agent_factory.__version__}"
    for args in (["-m", "agent_factory", "--version"],
                 ["-m", "agent_factory.cli", "--version"]):
        proc = _run(*args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == expected
    # Same commands and exit codes: no provider configured is a usage error (2).
    proc = _run("-m", "agent_factory", "health", cwd=tmp_path)
    assert proc.returncode == 2
    assert "No database providers configured" in proc.stderr
    proc = _run("-m", "agent_factory", "--help", cwd=tmp_path)
    assert proc.returncode == 0 and "schema" in proc.stdout and "failback" in proc.stdout


def test_licence_is_declared_the_pep_639_way() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    licence = (ROOT / "LICENSE").read_text()
    assert licence.startswith("MIT License") and "agent-factory contributors" in licence
    assert "Operating System :: POSIX" in project["classifiers"]
    assert all(url.startswith("https://") for url in project["urls"].values())
    assert any(dep.startswith("python-dotenv") for dep in project["dependencies"])
