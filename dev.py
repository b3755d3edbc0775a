#!/usr/bin/env python3
"""Set up a local virtual environment and run the demo or the tests.

    python3 dev.py demo      # three embedded PostgreSQL providers, a live failover
    python3 dev.py test      # the whole test suite, plus ruff and mypy
    python3 dev.py bench     # the benchmarks under bench/

Only Python 3.10+ and a package index are needed. The virtual environment is
created in .venv (or reused) and the project is installed into it in editable
mode with its development extras; the install step is skipped when
pyproject.toml has not changed since the last one.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("AGENT_FACTORY_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
LINTED = ("agent_factory", "tests", "bench", "scripts", "examples", "dev.py")


def ensure_venv() -> None:
    if sys.version_info < (3, 10):  # noqa: UP036 - dev.py itself may run on an old Python
        sys.exit("agent-factory needs Python 3.10 or newer; found " + sys.version.split()[0])
    if not PY.exists():
        print(f"creating virtual environment in {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    stamp = VENV / ".agent-factory-installed"
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == digest:
        return
    print("installing agent-factory with its dev extras", flush=True)
    run([str(PY), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    run([str(PY), "-m", "pip", "install", "-q", "-e", f"{ROOT}[dev]"])
    stamp.write_text(digest)


def run(cmd: list[str]) -> None:
    code = subprocess.call(cmd, cwd=ROOT)
    if code:
        sys.exit(code)


def workers(args: list[str]) -> list[str]:
    """pytest-xdist's ``-n``: two workers unless the caller says otherwise.

    Two workers on two shared cores take about 60 % of the time of one
    process; each has its own fleet of servers. The timing tests hold beside
    the other worker's fault tests (a 400,000-row transaction, three teller
    processes) since the watchdog no longer calls a starved caller's unread
    answer a hang. ``python3 dev.py test -n 0`` runs one process.
    """
    if any(a == "-n" or a.startswith(("-n", "--numprocesses")) for a in args):
        return []
    # Whole files per worker: a module's fixtures (its databases, its fleet's
    # state) are set up once, and a module's tests may build on each other.
    return ["-n", "2", "--dist", "loadfile"]


def main(argv: list[str]) -> None:
    if not argv or argv[0] not in {"demo", "test", "bench"}:
        sys.exit(__doc__)
    ensure_venv()
    what, rest = argv[0], argv[1:]
    if what == "demo":
        run([str(BIN / "agent-factory-db"), "demo", *rest])
    elif what == "test":
        paths = [p for p in LINTED if (ROOT / p).exists()]
        run([str(PY), "-m", "ruff", "check", *paths])
        run([str(PY), "-m", "mypy"])
        run([str(PY), "-m", "pytest", *workers(rest), *rest])
    else:
        run([str(PY), "-m", "bench", *rest])


if __name__ == "__main__":
    main(sys.argv[1:])
