"""SupabaseMemoryStorage through the official client, tested at the HTTP boundary.

No PostgREST server runs here, so a small HTTP server on 127.0.0.1 speaks the
part of PostgREST the storage uses (select/filter/order/range, insert, upsert
with on_conflict, update, delete with count) and runs each request as SQL in
one transaction on a real database with the shipped schema, recording the
requests. A live test runs against a real project when SUPABASE_URL and a key
are set.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import psycopg
import pytest
from databases import schema_databases
from fleet import run_concurrently
from psycopg import sql
from test_memory_postgres import rich_session

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.errors import ConfigurationError, MemoryStorageError
from agent_factory.memory import PostgresMemoryStorage, Session
from agent_factory.testing.fleet import Fleet

pytest.importorskip("supabase", reason="the supabase package is not installed")
# The client passes deprecated arguments to its own REST client; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:The '(timeout|verify)' parameter is deprecated")

from agent_factory.memory import SupabaseMemoryStorage  # noqa: E402

RESERVED = {"select", "order", "limit", "offset", "on_conflict", "columns"}
KEY_VARS = ("SUPABASE_URL", "SUPABASE_KEY", "SUPABASE_SERVICE_ROLE_KEY", "SUPABASE_ANON_KEY")


class Request:
    def __init__(self, method: str, table: str, params: list[tuple[str, str]],
                 headers: dict[str, str]) -> None:
        self.method, self.table, self.params, self.headers = method, table, params, headers

    def param(self, name: str) -> str | None:
        return next((v for k, v in self.params if k == name), None)


class PostgrestEmulator:
    """PostgREST's /rest/v1/<table> subset, backed by a real PostgreSQL database."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.requests: list[Request] = []
        emulator = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _serve(self) -> None:
                emulator.handle(self)

            do_GET = do_POST = do_PATCH = do_DELETE = _serve

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- HTTP ---------------------------------------------------------------------

    def handle(self, h: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(h.path)
        table = parts.path.removeprefix("/rest/v1/")
        length = int(h.headers.get("Content-Length") or 0)
        body = json.loads(h.rfile.read(length)) if length else None
        req = Request(h.command, table, parse_qsl(parts.query, keep_blank_values=True),
                      {k.lower(): v for k, v in h.headers.items()})
        self.requests.append(req)
        prefer = {p.strip() for p in req.headers.get("prefer", "").split(",") if p.strip()}
        try:
            with psycopg.connect(self.dsn) as conn:  # one transaction per request
                status, payload, extra = self.run(conn, req, body, prefer)
        except psycopg.Error as exc:
            status = 409 if exc.sqlstate in ("23505", "23503") else 400
            payload = {"code": exc.sqlstate, "message": str(exc).splitlines()[0],
                       "details": None, "hint": None}
            extra = {}
        data = b"" if payload is None else json.dumps(payload).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(data)))
        for k, v in extra.items():
            h.send_header(k, v)
        h.end_headers()
        h.wfile.write(data)

    # -- SQL ----------------------------------------------------------------------

    def where(self, req: Request) -> tuple[sql.Composable, list[Any]]:
        clauses: list[sql.Composable] = []
        params: list[Any] = []
        for column, spec in req.params:
            if column in RESERVED:
                continue
            op, _, value = spec.partition(".")
            if op == "eq":
                clauses.append(sql.SQL("{} = %s").format(sql.Identifier(column)))
                params.append(value)
            elif op == "in":
                items = [v.strip('"') for v in value.strip("()").split(",")]
                clauses.append(sql.SQL("{}::text = ANY(%s)").format(sql.Identifier(column)))
                params.append(items)
            else:
                raise AssertionError(f"filter {op!r} not emulated")
        if not clauses:
            return sql.SQL(""), params
        return sql.SQL(" WHERE ") + sql.SQL(" AND ").join(clauses), params

    def order(self, req: Request) -> sql.Composable:
        spec = req.param("order")
        if not spec:
            return sql.SQL("")
        terms = []
        for term in spec.split(","):
            column, *mods = term.split(".")
            text = {"asc": "ASC", "desc": "DESC", "nullsfirst": "NULLS FIRST",
                    "nullslast": "NULLS LAST"}
            terms.append(sql.SQL("{} {}").format(
                sql.Identifier(column), sql.SQL(" ".join(text[m] for m in mods))))
        return sql.SQL(" ORDER BY ") + sql.SQL(", ").join(terms)

    def run(self, conn: psycopg.Connection[Any], req: Request, body: Any,
            prefer: set[str]) -> tuple[int, Any, dict[str, str]]:
        table = sql.Identifier(req.table)
        where, params = self.where(req)
        representation = "return=representation" in prefer
        if req.method == "GET":
            columns = sql.SQL(", ").join(
                sql.Identifier(c) for c in (req.param("select") or "*").split(","))
            limit = sql.SQL(" LIMIT {} OFFSET {}").format(
                int(req.param("limit") or 10**9), int(req.param("offset") or 0))
            inner = sql.SQL("SELECT {} FROM {}{}{}{}").format(
                columns, table, where, self.order(req), limit)
            rows = conn.execute(sql.SQL("SELECT coalesce(json_agg(t), '[]') FROM ({}) t")
                                .format(inner), params).fetchone()
            assert rows is not None
            return 200, rows[0], {"Content-Range": f"0-{len(rows[0]) - 1}/*"}
        if req.method == "POST":
            records = body if isinstance(body, list) else [body]
            cols = (req.param("columns") or ",".join(records[0])).replace('"', "").split(",")
            names = sql.SQL(", ").join(map(sql.Identifier, cols))
            stmt = sql.SQL("INSERT INTO {t} ({c}) SELECT {c} FROM "
                           "json_populate_recordset(NULL::{t}, %s)").format(t=table, c=names)
            conflict = req.param("on_conflict")
            if conflict and "resolution=merge-duplicates" in prefer:
                stmt += sql.SQL(" ON CONFLICT ({}) DO UPDATE SET {}").format(
                    sql.SQL(", ").join(map(sql.Identifier, conflict.split(","))),
                    sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c))
                                       for c in cols))
            stmt += sql.SQL(" RETURNING to_json({}.*)").format(table)
            out = [r[0] for r in conn.execute(stmt, [json.dumps(records)]).fetchall()]
            return 201, out if representation else None, {}
        if req.method == "PATCH":
            cols = list(body)
            stmt = sql.SQL("UPDATE {t} SET ({c}) = (SELECT {c} FROM json_populate_record("
                           "NULL::{t}, %s)){w} RETURNING to_json({t}.*)").format(
                t=table, c=sql.SQL(", ").join(map(sql.Identifier, cols)), w=where)
            out = [r[0] for r in conn.execute(stmt, [json.dumps(body), *params]).fetchall()]
            return 200, out if representation else None, {}
        if req.method == "DELETE":
            stmt = sql.SQL("DELETE FROM {}{} RETURNING to_json({}.*)").format(table, where, table)
            out = [r[0] for r in conn.execute(stmt, params).fetchall()]
            extra = {"Content-Range": f"*/{len(out)}"} if "count=exact" in prefer else {}
            return (200, out, extra) if representation else (204, None, extra)
        raise AssertionError(f"method {req.method} not emulated")


