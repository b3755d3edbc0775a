"""The async storages: the same surface as their sync twins, and the same rows on real servers."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Iterator

import pytest
from databases import schema_databases

from agent_factory.core.async_database_manager import AsyncDatabaseManager
from agent_factory.core.database_manager import DatabaseManager
from agent_factory.memory import (
    AsyncKnowledgeStore,
    AsyncPostgresMemoryStorage,
    KnowledgeAtom,
    KnowledgeStore,
    PostgresMemoryStorage,
    Session,
)
from agent_factory.testing.fleet import Fleet

FAST = {"hang_timeout": 1.0, "probe_interval": 0.1, "checkout_timeout": 30.0}
DIM = 4


@pytest.fixture(scope="module")
def urls(fleet: Fleet) -> Iterator[dict[str, str]]:
    with schema_databases(fleet, "memasync", DIM) as made:
        yield made


def surface(cls: type) -> dict[str, list[tuple[str, object, object]]]:
    out = {}
    for name, member in inspect.getmembers(cls, callable):
        if not name.startswith("_") or name == "__init__":
            out[name] = [(p.name, p.kind, p.default)
                         for p in inspect.signature(member).parameters.values()]
    return out


@pytest.mark.parametrize(("sync", "aio"), [(PostgresMemoryStorage, AsyncPostgresMemoryStorage),
                                           (KnowledgeStore, AsyncKnowledgeStore)])
def test_the_async_twins_have_the_same_methods_and_signatures(sync: type, aio: type) -> None:
    ours, theirs = surface(sync), surface(aio)
    assert set(ours) == set(theirs)
    for name, params in ours.items():
        assert params == theirs[name], name
        assert inspect.iscoroutinefunction(getattr(aio, name)) == (name != "__init__"), name


def test_what_one_twin_writes_the_other_reads(
        db: DatabaseManager, healthy_fleet: Fleet, urls: dict[str, str]) -> None:
    sync_sessions, sync_atoms = PostgresMemoryStorage(db), KnowledgeStore(db)
    written = Session(session_id="twin-1", user_id="ann", metadata={"k": 1},
                      storage=sync_sessions)
    written.add_user_message("from sync")
    written.save()
    sync_atoms.upsert(KnowledgeAtom(atom_id="a-1", atom_type="concept", title="t",
                                    content="c", embedding=[1.0, 0.0, 0.0, 0.0]))

    async def main() -> None:
        async with AsyncDatabaseManager(urls, order=list(healthy_fleet.names), **FAST) as adb:
            sessions, atoms = AsyncPostgresMemoryStorage(adb), AsyncKnowledgeStore(adb)
            loaded = await sessions.load_session("twin-1")
            assert loaded == written and loaded is not None and loaded.storage is sessions
            with pytest.raises(TypeError, match="asave"):
                loaded.save()
            loaded.add_assistant_message("from async")
            await loaded.asave()
            assert await sessions.list_sessions("ann") == ["twin-1"]
            await atoms.upsert_many([KnowledgeAtom(
                atom_id="a-2", atom_type="fault", title="t2", content="c2",
                metadata={"lang": "en"}, embedding=[0.0, 1.0, 0.0, 0.0])], batch_size=1)
            hits = await atoms.search([0.1, 1.0, 0.0, 0.0], k=1, metadata={"lang": "en"})
            assert [h.atom.atom_id for h in hits] == ["a-2"]
            assert [a.atom_id for a in await atoms.get_many(["a-2", "nope", "a-1"])] == [
                "a-2", "a-1"]
            assert await atoms.count() == 2
            assert await atoms.delete_many(["a-1", "nope"]) == 1

    asyncio.run(main())
    reloaded = sync_sessions.load_session("twin-1")
    assert reloaded is not None
    assert [m.content for m in reloaded.history.get_messages()] == ["from sync", "from async"]
    assert sync_atoms.get("a-1") is None and sync_atoms.get("a-2") is not None
