"""Catalog snapshots of a database's schema, and the drift between providers.

A `Catalog` maps every schema object of the current schema to a one-line
description: required extensions, tables, columns (type, nullability,
default), constraints, indexes and triggers (their definitions), functions
that are not part of an extension, and the applied migrations. Two providers
match when their maps are equal. `build_catalog`, `diff_catalogs` and
`format_differences` do no I/O; `read_catalog` runs the queries in one
read-only snapshot.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import psycopg

from ..errors import AgentFactoryError, ProviderError, ProviderUnavailableError
from .migrations import AppliedMigration, describe_db_error, read_applied

__all__ = [
    "KINDS",
    "Catalog",
    "Difference",
    "build_catalog",
    "diff_catalogs",
    "format_differences",
    "read_catalog",
    "read_catalogs",
]

# Report order; the kinds after "table" belong to a table named before the dot.
KINDS = ("extension", "table", "column", "constraint", "index", "trigger", "function",
         "migration")
_TABLE_CHILDREN = {"column", "constraint", "index", "trigger"}
_RELKINDS = {"r": "table", "p": "partitioned table", "v": "view", "m": "materialized view",
             "f": "foreign table"}
MISSING = "(missing)"

Key = tuple[str, str]


@dataclass(frozen=True)
class Catalog:
    """One database's schema: ``objects[(kind, name)]`` is a description."""

    objects: Mapping[Key, str]
    extensions: Mapping[str, str] = field(default_factory=dict)  # every installed one: version
    available: frozenset[str] = frozenset()  # extensions the server could install
    applied: tuple[AppliedMigration, ...] = ()
    schema: str = "public"
    server_version: str = ""


@dataclass(frozen=True)
class Difference:
    """One object whose description is not the same on every provider (None: absent)."""

    kind: str
    name: str
    values: Mapping[str, str | None]

    def format(self) -> str:
        groups: dict[str, list[str]] = {}
        for provider, value in self.values.items():
            groups.setdefault(MISSING if value is None else value, []).append(provider)
        labels = {value: ", ".join(names) + ":" for value, names in groups.items()}
        width = max(len(label) for label in labels.values())
        lines = [f"  {self.kind} {self.name}"]
        lines += [f"    {labels[value]:<{width}} {value}" for value in groups]
        return "\n".join(lines)


def build_catalog(
    rows: Mapping[str, Sequence[Sequence[Any]]],
    *,
    schema: str,
    required_extensions: Iterable[str] = ("vector",),
    applied: Sequence[AppliedMigration] = (),
    server_version: str = "",
) -> Catalog:
    """A `Catalog` from the results of the `_QUERIES`, keyed like them."""
    qualifier = re.compile(rf"\b(ON|EXECUTE FUNCTION) (ONLY )?{re.escape(_quote(schema))}\.")

    def unqualified(definition: str) -> str:
        return qualifier.sub(lambda m: f"{m.group(1)} {m.group(2) or ''}", definition)

    installed = {str(name): str(version) for name, version in rows["extensions"]}
    available = frozenset(str(name) for (name,) in rows.get("available", ()))
    objects: dict[Key, str] = {}
    for ext in required_extensions:
        objects["extension", ext] = "installed" if ext in installed else MISSING
    for name, relkind in rows["tables"]:
        objects["table", name] = _RELKINDS.get(relkind, f"relkind {relkind}")
    for table, column, type_, notnull, default, identity, generated in rows["columns"]:
        text = type_ + (" NOT NULL" if notnull else " (nullable)")
        if generated:
            text += f" GENERATED ALWAYS AS {default} STORED"
        elif default is not None:
            text += f" DEFAULT {default}"
        if identity:
            text += " IDENTITY " + ("ALWAYS" if identity == "a" else "BY DEFAULT")
        objects["column", f"{table}.{column}"] = text
    for table, name, definition in rows["constraints"]:
        objects["constraint", f"{table}.{name}"] = definition
    for table, name, definition in rows["indexes"]:
        objects["index", f"{table}.{name}"] = unqualified(definition)
    for table, name, definition in rows["triggers"]:
        objects["trigger", f"{table}.{name}"] = unqualified(definition)
    for signature, result, body_md5 in rows["functions"]:
        objects["function", signature] = f"returns {result}, body md5 {body_md5[:12]}"
    for record in applied:
        objects["migration", f"{record.version:04d}"] = (
            f"{record.name}, checksum {record.checksum[:12]}"
        )
    return Catalog(objects, installed, available, tuple(applied), schema, server_version)


