"""The ``--json`` documents of ``schema verify`` and ``schema status`` (no I/O)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ..engine.settings import ProviderSettings
from ..errors import AgentFactoryError
from ..schema.catalog import Catalog, Difference
from ..schema.migrations import Migration, plan_migrations

__all__ = ["status_json", "verify_json"]


def verify_json(
    targets: Sequence[ProviderSettings], results: Mapping[str, Catalog | AgentFactoryError],
    diffs: Sequence[Difference], problems: Sequence[str], migrations: Sequence[Migration],
) -> dict[str, Any]:
    """``schema verify --json``: each provider as read, the differences, the migrations' state."""
    providers: dict[str, dict[str, Any]] = {}
    for target in targets:
        result = results[target.name]
        if isinstance(result, Catalog):
            providers[target.name] = {"address": target.describe(), "reachable": True,
                                      "server_version": result.server_version,
                                      "applied": len(result.applied), "error": None}
        else:
            providers[target.name] = {"address": target.describe(), "reachable": False,
                                      "server_version": None, "applied": None,
                                      "error": str(result)}
    match = not diffs and not problems and all(p["reachable"] for p in providers.values())
    return {
        "match": match,
        "shipped": len(migrations),
        "providers": providers,
        "differences": [{"kind": d.kind, "name": d.name, "values": dict(d.values)}
                        for d in diffs],
        "problems": list(problems),
    }


def status_json(
    target: ProviderSettings, result: Catalog | AgentFactoryError,
    migrations: Sequence[Migration], required: Sequence[str], dim: int,
) -> dict[str, Any]:
    """``schema status --json``: one provider's server, extensions and migrations."""
    if not isinstance(result, Catalog):
        return {"address": target.describe(), "reachable": False, "error": str(result)}
    plan = plan_migrations(migrations, result.applied, dim)
    extensions = {
        ext: {"state": "installed" if ext in result.extensions
              else "available" if ext in result.available else "unavailable",
              "version": result.extensions.get(ext)}
        for ext in required
    }
    return {
        "address": target.describe(),
        "reachable": True,
        "server_version": result.server_version,
        "extensions": extensions,
        "applied": [{"migration": r.label, "applied_at": r.applied_at} for r in result.applied],
        "pending": [m.label for m in plan.pending],
        "drift": plan.drift_message(target.name) if plan.conflicts else None,
        "up_to_date": plan.up_to_date,
    }
