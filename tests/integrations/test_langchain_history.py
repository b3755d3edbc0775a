"""SessionChatMessageHistory against BaseChatMessageHistory's contract, on real servers:
exact round trips of every message type, appends, clear, and the async twin."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator

import pytest
from databases import schema_databases
from langchain_core.messages import (
    AIMessage,
    BaseMessage,
    ChatMessage,
    FunctionMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)

from agent_factory.core.async_database_manager import AsyncDatabaseManager
from agent_factory.core.database_manager import DatabaseManager
from agent_factory.integrations.langchain import SessionChatMessageHistory
from agent_factory.memory import (
    AsyncPostgresMemoryStorage,
    InMemoryStorage,
    PostgresMemoryStorage,
    Session,
)
from agent_factory.testing.fleet import Fleet

FAST = {"hang_timeout": 1.0, "probe_interval": 0.1, "checkout_timeout": 30.0}

EVERY_KIND: list[BaseMessage] = [
    SystemMessage("Be terse."),
    HumanMessage("Grüße 👋", additional_kwargs={"k": [1, None]}, name="alice"),
    AIMessage("", tool_calls=[{"name": "calc", "args": {"x": 2}, "id": "call-1"}],
              usage_metadata={"input_tokens": 3, "output_tokens": 1, "total_tokens": 4}),
    ToolMessage("4", tool_call_id="call-1"),
    AIMessage([{"type": "text", "text": "It is 4."}], id="ai-2"),
    FunctionMessage("{}", name="legacy"),
    ChatMessage("aside", role="critic"),
]


@pytest.fixture(scope="module")
def urls(fleet: Fleet) -> Iterator[dict[str, str]]:
    with schema_databases(fleet, "lchist") as made:
        yield made


@pytest.fixture
def storage(db: DatabaseManager) -> PostgresMemoryStorage:
    return PostgresMemoryStorage(db)


def test_every_message_kind_comes_back_exactly(storage: PostgresMemoryStorage) -> None:
    history = SessionChatMessageHistory("lc-exact", storage, user_id="alice")
    assert history.messages == []
    history.add_messages(EVERY_KIND[:3])
    history.add_messages(EVERY_KIND[3:])
    assert history.messages == EVERY_KIND
    # The session API sees the same conversation, in the schema's roles.
    session = storage.load_session("lc-exact")
    assert session is not None and session.user_id == "alice"
    assert [m.role for m in session.history.get_messages()] == [
        "system", "user", "assistant", "tool", "assistant", "tool", "user"]
    assert session.history.get_messages()[4].content == "It is 4."


def test_the_helpers_of_the_base_class_append(storage: PostgresMemoryStorage) -> None:
    history = SessionChatMessageHistory("lc-helpers", storage)
    history.add_user_message("hi")
    history.add_ai_message("hello")
    history.add_message(HumanMessage("again"))
    assert [type(m) for m in history.messages] == [HumanMessage, AIMessage, HumanMessage]
    assert [m.content for m in history.messages] == ["hi", "hello", "again"]
    assert "Human: hi" in str(history)


def test_re_adding_a_message_with_an_id_keeps_one_copy(storage: PostgresMemoryStorage) -> None:
    history = SessionChatMessageHistory("lc-ids", storage)
    history.add_messages([HumanMessage("q", id="m1")])
    history.add_messages([HumanMessage("q, edited", id="m1"), AIMessage("a", id="m2")])
    assert history.messages == [HumanMessage("q, edited", id="m1"), AIMessage("a", id="m2")]


def test_session_messages_read_as_langchain_messages(storage: PostgresMemoryStorage) -> None:
    session = Session(session_id="native", user_id="u", storage=storage)
    session.add_system_message("sys")
    session.add_user_message("question")
    session.add_assistant_message("answer")
    session.add_message("tool", "result", {"tool_call_id": "c9"})
    session.save()
    got = SessionChatMessageHistory("native", storage).messages
    ids = [m.id for m in session.history.get_messages()]
    assert got == [SystemMessage("sys", id=ids[0]), HumanMessage("question", id=ids[1]),
                   AIMessage("answer", id=ids[2]),
                   ToolMessage("result", tool_call_id="c9", id=ids[3])]


def test_clear_removes_the_messages_and_keeps_the_memory_atoms(
        storage: PostgresMemoryStorage) -> None:
    history = SessionChatMessageHistory("lc-clear", storage, user_id="bob")
    history.add_messages([HumanMessage("x"), AIMessage("y")])
    storage.save_memory_atom("lc-clear", "bob", "decision", {"chose": "y"})
    history.clear()
    assert history.messages == []
    assert "lc-clear" not in storage.list_sessions()
    assert [a["content"] for a in storage.query_memory_atoms(session_id="lc-clear")] == [
        {"chose": "y"}]
    history.add_user_message("fresh start")
    assert [m.content for m in history.messages] == ["fresh start"]


def test_any_memory_storage_works() -> None:
    history = SessionChatMessageHistory("mem", InMemoryStorage())
    history.add_messages(EVERY_KIND)
    assert history.messages == EVERY_KIND
    history.clear()
    assert history.messages == []


def test_the_async_methods_await_the_async_storage(
        healthy_fleet: Fleet, urls: dict[str, str], storage: PostgresMemoryStorage) -> None:
    async def main() -> list[BaseMessage]:
        async with AsyncDatabaseManager(urls, order=list(healthy_fleet.names), **FAST) as adb:
            history = SessionChatMessageHistory(
                "lc-async", async_storage=AsyncPostgresMemoryStorage(adb))
            with pytest.raises(TypeError, match="only an async storage"):
                history.messages  # noqa: B018 - the property is the call
            await history.aadd_messages(EVERY_KIND[:4])
            await history.aadd_messages(EVERY_KIND[4:])
            got = await history.aget_messages()
            await history.aclear()
            assert await history.aget_messages() == []
            await history.aadd_messages(EVERY_KIND[:1])
            return got

    assert asyncio.run(main()) == EVERY_KIND
    # What the async twin wrote, the sync storage reads the same.
    assert SessionChatMessageHistory("lc-async", storage).messages == EVERY_KIND[:1]


def test_without_langchain_the_import_names_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['langchain_core'] = None\n"
        "import agent_factory, agent_factory.memory\n"
        "try:\n"
        "    import agent_factory.integrations.langchain\n"
        "except ImportError as exc:\n"
        "    print(type(exc).__name__, exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.startswith("MissingDependencyError")
    assert "pip install 'agent-factory[langchain]'" in out


def test_the_library_never_imports_langchain() -> None:
    code = ("import sys, agent_factory, agent_factory.memory, agent_factory.integrations\n"
            "from agent_factory.memory import PostgresMemoryStorage, KnowledgeStore\n"
            "print(sorted(m for m in sys.modules if m.startswith('langchain')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert out.strip() == "[]"
