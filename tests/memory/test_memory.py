"""Messages, history, sessions, the context manager and the two local storages."""

from __future__ import annotations

import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from fleet import run_concurrently

import agent_factory.memory as memory
from agent_factory.errors import AgentFactoryError, MissingDependencyError
from agent_factory.memory import (
    ContextManager,
    InMemoryStorage,
    MemoryStorage,
    Message,
    MessageHistory,
    Session,
    SQLiteStorage,
)
from agent_factory.memory.session import merge_messages

T0 = datetime(2025, 6, 1, 8, 30, 0, 250000, tzinfo=timezone.utc)


def test_exports() -> None:
    assert sorted(memory.__all__) == sorted([
        "AsyncKnowledgeStore", "AsyncMemoryStorage", "AsyncPostgresMemoryStorage",
        "AtomMatch", "ContextManager", "InMemoryStorage", "KnowledgeAtom", "KnowledgeStore",
        "MemoryStorage", "Message", "MessageHistory", "PostgresMemoryStorage", "SQLiteStorage",
        "Session", "SupabaseMemoryStorage",
    ])
    for name in memory.__all__:
        assert getattr(memory, name).__name__ == name
    with pytest.raises(AttributeError):
        memory.NoSuchThing  # noqa: B018


def test_import_is_lazy() -> None:
    code = (
        "import sys, threading; import agent_factory.memory as m; "
        "assert 'supabase' not in sys.modules and 'psycopg' not in sys.modules; "
        "m.PostgresMemoryStorage(); m.KnowledgeStore(); "
        "assert 'supabase' not in sys.modules; assert threading.active_count() == 1; "
        "print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.stdout.strip() == "ok", done.stderr


def test_missing_supabase_package_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "supabase", None)  # makes `import supabase` fail
    with pytest.raises(MissingDependencyError, match="pip install supabase") as info:
        memory.SupabaseMemoryStorage("https://x.supabase.co", "key")
    assert isinstance(info.value, ImportError) and isinstance(info.value, AgentFactoryError)


def test_message_defaults_and_timestamps() -> None:
    m = Message("user", "hi")
    assert len(m.id) == 32 and m.metadata == {}
    assert m.timestamp.tzinfo == timezone.utc
    assert Message("user", "hi").id != m.id
    naive = datetime(2025, 1, 1, 12, 0)
    assert Message("user", "x", timestamp=naive).timestamp == naive.astimezone(timezone.utc)
    paris = timezone(timedelta(hours=2))
    shifted = Message("user", "x", timestamp=datetime(2025, 1, 1, 12, 0, tzinfo=paris))
    assert shifted.timestamp == datetime(2025, 1, 1, 10, 0, tzinfo=timezone.utc)
    assert str(shifted.timestamp.tzinfo) == "UTC"
    assert Message.from_dict(m.to_dict()) == m
    assert "hi" in repr(m)


def test_history_queries() -> None:
    h = MessageHistory()
    for i in range(5):
        h.add_message("user" if i % 2 == 0 else "assistant", "x" * (8 * (i + 1)),
                      timestamp=T0 + timedelta(seconds=i))
    assert len(h) == 5
    assert [m.content for m in h.get_messages(limit=2)] == ["x" * 32, "x" * 40]
    assert h.get_messages(limit=0) == []
    assert len(h.get_messages(role="user")) == 3
    assert h.get_messages(limit=1, role="assistant")[0].content == "x" * 32
    h.get_messages().clear()  # a copy
    assert len(h) == 5
    # 4 chars a token: the newest (10 tokens) and the one before (8) fit in 18.
    assert [len(m.content) for m in h.get_context_window(18)] == [32, 40]
    assert h.get_context_window(100, token_counter=lambda m: 1) == h.get_messages()
    assert MessageHistory.from_dict(h.to_dict()) == h
    assert h.to_openai_format()[0] == {"role": "user", "content": "x" * 8}
    h.clear()
    assert len(h) == 0


def test_context_manager_keeps_system_and_order() -> None:
    h = MessageHistory()
    h.add_message("user", "a" * 40)        # 14 tokens with overhead
    h.add_message("system", "s" * 4)      # 5
    h.add_message("user", "b" * 40)        # 14
    h.add_message("assistant", "c" * 40)   # 14
    cm = ContextManager(max_tokens=35)
    assert [m.content[0] for m in cm.fit_to_window(h)] == ["s", "b", "c"]
    assert [m.content[0] for m in cm.fit_to_window(h, reserve_tokens=10)] == ["s", "c"]
    no_system = ContextManager(max_tokens=30, preserve_system=False)
    assert [m.content[0] for m in no_system.fit_to_window(h)] == ["b", "c"]
    long = Message("user", "z" * 1000)
    cut = cm.truncate_message(long, max_tokens=10)
    assert cut.content == "z" * 37 + "..." and cut.id == long.id
    assert cm.truncate_message(Message("user", "short"), 10).content == "short"
    assert cm.count_tokens(h.get_messages()) == 47
    assert "2 user messages" in cm.summarize_old_messages(h.get_messages())


