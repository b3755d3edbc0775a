"""One statement and how to read its answer: what a sync and an async store both run.

The stores build a `Call` per operation (SQL, parameters, routing hints and a
parser, all without I/O); `run` and `arun` are the only places that wait on
a manager. So `PostgresMemoryStorage` and `AsyncPostgresMemoryStorage` (or
`KnowledgeStore` and `AsyncKnowledgeStore`) share every decision and differ
only in ``await``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from psycopg.rows import tuple_row

from ..engine.provider import FetchMode

if TYPE_CHECKING:
    from ..core.async_database_manager import AsyncDatabaseManager
    from ..core.database_manager import DatabaseManager

T = TypeVar("T")

__all__ = ["Call", "arun", "run"]


@dataclass(frozen=True)
class Call(Generic[T]):
    """A statement for ``execute_query`` and the parser of its result."""

    query: str
    params: Any
    fetch: FetchMode
    parse: Callable[[Any], T]
    read_only: bool | None = None
    idempotent: bool | None = None


def run(db: DatabaseManager, call: Call[T]) -> T:
    """Run ``call`` through a sync manager (with its failover) and parse the answer.

    Rows are tuples whatever ``row_factory`` the user gave the manager: the
    parsers index them.
    """
    return call.parse(db.execute_query(call.query, call.params, call.fetch,
                                       read_only=call.read_only, idempotent=call.idempotent,
                                       row_factory=tuple_row))


async def arun(db: AsyncDatabaseManager, call: Call[T]) -> T:
    """`run` for an `AsyncDatabaseManager`: the event loop is never blocked."""
    return call.parse(await db.execute_query(call.query, call.params, call.fetch,
                                             read_only=call.read_only,
                                             idempotent=call.idempotent,
                                             row_factory=tuple_row))
