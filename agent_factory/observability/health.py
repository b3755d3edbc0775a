"""Liveness and readiness probes for a manager, as a plain ASGI app.

    from agent_factory.observability.health import health_app
    app.mount("/", health_app(db))      # FastAPI or Starlette, next to the app's routes

    GET /healthz   200 while the process answers (liveness: never looks at a database)
    GET /readyz    200 when a provider can take writes and failback is not stuck,
                   else 503 with a JSON reason (readiness)

The answer is read from the manager's state (its breakers and background
probes), so a probe costs no query and a slow provider never makes it time
out. The bodies name providers and what is wrong with them (down,
read-only, stale, failback stuck), never a host, a port or an error text:
the dashboard serves them to anyone, without its token. Works with a
`DatabaseManager` or an `AsyncDatabaseManager`, and needs no web framework.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Protocol

from ..engine.policy import candidates
from ..engine.settings import Settings

__all__ = ["HealthApp", "Manager", "Readiness", "health_app", "readiness"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class Manager(Protocol):
    """What the probes read of a manager (both managers have it)."""

    @property
    def closed(self) -> bool: ...

    @property
    def primary_provider(self) -> str: ...

    @property
    def failover_order(self) -> list[str]: ...

    @property
    def failover_enabled(self) -> bool: ...

    @property
    def settings(self) -> Settings: ...

    def get_provider_stats(self) -> Mapping[str, Mapping[str, Any]]: ...


class Readiness:
    """Whether the manager can take writes now; ``doc`` is the JSON body that says why."""

    def __init__(self, ready: bool, doc: dict[str, Any]) -> None:
        self.ready = ready
        self.doc = doc


def readiness(db: Manager) -> Readiness:
    """The readiness of ``db`` from its state, without I/O.

    Unready when the manager is closed, when no provider it would send a
    write to is up, writable and (with ``max_replication_lag``) fresh, or
    when failback is stuck: a backup's drain has failed for
    ``failback_max_wait`` or longer, or left source transactions that no
    retry can apply (tables the primary lacks).
    """
    if db.closed:
        return Readiness(False, {"status": "unready", "reason": "the manager is closed"})
    stats = db.get_provider_stats()
    names = candidates(db.primary_provider, tuple(db.failover_order), db.failover_enabled)
    providers = {n: _write_state(stats[n]) for n in names if n in stats}
    writable = [n for n, state in providers.items() if state == "writable"]
    stuck = _stuck_failbacks(stats, db.settings.failback_max_wait)
    reasons = []
    if not writable:
        reasons.append("no provider can take writes ("
                       + ", ".join(f"{n} {s}" for n, s in providers.items()) + ")")
    if stuck:
        reasons.append("failback stuck (" + ", ".join(f"{n}: {s}" for n, s in stuck.items())
                       + ")")
    doc: dict[str, Any] = {"status": "unready" if reasons else "ready",
                           "writable": writable, "providers": providers}
    if reasons:
        doc["reason"] = "; ".join(reasons)
    if stuck:
        doc["failback_stuck"] = stuck
    return Readiness(not reasons, doc)


def _write_state(s: Mapping[str, Any]) -> str:
    if not s.get("healthy"):
        return "down"
    if not s.get("writable", True):
        return "read-only"
    if s.get("stale"):
        return "stale"
    return "writable"


def _stuck_failbacks(stats: Mapping[str, Mapping[str, Any]], bound: float) -> dict[str, str]:
    stuck = {}
    for name, s in stats.items():
        left = s.get("failback_stuck") or 0
        failing = s.get("failback_failing_s")
        if left:
            stuck[name] = f"{left} source transaction(s) left for an operator"
        elif isinstance(failing, (int, float)) and failing >= bound:
            stuck[name] = f"drain failing for {failing:.0f} s"
    return stuck


class HealthApp:
    """The ASGI app of `health_app` (any other path: 404; methods but GET/HEAD: 405)."""

    def __init__(self, db: Manager) -> None:
        self.db = db

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        path = scope.get("path", "")
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            # ASGI paths include the mount point; the probes answer below it.
            path = path[len(root):]
        if path not in ("/healthz", "/readyz"):
            await _respond(scope, send, 404, {"error": "not found"})
        elif scope.get("method") not in ("GET", "HEAD"):
            await _respond(scope, send, 405, {"error": "use GET"}, [(b"allow", b"GET, HEAD")])
        elif path == "/healthz":
            await _respond(scope, send, 200, {"status": "alive"})
        else:
            state = readiness(self.db)
            await _respond(scope, send, 200 if state.ready else 503, state.doc)


def health_app(db: Manager) -> HealthApp:
    """``GET /healthz`` and ``GET /readyz`` for ``db`` as an ASGI app (module docstring)."""
    return HealthApp(db)


async def _respond(scope: Scope, send: Send, status: int, doc: Mapping[str, Any],
                   headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(doc).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"cache-control", b"no-store"),
        *(headers or []),
    ]})
    await send({"type": "http.response.body",
                "body": b"" if scope.get("method") == "HEAD" else body})


async def _lifespan(receive: Receive, send: Send) -> None:
    # Served on its own (uvicorn app), the app has nothing to start or stop.
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