def diff_catalogs(catalogs: Mapping[str, Catalog]) -> list[Difference]:
    """Objects that differ between providers, in report order.

    An object of a table that is missing on some providers is not repeated
    when it is otherwise identical: the missing table says it all.
    """
    keys = sorted({k for c in catalogs.values() for k in c.objects}, key=_order)
    diffs: list[Difference] = []
    for kind, name in keys:
        values = {p: c.objects.get((kind, name)) for p, c in catalogs.items()}
        if len(set(values.values())) <= 1:
            continue
        if kind in _TABLE_CHILDREN:
            table = name.split(".", 1)[0]
            without_table = {p for p, c in catalogs.items() if ("table", table) not in c.objects}
            present = {v for v in values.values() if v is not None}
            absent = {p for p, v in values.items() if v is None}
            if len(present) == 1 and absent <= without_table:
                continue
        diffs.append(Difference(kind, name, values))
    return diffs


def format_differences(diffs: Sequence[Difference]) -> str:
    if not diffs:
        return "No differences."
    head = f"{len(diffs)} difference{'s' if len(diffs) != 1 else ''} between providers:"
    return "\n".join([head, *(d.format() for d in diffs)])


def _order(key: Key) -> tuple[int, str]:
    return KINDS.index(key[0]) if key[0] in KINDS else len(KINDS), key[1]


def _quote(identifier: str) -> str:
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", identifier):
        return identifier
    return '"' + identifier.replace('"', '""') + '"'


# -- I/O -----------------------------------------------------------------------

_IN_SCHEMA = "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = current_schema()"
_QUERIES: dict[str, str] = {
    "extensions": "SELECT extname, extversion FROM pg_extension",
    "available": "SELECT name FROM pg_available_extensions",
    "tables": f"""SELECT c.relname, c.relkind::text FROM pg_class c {_IN_SCHEMA}
        AND c.relkind IN ('r', 'p', 'v', 'm', 'f')""",
    "columns": f"""SELECT c.relname, a.attname, format_type(a.atttypid, a.atttypmod),
            a.attnotnull, pg_get_expr(d.adbin, d.adrelid), a.attidentity::text,
            a.attgenerated::text
        FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
        LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
        {_IN_SCHEMA} AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
        AND a.attnum > 0 AND NOT a.attisdropped""",
    "constraints": f"""SELECT c.relname, con.conname, pg_get_constraintdef(con.oid, true)
        FROM pg_constraint con JOIN pg_class c ON c.oid = con.conrelid {_IN_SCHEMA}""",
    "indexes": f"""SELECT c.relname, i.relname, pg_get_indexdef(i.oid)
        FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid
        JOIN pg_class c ON c.oid = x.indrelid {_IN_SCHEMA}""",
    "triggers": f"""SELECT c.relname, t.tgname, pg_get_triggerdef(t.oid, true)
        FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid {_IN_SCHEMA}
        AND NOT t.tgisinternal""",
    "functions": """SELECT p.proname || '(' || pg_get_function_identity_arguments(p.oid) || ')',
            pg_get_function_result(p.oid), md5(coalesce(p.prosrc, ''))
        FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
        WHERE n.nspname = current_schema() AND NOT EXISTS (
            SELECT 1 FROM pg_depend d WHERE d.classid = 'pg_proc'::regclass
            AND d.objid = p.oid AND d.deptype = 'e')""",
}


def read_catalog(
    conn: psycopg.Connection[Any], required_extensions: Iterable[str] = ("vector",)
) -> Catalog:
    """Snapshot the current schema of ``conn`` (one read-only transaction)."""
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        row = conn.execute("SELECT current_schema(), current_setting('server_version')").fetchone()
        assert row is not None
        rows = {name: conn.execute(query).fetchall() for name, query in _QUERIES.items()}
        applied = read_applied(conn)
    return build_catalog(rows, schema=row[0] or "public", required_extensions=required_extensions,
                         applied=applied, server_version=row[1])


def read_catalogs(
    connectors: Mapping[str, Callable[[], psycopg.Connection[Any]]],
    required_extensions: Iterable[str] = ("vector",),
    timeout: float = 60.0,
) -> dict[str, Catalog | AgentFactoryError]:
    """Snapshot several databases at once: ``{name: Catalog or the error}``.

    ``connectors[name]()`` opens a connection (raising `AgentFactoryError`
    when it cannot). A database silent for ``timeout`` seconds is reported
    unavailable; its thread is a daemon, so a hung server never keeps the
    process alive.
    """
    required = tuple(required_extensions)
    results: dict[str, Catalog | AgentFactoryError] = {}

    def work(name: str, connect: Callable[[], psycopg.Connection[Any]]) -> None:
        try:
            with connect() as conn:
                results[name] = read_catalog(conn, required)
        except AgentFactoryError as exc:
            results[name] = exc
        except psycopg.Error as exc:
            results[name] = ProviderUnavailableError(name, describe_db_error(exc))
        except Exception as exc:  # reported with the provider, not lost in a thread
            results[name] = ProviderError(name, f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=item, daemon=True,
                                name=f"schema-catalog-{item[0]}") for item in connectors.items()]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    done = dict(results)
    return {name: done.get(name) or ProviderUnavailableError(
        name, f"no answer within {timeout:g}s") for name in connectors}
