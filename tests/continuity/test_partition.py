"""Two application instances, one cut off from a live primary: no split brain.

Instance A (this process) writes to the primary throughout. Instance B (another
process) reaches the primary through its own proxy, which the test cuts. The
primary's heartbeat (bumped by A) keeps reaching railway by replication, so B
refuses its writes (`SplitBrainRefusedError`, nothing sent) instead of forking
the data on railway, while its reads are served there. When the cut heals, B
writes to the primary again. Every acknowledged write of both instances is on
every provider exactly once, and nothing was written on a backup.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from fleet import wait_until
from test_failback import FAST, ORDER, Writer, ids_on
from test_failback_replication import direct, replicated  # noqa: F401 - fixture

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.testing.faultproxy import FaultProxy
from agent_factory.testing.fleet import Fleet

INSTANCE_B = textwrap.dedent(
    """
    import json, sys, time, uuid
    from pathlib import Path
    from agent_factory.core.database_manager import DatabaseManager
    from agent_factory.errors import (
        AllProvidersUnavailableError, OutcomeUnknownError, SplitBrainRefusedError)
    urls, fast = json.loads(sys.argv[1]), json.loads(sys.argv[2])
    out, stop = sys.argv[3], sys.argv[4]
    sql = ("INSERT INTO session_memories (id, session_id, user_id, memory_type, message_id, "
           "content) VALUES (%s, 'chaos', 'b', 'log', %s, '{}'::jsonb)")
    with DatabaseManager(urls, order=["supabase", "railway", "neon"], **fast) as db, \\
            open(out, "w") as acked:
        n = 0
        while not Path(stop).exists():
            row = str(uuid.uuid4())
            try:
                db.execute_query(sql, (row, f"b{n}"), fetch_mode="none")
                acked.write(f"{row} {db.serving_provider}\\n")
                acked.flush()
            except SplitBrainRefusedError:
                acked.write(f"- fenced\\n")
                acked.flush()
                # Reads go on, from the backup.
                port = db.execute_query("SELECT inet_server_port()", fetch_mode="one")[0]
                acked.write(f"- read-{db.serving_provider}-{port}\\n")
            except (OutcomeUnknownError, AllProvidersUnavailableError):
                pass
            n += 1
            time.sleep(0.01)
        # Let a pending failback finish before closing.
        deadline = time.monotonic() + 30
        while db.serving_provider != "supabase" and time.monotonic() < deadline:
            db.execute_query("SELECT 1")
            time.sleep(0.05)
    """
)


def lines(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines()] if path.exists() else []


def test_partitioned_instance_refuses_writes_serves_reads_and_resumes_after_heal(
    healthy_fleet: Fleet, replicated: dict[str, str], tmp_path: Path  # noqa: F811
) -> None:
    plain = direct(healthy_fleet, replicated)
    primary = healthy_fleet["supabase"]
    with FaultProxy(primary.server.host, primary.server.port) as cut:
        b_urls = dict(replicated)
        b_urls["supabase"] = replicated["supabase"].replace(
            str(primary.proxy.port), str(cut.port))
        out, stop = tmp_path / "b-acked.txt", tmp_path / "stop"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        b = subprocess.Popen(
            [sys.executable, "-c", INSTANCE_B, json.dumps(b_urls),
             json.dumps({**FAST, "monitor_interval": 0.2}), str(out), str(stop)],
            env=env, stderr=subprocess.PIPE, text=True,
        )
        try:
            with DatabaseManager(replicated, order=ORDER, **FAST) as a, Writer(a) as writer:
                wait_until(lambda: len(lines(out)) > 50 and len(writer.acked) > 50,
                           timeout=60, message="both instances writing")
                cut.set_mode("refuse")
                wait_until(lambda: sum(p == "fenced" for _, p in lines(out)) > 400,
                           timeout=30, message="instance B's writes refused while cut off")
                # Past the witness's quiet time many times over: still fenced.
                assert a.serving_provider == "supabase"  # A never left the primary
                cut.set_mode("pass")
                wait_until(lambda: lines(out)[-1][1] == "supabase", timeout=30,
                           message="instance B back on the primary")
                stop.touch()
                assert b.wait(timeout=60) == 0, b.stderr.read() if b.stderr else ""
        finally:
            stop.touch()
            if b.poll() is None:
                b.kill()
    b_lines = lines(out)
    b_acked = {row for row, p in b_lines if row != "-"}
    assert not [p for row, p in b_lines if row != "-" and p != "supabase"], \
        "instance B wrote on a backup while the primary was alive"
    assert any(p.startswith("read-railway") for _, p in b_lines), "B's reads were not served"
    everything = set(writer.acked) | b_acked
    assert writer.errors == []
    for name in ORDER:
        wait_until(lambda name=name: everything <= set(ids_on(plain[name])), timeout=30,
                   message=f"{name} has every acknowledged write")
        rows = ids_on(plain[name])
        assert len(rows) == len(set(rows)), f"duplicates on {name}"