def test_session_api() -> None:
    s = Session(user_id="alice")
    assert s.session_id.startswith("session_") and len(s.session_id) == 20
    assert isinstance(s.storage, InMemoryStorage)
    before = s.last_active
    s.add_system_message("be nice")
    s.add_user_message("hello", {"k": 1})
    s.add_assistant_message("hi!")
    assert len(s) == 3 and s.last_active >= before
    assert [m.role for m in s.get_recent_messages(2)] == ["user", "assistant"]
    assert s.get_full_context() == s.history.get_messages()
    assert [m.content for m in s.get_full_context(max_tokens=0)] == ["hi!"]
    s.set_metadata("topic", "greeting")
    assert s.get_metadata("topic") == "greeting" and s.get_metadata("x", 5) == 5
    s.save()
    assert Session.load(s.session_id, s.storage) == s
    assert Session.load(s.session_id) is None  # a fresh in-memory storage
    assert Session.from_dict(s.to_dict()) == s


@pytest.fixture(params=["memory", "sqlite"])
def local_storage(request: pytest.FixtureRequest, tmp_path: Path) -> MemoryStorage:
    if request.param == "memory":
        return InMemoryStorage()
    return SQLiteStorage(tmp_path / "sessions.db")


def test_local_storage_round_trip_and_merge(local_storage: MemoryStorage) -> None:
    s = Session(user_id="bob", storage=local_storage, created_at=T0, last_active=T0)
    s.add_user_message("one", {"n": [1, 2.5, None]})
    s.save()
    s.save()
    loaded = local_storage.load_session(s.session_id)
    assert loaded == s and loaded is not None and loaded.storage is local_storage
    # Two writers appending to copies of the same session lose nothing.
    a = local_storage.load_session(s.session_id)
    b = local_storage.load_session(s.session_id)
    assert a is not None and b is not None
    a.add_user_message("from a")
    b.add_user_message("from b")
    a.save()
    b.save()
    merged = local_storage.load_session(s.session_id)
    assert merged is not None
    assert sorted(m.content for m in merged.history) == ["from a", "from b", "one"]
    assert merged.history.get_messages()[0].content == "one"
    # Mutating the live session after a save does not change what is stored.
    s.history.get_messages()[0].metadata["n"] = "changed"  # type: ignore[index]
    again = local_storage.load_session(s.session_id)
    assert again is not None and again.history.get_messages()[0].metadata == {"n": [1, 2.5, None]}


def test_local_storage_list_and_delete(local_storage: MemoryStorage) -> None:
    ids = []
    for user in ("u1", "u2", "u1", ""):
        s = Session(user_id=user, storage=local_storage)
        s.save()
        ids.append(s.session_id)
    assert local_storage.list_sessions() == sorted(ids)
    assert local_storage.list_sessions("u1") == sorted([ids[0], ids[2]])
    assert local_storage.list_sessions("") == [ids[3]]
    assert local_storage.delete_session(ids[0]) is True
    assert local_storage.delete_session(ids[0]) is False
    assert local_storage.load_session(ids[0]) is None


def test_sqlite_concurrent_writers(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    base = Session(user_id="c", storage=SQLiteStorage(path))
    base.save()

    def writer(name: str) -> None:
        storage = SQLiteStorage(path)
        session = storage.load_session(base.session_id)
        assert session is not None
        for i in range(20):
            session.add_user_message(f"{name}{i}")
            storage.save_session(session)

    assert run_concurrently(writer, "xy", timeout=30) == []
    loaded = SQLiteStorage(path).load_session(base.session_id)
    assert loaded is not None and len(loaded) == 40


def test_merge_order() -> None:
    m = [Message("user", str(i), timestamp=T0 + timedelta(seconds=i)) for i in range(4)]
    assert merge_messages(m[:2], [m[0], m[1], m[3]]) == [m[0], m[1], m[3]]
    assert merge_messages([m[0], m[2]], [m[0], m[1]]) == [m[0], m[1], m[2]]
    edited = Message("user", "edited", timestamp=m[0].timestamp, id=m[0].id)
    assert merge_messages(m[:2], [edited]) == [edited, m[1]]
