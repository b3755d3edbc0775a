"""Fresh databases on every fleet server, so test modules never share tables."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from defaults import ORDER
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from agent_factory.continuity.replication import setup_replication, teardown_replication
from agent_factory.engine.settings import Settings
from agent_factory.schema import apply_migrations
from agent_factory.testing.fleet import Fleet


class Conninfo(str):
    """A test database's connection string whose repr hides its password.

    pytest prints a failing test's fixture values (a dict of these): the CI log
    then shows the target, never the password. The string itself is unchanged.
    """

    def __repr__(self) -> str:
        params = conninfo_to_dict(str(self))
        if "password" in params:
            params["password"] = "***"
        return repr(make_conninfo("", **params))


def with_dbname(url: str, dbname: str) -> str:
    """The same connection target with another database name."""
    return Conninfo(make_conninfo("", **{**conninfo_to_dict(url), "dbname": dbname}))


def with_port(url: str, port: int) -> str:
    """The same connection target through another port on the same host."""
    return Conninfo(make_conninfo("", **{**conninfo_to_dict(url), "port": str(port)}))


def create_databases(fleet: Fleet, prefix: str = "t") -> dict[str, str]:
    """One new empty database per provider; returns proxied URLs by provider name."""
    dbname = f"{prefix}_{uuid.uuid4().hex[:10]}"
    for member in fleet:
        with psycopg.connect(member.direct_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{dbname}"')
    return {member.name: with_dbname(member.url, dbname) for member in fleet}


def drop_databases(fleet: Fleet, urls: dict[str, str]) -> None:
    """Drop what `create_databases` made (the fleet must be healthy)."""
    for member in fleet:
        dbname = conninfo_to_dict(urls[member.name])["dbname"]
        with psycopg.connect(member.direct_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{dbname}" WITH (FORCE)')


@contextmanager
def schema_databases(fleet: Fleet, prefix: str, embedding_dim: int = 8) -> Iterator[dict[str, str]]:
    """Fresh databases on every provider with the shipped schema; dropped afterwards."""
    fleet.heal()
    urls = create_databases(fleet, prefix)
    try:
        for url in urls.values():
            apply_migrations(url, embedding_dim=embedding_dim)
        yield urls
    finally:
        fleet.heal()
        drop_databases(fleet, urls)


@pytest.fixture
def replicated(healthy_fleet: Fleet, request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """Databases of their own, the backups subscribed to the primary's tables.

    The shipped schema on every provider, logical replication from the
    primary (`ORDER`'s first) to each backup; proxied URLs by provider name.
    A test module imports this fixture; its databases are named after it.
    """
    prefix = request.module.__name__.rpartition(".")[2].removeprefix("test_")
    urls = create_databases(healthy_fleet, prefix)
    plain = {m.name: with_port(urls[m.name], m.server.port) for m in healthy_fleet}
    for url in plain.values():
        apply_migrations(url, embedding_dim=8)
    settings = Settings.build(plain, order=ORDER)
    report = setup_replication(settings)
    assert not report.errors, report.errors
    yield urls
    healthy_fleet.heal()
    teardown_replication(settings)
    drop_databases(healthy_fleet, urls)