@pytest.fixture(scope="module")
def urls(fleet: Fleet) -> Iterator[dict[str, str]]:
    with schema_databases(fleet, "rest") as made:
        yield made


@pytest.fixture
def emulator(urls: dict[str, str], healthy_fleet: Fleet) -> Iterator[PostgrestEmulator]:
    server = PostgrestEmulator(urls["supabase"])
    yield server
    server.close()


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in KEY_VARS:
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def storage(emulator: PostgrestEmulator, clean_env: None) -> SupabaseMemoryStorage:
    return SupabaseMemoryStorage(emulator.url, "test-service-key")


def test_round_trip_and_idempotent_saves(
    storage: SupabaseMemoryStorage, emulator: PostgrestEmulator
) -> None:
    session = rich_session()
    session.storage = storage
    session.save()
    # Messages in one upsert, then the metadata row (update, then insert: new).
    assert [(r.method, r.param("on_conflict")) for r in emulator.requests] == [
        ("POST", "session_id,message_id"), ("PATCH", None), ("POST", None)]
    assert all(r.headers["apikey"] == "test-service-key" for r in emulator.requests)
    loaded = storage.load_session(session.session_id)
    assert loaded == session and loaded is not None and loaded.storage is storage
    emulator.requests.clear()
    session.save()
    assert [r.method for r in emulator.requests] == ["POST", "PATCH"]
    with psycopg.connect(emulator.dsn) as conn:
        count = conn.execute("SELECT count(*) FROM session_memories WHERE session_id = %s",
                             (session.session_id,)).fetchone()
    assert count == (1 + len(session),)
    assert storage.load_session("session_none") is None


def test_postgres_and_rest_storages_read_each_other(
    storage: SupabaseMemoryStorage, urls: dict[str, str]
) -> None:
    with DatabaseManager({"supabase": urls["supabase"]}) as db:
        direct = PostgresMemoryStorage(db)
        via_rest = rich_session()
        storage.save_session(via_rest)
        assert direct.load_session(via_rest.session_id) == via_rest
        via_sql = rich_session(user="dave")
        direct.save_session(via_sql)
        assert storage.load_session(via_sql.session_id) == via_sql
        via_sql.add_user_message("appended over REST")
        storage.save_session(via_sql)
        assert direct.load_session(via_sql.session_id) == via_sql


def test_pages_through_long_sessions(emulator: PostgrestEmulator, clean_env: None) -> None:
    storage = SupabaseMemoryStorage(emulator.url, "k", page_size=3)
    session = Session(user_id="pager", storage=storage)
    for i in range(10):
        session.add_user_message(f"m{i}")
    session.save()
    assert storage.load_session(session.session_id) == session
    gets = [r for r in emulator.requests if r.method == "GET"]
    assert [r.param("offset") for r in gets] == ["0", "3", "6", "9"]


