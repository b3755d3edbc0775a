"""Knowledge atoms with pgvector embeddings, through `DatabaseManager` (with failover).

Embeddings travel as pgvector's text form (``'[0.1,0.2]'::vector``), so no
adapter or numpy is needed; any iterable of numbers works (lists, numpy
arrays, ``pgvector.Vector``). pgvector stores float4: values come back
rounded to single precision. Every call is one statement: writes are
idempotent upserts keyed by ``atom_id`` (retried on another provider after a
lost connection), reads fail over like any SELECT.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, NamedTuple

from psycopg import sql

from ..core.database_manager import DatabaseManager
from ..errors import InvalidMemoryError
from .calls import Call, run
from .history import row_id, to_utc
from .manager import ManagedStore

__all__ = ["AtomMatch", "KnowledgeAtom", "KnowledgeCalls", "KnowledgeStore", "search_filters"]

# HNSW returns at most ef_search rows (pgvector's default: 40).
_DEFAULT_EF_SEARCH = 40


@dataclass
class KnowledgeAtom:
    """One row of ``knowledge_atoms``.

    ``id``, ``created_at`` and ``updated_at`` are set by the server.
    """

    atom_id: str
    atom_type: str
    title: str
    content: str
    summary: str = ""
    manufacturer: str = ""
    product_family: str | None = None
    product_version: str | None = None
    difficulty: str | None = None
    prerequisites: list[str] = field(default_factory=list)
    related_atoms: list[str] = field(default_factory=list)
    keywords: list[str] = field(default_factory=list)
    source_document: str = ""
    source_pages: list[int] = field(default_factory=list)
    source_url: str | None = None
    citations: list[Any] = field(default_factory=list)
    quality_score: float = 1.0
    safety_level: str = "info"
    safety_notes: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    embedding: list[float] | None = None
    last_validated_at: datetime | None = None
    id: str | None = None
    created_at: datetime | None = None
    updated_at: datetime | None = None


class AtomMatch(NamedTuple):
    """A search hit: the atom and its cosine similarity (1 - cosine distance)."""

    atom: KnowledgeAtom
    similarity: float


_SERVER = ("id", "created_at", "updated_at")
_WRITABLE = tuple(f.name for f in fields(KnowledgeAtom) if f.name not in _SERVER)
_ARRAY_TYPES = {"prerequisites": "text[]", "related_atoms": "text[]", "keywords": "text[]",
                "source_pages": "integer[]"}
_RECORD_TYPES = {**_ARRAY_TYPES, "citations": "jsonb", "quality_score": "double precision",
                 "metadata": "jsonb", "embedding": "text", "last_validated_at": "timestamptz"}


def _select_list(embedding: bool = True) -> str:
    """Every field of KnowledgeAtom, in order (the embedding as text, or NULL)."""
    def column(name: str) -> str:
        if name == "embedding":
            return "embedding::text" if embedding else "NULL::text"
        return "id::text" if name == "id" else name

    return ", ".join(column(f.name) for f in fields(KnowledgeAtom))


_COLUMNS = _select_list()

_UPSERT = """
INSERT INTO {t} AS k (id, {cols})
SELECT r.id, {values} FROM jsonb_to_recordset(%s::jsonb) AS r(id uuid, {record})
ON CONFLICT (atom_id) DO UPDATE SET ({cols}) = ({excluded})
"""
_GET = "SELECT {columns} FROM {t} WHERE atom_id = %s"
_GET_MANY = "SELECT {columns} FROM {t} WHERE atom_id = ANY(%s::text[])"
_DELETE = """WITH gone AS (DELETE FROM {t} WHERE atom_id = ANY(%s::text[]) RETURNING 1)
SELECT count(*) FROM gone"""
_FILTERS = """(%(type)s::text IS NULL OR atom_type = %(type)s)
  AND (%(maker)s::text IS NULL OR manufacturer = %(maker)s)
  AND (%(family)s::text IS NULL OR product_family = %(family)s)
  AND (%(keywords)s::text[] IS NULL OR keywords @> %(keywords)s)
  AND (%(meta)s::jsonb IS NULL OR metadata @> %(meta)s::jsonb)"""
_FILTER = "SELECT {columns} FROM {t} WHERE " + _FILTERS + " ORDER BY atom_id LIMIT %(limit)s"
# set_config(..., true) lasts for this statement's own transaction; the lateral
# reference to it makes the index scan start only after it ran. Only the k
# winners are then read in full.
_SEARCH = """
SELECT {columns}, 1 - hit.distance FROM
    (SELECT set_config('hnsw.ef_search', %(ef)s, true) AS ef) AS cfg
    CROSS JOIN LATERAL (
        SELECT id AS hit_id, embedding <=> %(q)s::vector AS distance FROM {t}
        WHERE cfg.ef IS NOT NULL AND embedding IS NOT NULL AND """ + _FILTERS + """
        ORDER BY embedding <=> %(q)s::vector LIMIT %(k)s
    ) AS hit
    JOIN {t} ON {t}.id = hit.hit_id
