"""The sync and async managers and providers are twins: the same public surface, same signatures."""

from __future__ import annotations

import inspect

from agent_factory.core.async_database_manager import AsyncDatabaseManager
from agent_factory.core.database_manager import DatabaseManager
from agent_factory.engine.async_provider import AsyncProvider
from agent_factory.engine.provider import DatabaseProvider

#: The real differences: how each is opened and closed.
SYNC_ONLY = {"close_all", "__enter__", "__exit__"}
ASYNC_ONLY = {"open", "__aenter__", "__aexit__"}


def public(cls: type) -> dict[str, inspect.Signature]:
    out = {}
    for name, member in inspect.getmembers(cls):
        if name.startswith("_") and name not in SYNC_ONLY | ASYNC_ONLY | {"__init__"}:
            continue
        if callable(member):
            out[name] = inspect.signature(member)
    return out


def params(sig: inspect.Signature) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_the_managers_have_the_same_public_methods_and_signatures() -> None:
    sync, aio = public(DatabaseManager), public(AsyncDatabaseManager)
    assert set(sync) - SYNC_ONLY == set(aio) - ASYNC_ONLY
    for name in set(sync) - SYNC_ONLY:
        assert params(sync[name]) == params(aio[name]), name


def test_the_providers_run_the_same_call() -> None:
    assert params(inspect.signature(DatabaseProvider.run)) == params(
        inspect.signature(AsyncProvider.run))
    assert params(inspect.signature(DatabaseProvider.checkout)) == params(
        inspect.signature(AsyncProvider.checkout))
