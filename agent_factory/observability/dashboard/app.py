"""The dashboard web app: one page, a JSON state endpoint, operator actions, /metrics.

    GET  /                   the page (server-rendered; a small script refreshes it)
    GET  /api/state          providers, history, timeline as JSON
    POST /api/health-check   probe every provider now
    POST /api/primary        {"provider": name}: make it the primary
    POST /api/demo           {"action": label}: a fault button of the --demo mode
    GET  /metrics            Prometheus text

Every POST must be JSON (``Content-Type: application/json``) and, when the
request has an ``Origin``, come from the page's own origin: a foreign page
can neither send that content type without a CORS preflight, which is never
granted, nor fake its origin. With a token, every POST also needs
``Authorization: Bearer <token>`` (401 otherwise).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

try:
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.middleware import Middleware
    from starlette.middleware.trustedhost import TrustedHostMiddleware
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, JSONResponse, Response
    from starlette.routing import Route
    from starlette.types import ASGIApp, Message, Receive, Scope, Send
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        "the dashboard needs starlette and uvicorn; install them with: "
        "pip install 'agent-factory[dashboard]'"
    ) from exc

from ..metrics import CONTENT_TYPE_LATEST, MetricsListener, exposition, instrument
from .page import render_page
from .sampler import Sampler
from .state import History, Timeline, TimelineListener, build_state

if TYPE_CHECKING:
    from ...core.database_manager import DatabaseManager

__all__ = ["DemoControls", "create_app"]

logger = logging.getLogger("agent_factory.observability.dashboard")

#: Button label -> action; the action returns what it did, for the timeline.
DemoControls = Mapping[str, Callable[[], "str | None"]]

_STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css",
           "favicon.svg": "image/svg+xml"}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Dashboard:
    """The app's state and endpoints; `create_app()` wires them into Starlette."""

    def __init__(
        self,
        db: DatabaseManager,
        *,
        token: str | None,
        demo_controls: DemoControls | None,
        metrics: MetricsListener | None,
        sample_interval: float,
    ) -> None:
        self.db = db
        self.token = token or None
        self.demo_controls = dict(demo_controls or {})
        self.metrics = metrics if metrics is not None else instrument(db)
        self.timeline = Timeline()
        self.history = History(db.providers, size=60)
        self.sampler = Sampler(db, self.metrics, self.history, interval=sample_interval)
        self.static = {name: (resources.files(__package__) / "static" / name).read_bytes()
                       for name in _STATIC}
        db.add_listener(TimelineListener(self.timeline))
        self.timeline.add("operator", f"dashboard started; primary {db.primary_provider}")

    # -- reading ---------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        self.sampler.ensure_sampled()
        db = self.db
        return build_state(
            stats=db.get_provider_stats(),
            counts=self.metrics.query_counts(),
            history=self.history,
            events=self.timeline.events(),
            primary=db.primary_provider,
            serving=db.serving_provider,
            token_required=self.token is not None,
            demo_actions=list(self.demo_controls),
            secrets=[p.password for p in db.settings.providers.values() if p.password],
        )

    async def page(self, request: Request) -> Response:
        state = await run_in_threadpool(self.state)
        return HTMLResponse(render_page(state))

    async def api_state(self, request: Request) -> Response:
        return JSONResponse(await run_in_threadpool(self.state))

    async def static_file(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in _STATIC:
            return Response("not found", status_code=404)
        return Response(self.static[name], media_type=_STATIC[name])

    async def prometheus(self, request: Request) -> Response:
        body = await run_in_threadpool(exposition, self.metrics.registry)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    # -- operator actions --------------------------------------------------------

    async def health_check(self, request: Request) -> Response:
        refused = await self._refuse(request)
        if refused is not None:
            return refused
        self.timeline.add("operator", "operator: re-check health of every provider")
        healthy = await run_in_threadpool(lambda: self.db.health_check_all(max_age=0))
        return JSONResponse({"healthy": healthy})

    async def make_primary(self, request: Request) -> Response:
        refused = await self._refuse(request)
        if refused is not None:
            return refused
        name = request.state.body.get("provider")
        if not isinstance(name, str) or name not in self.db.providers:
            return _error(400, f"unknown provider {name!r}; known: {', '.join(self.db.providers)}")
        previous = self.db.primary_provider
        await run_in_threadpool(self.db.set_provider, name)
        self.timeline.add("operator", f"operator: primary {previous} → {name}")
        return JSONResponse({"primary": name})

    async def demo(self, request: Request) -> Response:
        refused = await self._refuse(request)
        if refused is not None:
            return refused
        label = request.state.body.get("action")
        action = self.demo_controls.get(label) if isinstance(label, str) else None
        if action is None:
            return _error(404, f"no demo action {label!r}")
        self.timeline.add("demo", f"demo: {label}")
        try:
            done = await run_in_threadpool(action)
        except Exception as exc:  # shown to the operator; the servers are ours
            self.timeline.add("demo", f"demo: {label} failed: {exc}")
            return _error(409, f"{label} failed: {exc}")
        if done:
            self.timeline.add("demo", f"demo: {done}")
        return JSONResponse({"done": done or label})

    async def _refuse(self, request: Request) -> Response | None:
        """The response refusing this POST, or None when it may proceed (body parsed)."""
        if self.token is not None:
            given = request.headers.get("authorization", "")
            scheme, _, value = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                value.strip().encode(), self.token.encode()
            ):
                return _error(401, "missing or wrong token (Authorization: Bearer <token>)",
                              {"WWW-Authenticate": "Bearer"})
        origin = request.headers.get("origin")
        if origin is not None and urlsplit(origin).netloc != request.headers.get("host"):
            return _error(403, "cross-origin request refused")
        content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if content_type != "application/json":
            return _error(415, "send Content-Type: application/json")
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            return _error(400, "the body is not JSON")
        request.state.body = body if isinstance(body, dict) else {}
        return None


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class _SecurityHeaders:
    """Adds `_HEADERS` to every response that does not set them itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k.lower().encode(), v.encode()) for k, v in _HEADERS.items()
                         if k.lower().encode() not in present]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(
    db: DatabaseManager,
    *,
    token: str | None = None,
    demo_controls: DemoControls | None = None,
    metrics: MetricsListener | None = None,
    sample_interval: float = 1.0,
    allowed_hosts: Sequence[str] | None = None,
) -> Starlette:
    """The dashboard for ``db`` as an ASGI app (serve it with uvicorn).

    ``token``: required on every POST when set. ``demo_controls``: extra fault
    buttons. ``metrics``: an existing `MetricsListener` of ``db`` (else the
    app instruments ``db`` on a registry of its own). ``allowed_hosts``:
    accepted ``Host`` headers (guards a loopback-bound dashboard against DNS
    rebinding); any when None. The app's lifespan runs the sampler thread;
    ``app.state.dashboard`` is the `Dashboard`.
    """
    dash = Dashboard(db, token=token, demo_controls=demo_controls, metrics=metrics,
                     sample_interval=sample_interval)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        dash.sampler.start()
        try:
            yield
        finally:
            await run_in_threadpool(dash.sampler.stop)

    routes = [
        Route("/", dash.page),
        Route("/static/{name}", dash.static_file),
        Route("/api/state", dash.api_state),
        Route("/api/health-check", dash.health_check, methods=["POST"]),
        Route("/api/primary", dash.make_primary, methods=["POST"]),
        Route("/api/demo", dash.demo, methods=["POST"]),
        Route("/metrics", dash.prometheus),
    ]
    middleware = [Middleware(_SecurityHeaders)]
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.dashboard = dash
    return app