ORDER BY hit.distance
"""


def vector_literal(values: Iterable[float] | Any) -> str:
    """pgvector's text form of an embedding: ``[1.0,2.5]``."""
    if hasattr(values, "to_list"):  # pgvector.Vector
        values = values.to_list()
    floats = [float(v) for v in values]
    if not all(map(math.isfinite, floats)):
        raise InvalidMemoryError("embedding values must be finite (no NaN or infinity)")
    return "[" + ",".join(map(repr, floats)) + "]"


def parse_vector(text: str | None) -> list[float] | None:
    if text is None:
        return None
    inner = text.strip()[1:-1]
    return [float(v) for v in inner.split(",")] if inner else []


def _record(atom: KnowledgeAtom) -> dict[str, Any]:
    # The key derived from atom_id: a retried insert meets its first try's row
    # (on the primary after failback, on the backups by replication).
    record = {"id": row_id("knowledge_atoms", atom.atom_id),
              **{name: getattr(atom, name) for name in _WRITABLE}}
    if atom.embedding is not None:
        record["embedding"] = vector_literal(atom.embedding)
    if atom.last_validated_at is not None:
        record["last_validated_at"] = to_utc(atom.last_validated_at).isoformat()
    return record


def _payload(batch: list[dict[str, Any]]) -> str:
    ids = [r["atom_id"] for r in batch]
    if len(set(ids)) != len(ids):
        # ON CONFLICT DO UPDATE cannot touch one row twice in a statement.
        raise InvalidMemoryError("one upsert batch names the same atom_id twice")
    try:
        return json.dumps(batch, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidMemoryError(f"an atom is not JSON-serializable: {exc}") from exc


def _atom(row: Sequence[Any]) -> KnowledgeAtom:
    values = dict(zip((f.name for f in fields(KnowledgeAtom)), row, strict=True))
    values["embedding"] = parse_vector(values["embedding"])
    for name in ("last_validated_at", "created_at", "updated_at"):
        if values[name] is not None:
            values[name] = to_utc(values[name])
    return KnowledgeAtom(**values)


class KnowledgeCalls:
    """The statements of a knowledge table, as `Call` objects both store twins run."""

    def __init__(self, table_name: str) -> None:
        self.table_name = table_name
        t = sql.Identifier(*table_name.split("."))
        cols = ", ".join(_WRITABLE)

        def render(template: str, **parts: str) -> str:
            literal = {k: sql.SQL(v) for k, v in parts.items()}
            return sql.SQL(template).format(t=t, **literal).as_string()

        def value(name: str) -> str:
            return "r.embedding::vector" if name == "embedding" else f"r.{name}"

        upsert_parts = {
            "cols": cols,
            "values": ", ".join(value(n) for n in _WRITABLE),
            "record": ", ".join(f"{n} {_RECORD_TYPES.get(n, 'text')}" for n in _WRITABLE),
            "excluded": ", ".join(f"EXCLUDED.{n}" for n in _WRITABLE),
        }
        self._upsert = render(_UPSERT, **upsert_parts)
        self._upsert_one = render(_UPSERT + " RETURNING {columns}", columns=_COLUMNS,
                                  **upsert_parts)
        self._get = render(_GET, columns=_COLUMNS)
        self._get_many = render(_GET_MANY, columns=_COLUMNS)
        self._delete = render(_DELETE)
        self._filter = render(_FILTER, columns=_COLUMNS)
        self._search = {
            vectors: render(_SEARCH, columns=_select_list(vectors)) for vectors in (False, True)
        }
        self._count = render("SELECT count(*) FROM {t}")

    def upsert(self, atom: KnowledgeAtom) -> Call[KnowledgeAtom]:
        payload = _payload([_record(atom)])
        return Call(self._upsert_one, (payload,), "one", _atom, idempotent=True)

    def upsert_batches(self, atoms: Iterable[KnowledgeAtom], batch_size: int
                       ) -> Iterator[Call[int]]:
        """One upsert per ``batch_size`` atoms; each call returns how many it sent."""
        batch: list[dict[str, Any]] = []
        for atom in atoms:
            batch.append(_record(atom))
            if len(batch) >= batch_size:
                yield self._send(batch)
                batch = []
        if batch:
            yield self._send(batch)

    def _send(self, batch: list[dict[str, Any]]) -> Call[int]:
        size = len(batch)
        return Call(self._upsert, (_payload(batch),), "none", lambda _: size, idempotent=True)

    def get(self, atom_id: str) -> Call[KnowledgeAtom | None]:
        return Call(self._get, (atom_id,), "one",
                    lambda row: None if row is None else _atom(row), read_only=True)

    def get_many(self, atom_ids: Sequence[str]) -> Call[list[KnowledgeAtom]]:
        """The atoms that exist, in the order of ``atom_ids`` (each once)."""
        def ordered(rows: list[Sequence[Any]]) -> list[KnowledgeAtom]:
            found = {atom.atom_id: atom for atom in map(_atom, rows)}
            return [found[i] for i in dict.fromkeys(atom_ids) if i in found]

        return Call(self._get_many, (list(atom_ids),), "all", ordered, read_only=True)

    def delete(self, atom_ids: Sequence[str]) -> Call[int]:
        return Call(self._delete, (list(atom_ids),), "one",
                    lambda row: int(row[0]) if row else 0, idempotent=True)

    def filter(self, filters: dict[str, Any], limit: int) -> Call[list[KnowledgeAtom]]:
        return Call(self._filter, {**filters, "limit": limit}, "all",
                    lambda rows: [_atom(r) for r in rows], read_only=True)

    def search(self, embedding: Iterable[float] | Any, k: int, filters: dict[str, Any],
               ef_search: int | None, with_embeddings: bool) -> Call[list[AtomMatch]]:
        ef = max(_DEFAULT_EF_SEARCH, k) if ef_search is None else ef_search
        params = {**filters, "q": vector_literal(embedding), "k": k, "ef": str(ef)}
        return Call(self._search[with_embeddings], params, "all",
                    lambda rows: [AtomMatch(_atom(r[:-1]), float(r[-1])) for r in rows],
                    read_only=True)

    def count(self) -> Call[int]:
        return Call(self._count, None, "one", lambda row: int(row[0]), read_only=True)


class KnowledgeStore(ManagedStore):
    """Upsert, fetch, filter and search `KnowledgeAtom` rows of ``knowledge_atoms``.

    ``db=None`` creates ``DatabaseManager()`` (from the environment) on first use.
    `AsyncKnowledgeStore` is the same store for asyncio.
    """

    def __init__(
        self, db: DatabaseManager | None = None, *, table_name: str = "knowledge_atoms"
    ) -> None:
        super().__init__(db)
        self.table_name = table_name
        self._calls = KnowledgeCalls(table_name)

    def upsert(self, atom: KnowledgeAtom) -> KnowledgeAtom:
        """Insert or replace the atom with this ``atom_id``; returns it as stored."""
        return run(self.db, self._calls.upsert(atom))

    def upsert_many(self, atoms: Iterable[KnowledgeAtom], *, batch_size: int = 500) -> int:
        """Upsert atoms, ``batch_size`` per statement; returns how many were sent."""
        return sum(run(self.db, call) for call in self._calls.upsert_batches(atoms, batch_size))

    def get(self, atom_id: str) -> KnowledgeAtom | None:
        return run(self.db, self._calls.get(atom_id))

    def get_many(self, atom_ids: Sequence[str]) -> list[KnowledgeAtom]:
        """The atoms that exist, in the order of ``atom_ids``, in one statement."""
        return run(self.db, self._calls.get_many(atom_ids))

    def delete(self, atom_id: str) -> bool:
        """Delete the atom; True if it existed (on the provider that served)."""
        return run(self.db, self._calls.delete([atom_id])) > 0

    def delete_many(self, atom_ids: Sequence[str]) -> int:
        """Delete the atoms in one statement; how many existed."""
        return run(self.db, self._calls.delete(atom_ids))

    def filter(
        self,
        *,
        atom_type: str | None = None,
        manufacturer: str | None = None,
        product_family: str | None = None,
        keywords: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        limit: int = 100,
    ) -> list[KnowledgeAtom]:
        """Atoms matching every given filter (``keywords``: all of them), by atom_id.

        ``metadata`` matches atoms whose metadata contains it (jsonb ``@>``).
        """
        filters = search_filters(atom_type, manufacturer, product_family, keywords, metadata)
        return run(self.db, self._calls.filter(filters, limit))

    def search(
        self,
        embedding: Iterable[float] | Any,
        k: int = 5,
        *,
        atom_type: str | None = None,
        manufacturer: str | None = None,
        product_family: str | None = None,
        keywords: Sequence[str] | None = None,
        metadata: Mapping[str, Any] | None = None,
        ef_search: int | None = None,
        with_embeddings: bool = False,
    ) -> list[AtomMatch]:
        """The ``k`` atoms nearest by cosine distance, most similar first.

        Hits carry ``embedding=None`` unless ``with_embeddings`` (1536 floats a
        hit cost more to ship and parse than the search itself).

        With the HNSW index, filters apply to the ``ef_search`` nearest
        candidates (default ``max(40, k)``), so a selective filter can return
        fewer than ``k`` hits: raise ``ef_search`` then.
        """
        filters = search_filters(atom_type, manufacturer, product_family, keywords, metadata)
        return run(self.db, self._calls.search(embedding, k, filters, ef_search,
                                               with_embeddings))

    def count(self) -> int:
        return run(self.db, self._calls.count())


def search_filters(
    atom_type: str | None,
    manufacturer: str | None,
    product_family: str | None,
    keywords: Sequence[str] | None,
    metadata: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "type": atom_type,
        "maker": manufacturer,
        "family": product_family,
        "keywords": None if keywords is None else list(keywords),
        "meta": None if metadata is None else _json_filter(metadata),
    }


def _json_filter(metadata: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(metadata), allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidMemoryError(f"a metadata filter is not JSON-serializable: {exc}") from exc
