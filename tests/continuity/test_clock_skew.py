"""Failback with a backup whose clock is ten minutes behind (libfaketime).

No clock is compared anywhere in failback -- conflicts are found from before
images -- so a skewed provider must change nothing: the bank of
test_bank.py through a crash of the primary, with railway's server
running ten minutes in the past, keeps every transfer, with the primary
reached directly or through a transaction-mode PgBouncer. The skew is real:
``now()`` on railway is checked to be behind.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psycopg
import pytest
from bank import BANK, FAST, Teller, bank_db, journal_size, ledger_ids, off_the_ledger
from fleet import wait_until
from pooler import PgBouncer

from agent_factory.testing.embedded import EmbeddedPostgres

SKEW_MINUTES = 10
_LIBS = ("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
         "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
         "/usr/lib/faketime/libfaketime.so.1")


def libfaketime() -> str:
    for lib in _LIBS:
        if Path(lib).exists():
            return lib
    message = "libfaketime not found (Debian: apt-get install faketime)"
    if os.environ.get("CI"):
        pytest.fail(message)  # .ci/run installs it: its absence is a broken CI
    pytest.skip(message)


@pytest.fixture
def skewed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, EmbeddedPostgres]]:
    """A primary on the real clock and a backup ten minutes behind, with the bank."""
    base = tmp_path_factory.mktemp("skew")
    servers = {
        "supabase": EmbeddedPostgres("supabase", base_dir=base),
        "railway": EmbeddedPostgres("railway", base_dir=base, env={
            "LD_PRELOAD": libfaketime(), "FAKETIME": f"-{SKEW_MINUTES}m",
            # Timeouts and latches keep the real monotonic clock.
            "DONT_FAKE_MONOTONIC": "1"}),
    }
    try:
        for server in servers.values():
            server.start()
            with psycopg.connect(server.url, autocommit=True) as conn:
                conn.execute(BANK)
        yield servers
    finally:
        for server in servers.values():
            server.close()


@pytest.mark.parametrize("pooled", [False, True], ids=["direct", "behind-pgbouncer"])
def test_a_backup_minutes_behind_changes_nothing(
        skewed: dict[str, EmbeddedPostgres], pooled: bool, request: pytest.FixtureRequest,
) -> None:
    """Also with the primary behind a transaction-mode PgBouncer (``pooled``): the
    drain and the fence keep nothing in a session there."""
    urls = {name: server.url for name, server in skewed.items()}
    with ExitStack() as stack:
        providers: dict[str, Any] = dict(urls)
        if pooled:
            bouncer = PgBouncer(skewed["supabase"], request.getfixturevalue("pgbouncer_binary"))
            stack.callback(bouncer.close)
            bouncer.start()
            providers["supabase"] = {"url": bouncer.url, "pooler": True}
        _skewed_bank(skewed, urls, providers)


def _skewed_bank(skewed: dict[str, EmbeddedPostgres], urls: dict[str, str],
                 providers: dict[str, Any]) -> None:
    with psycopg.connect(urls["railway"]) as conn:
        row = conn.execute("SELECT now()").fetchone()
    assert row is not None
    behind = (datetime.now(timezone.utc) - row[0]).total_seconds()
    assert SKEW_MINUTES * 60 - 30 < behind < SKEW_MINUTES * 60 + 30, behind
    primary = skewed["supabase"]
    with bank_db(providers, order=["supabase", "railway"],
                 conflict_delta_columns="accounts.balance", **FAST) as db, Teller(db) as teller:
        wait_until(lambda: teller.count() >= 30, timeout=30, message="transfers on the primary")
        primary.kill()
        wait_until(lambda: journal_size(urls["railway"]) >= 60, timeout=60,
                   message="transfers journaled on railway (its clock ten minutes behind)")
        primary.restart()
        wait_until(lambda: db.serving_provider == "supabase" and journal_size(urls["railway"])
                   == 0, timeout=60, message="back on the primary, railway drained")
        seen = teller.count()
        wait_until(lambda: teller.count() >= seen + 20, timeout=30,
                   message="transfers on the primary again")
    wait_until(lambda: journal_size(urls["railway"]) == 0, timeout=30, message="drained")
    on_primary = ledger_ids(urls["supabase"])
    assert set(teller.acked) <= on_primary, len(set(teller.acked) - on_primary)
    assert not set(teller.failed) & on_primary
    assert off_the_ledger(urls["supabase"]) == []