def test_concurrent_first_saves_lose_nothing(emulator: PostgrestEmulator, clean_env: None) -> None:
    base = Session(user_id="race")
    barrier = threading.Barrier(2)

    def writer(name: str) -> None:
        mine = SupabaseMemoryStorage(emulator.url, "k")
        session = Session.from_dict(base.to_dict(), storage=mine)
        barrier.wait()
        for i in range(8):
            session.add_user_message(f"{name}{i}")
            session.save()

    assert run_concurrently(writer, "ab", timeout=60) == []
    loaded = SupabaseMemoryStorage(emulator.url, "k").load_session(base.session_id)
    assert loaded is not None and len(loaded) == 16


def test_list_delete_and_memory_atoms(
    storage: SupabaseMemoryStorage, three_sessions: tuple[str, list[str]]
) -> None:
    user, ids = three_sessions
    assert storage.list_sessions(user) == sorted(ids)
    atom = storage.save_memory_atom(ids[0], user, "decision", {"title": "REST"}, {"m": 1})
    assert atom["content"] == {"title": "REST"} and atom["metadata"] == {"m": 1}
    assert atom["created_at"].utcoffset().total_seconds() == 0
    later = storage.save_memory_atom(ids[0], user, "log", {"line": 2})
    assert [a["id"] for a in storage.query_memory_atoms(user_id=user, limit=5)] == [
        later["id"], atom["id"]]
    assert storage.query_memory_atoms(session_id=ids[0], memory_type="decision") == [atom]
    assert storage.delete_session(ids[0]) is True
    assert storage.delete_session(ids[0]) is False
    assert storage.query_memory_atoms(session_id=ids[0]) == []
    assert storage.list_sessions(user) == sorted(ids[1:])


def test_rest_errors_are_translated(emulator: PostgrestEmulator, clean_env: None) -> None:
    storage = SupabaseMemoryStorage(emulator.url, "k", table_name="no_such_table")
    with pytest.raises(MemoryStorageError, match="no_such_table") as info:
        storage.list_sessions()
    assert info.value.code == "42P01"
    closed = SupabaseMemoryStorage("http://127.0.0.1:9", "k")  # nothing listens
    with pytest.raises(MemoryStorageError, match="session list"):
        closed.list_sessions()


def test_credentials_from_environment(
    emulator: PostgrestEmulator, clean_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigurationError, match="SUPABASE_URL"):
        SupabaseMemoryStorage()
    monkeypatch.setenv("SUPABASE_URL", emulator.url)
    with pytest.raises(ConfigurationError, match="SUPABASE_KEY"):
        SupabaseMemoryStorage()
    monkeypatch.setenv("SUPABASE_ANON_KEY", "anon")
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", "your_service_role_key_here")
    for expected, var in (("anon", None), ("service", "SUPABASE_SERVICE_ROLE_KEY"),
                          ("plain", "SUPABASE_KEY")):
        if var:
            monkeypatch.setenv(var, expected)
        emulator.requests.clear()
        storage = SupabaseMemoryStorage()
        storage.list_sessions()
        assert emulator.requests[0].headers["apikey"] == expected
        assert expected not in repr(storage)


def test_credentials_from_dotenv_file(
    clean_env: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # No request is made: what is checked is what the storage resolved.
    env_file = tmp_path / ".env"
    env_file.write_text(
        'export SUPABASE_URL="https://ref.supabase.co" # project\n'
        "SUPABASE_SERVICE_ROLE_KEY='role#key' # service role\n"
        "SUPABASE_KEY=your_supabase_key_here\n"
    )
    storage = SupabaseMemoryStorage(dotenv=env_file)
    assert storage.supabase_url == "https://ref.supabase.co"
    assert storage.client.supabase_key == "role#key"  # the placeholder SUPABASE_KEY is skipped
    assert "role#key" not in repr(storage)
    # The environment wins over the file, as for DatabaseManager.
    monkeypatch.setenv("SUPABASE_SERVICE_ROLE_KEY", "from-env")
    assert SupabaseMemoryStorage(dotenv=env_file).client.supabase_key == "from-env"
    # The default file is .env in the working directory; None reads no file.
    monkeypatch.delenv("SUPABASE_SERVICE_ROLE_KEY")
    monkeypatch.chdir(tmp_path)
    assert SupabaseMemoryStorage().client.supabase_key == "role#key"
    with pytest.raises(ConfigurationError, match=r"SUPABASE_URL.*\.env file"):
        SupabaseMemoryStorage(dotenv=None)


@pytest.mark.skipif(
    not os.environ.get("SUPABASE_URL") or not any(os.environ.get(v) for v in KEY_VARS[1:]),
    reason="live Supabase test: set SUPABASE_URL and SUPABASE_KEY (or SUPABASE_SERVICE_ROLE_KEY) "
           "of a project with the session_memories migration deployed",
)
def test_live_supabase_round_trip() -> None:
    storage = SupabaseMemoryStorage()
    session = rich_session()
    session.storage = storage
    session.save()
    try:
        assert storage.load_session(session.session_id) == session
        assert session.session_id in storage.list_sessions(session.user_id)
    finally:
        assert storage.delete_session(session.session_id) is True

