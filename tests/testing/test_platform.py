"""Where the embedded servers cannot run (Windows), they say so instead of failing to import.

CI has no Windows: a subprocess stands in for it with ``pwd`` unimportable
(it does not exist there) and ``sys.platform`` set to ``win32`` once the
package is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent_factory.errors import EmbeddedPostgresError
from agent_factory.testing.postgres_process import check_platform

_WINDOWS = """
import sys
sys.modules["pwd"] = None  # no such module on Windows: any import of it fails
import agent_factory.cli.main as cli
import agent_factory.testing.embedded as embedded
sys.platform = "win32"
try:
    embedded.EmbeddedPostgres("x")
except embedded.EmbeddedPostgresError as exc:
    print("embedded:", exc)
sys.exit(cli.main(["demo", "--no-live"]))
"""


def test_posix_systems_pass() -> None:
    for platform in ("linux", "darwin", "freebsd14"):
        check_platform(platform)


@pytest.mark.parametrize("platform", ["win32", "cygwin"])
def test_windows_is_refused_saying_what_is_needed(platform: str) -> None:
    with pytest.raises(EmbeddedPostgresError, match="need a POSIX system") as info:
        check_platform(platform)
    assert "WSL" in str(info.value) and platform in str(info.value)


def test_the_cli_and_the_demo_on_windows(tmp_path: Path) -> None:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", _WINDOWS], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert "ModuleNotFoundError" not in proc.stderr, proc.stderr
    assert proc.returncode == 2, proc.stderr  # a usage error, not a crash
    assert "embedded: the embedded PostgreSQL servers" in proc.stdout
    assert "agent-factory-db: the embedded PostgreSQL servers" in proc.stderr
    assert "need a POSIX system" in proc.stderr and "WSL 2" in proc.stderr
