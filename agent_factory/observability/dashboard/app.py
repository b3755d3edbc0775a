"""The dashboard web app: one page, a JSON state endpoint, operator actions, /metrics.

    GET  /                   the page (server-rendered; a small script refreshes it)
    GET  /api/state          providers, history, timeline as JSON
    POST /api/health-check   probe every provider now
    POST /api/primary        {"provider": name}: make it the primary
    POST /api/demo           {"action": label}: a fault button of the --demo mode
    GET  /metrics            Prometheus text
    GET  /healthz, /readyz   liveness and readiness (`observability.health`), never a token
    GET  /login, POST /login the sign-in form (with a token)

With a token, everything but the probes, the sign-in form and the static
files needs it, reading included (the state names every provider's host,
port and last error): ``Authorization: Bearer <token>`` from API clients and
Prometheus, or the session cookie the sign-in form sets in a browser
(HttpOnly, SameSite=Strict, an HMAC of the token rather than the token).
Unauthenticated, ``GET /`` redirects to the form (303), the rest answer 401.

Every POST must come, when the request has an ``Origin``, from the page's
own origin, and the actions must be JSON (``Content-Type:
application/json``): a foreign page can neither send that content type
without a CORS preflight, which is never granted, nor fake its origin.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from importlib import resources
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

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

from ..health import health_app
from ..metrics import CONTENT_TYPE_LATEST, MetricsListener, exposition, instrument
from .page import render_page, render_sign_in
from .sampler import Sampler
from .state import History, Timeline, TimelineListener, build_state

if TYPE_CHECKING:
    from ...core.database_manager import DatabaseManager

__all__ = ["SESSION_COOKIE", "DemoControls", "create_app"]

logger = logging.getLogger("agent_factory.observability.dashboard")

#: Button label -> action; the action returns what it did, for the timeline.
DemoControls = Mapping[str, Callable[[], "str | None"]]

_STATIC = {"dashboard.js": "text/javascript", "dashboard.css": "text/css",
           "favicon.svg": "image/svg+xml"}
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    # Not no-referrer: a form's POST would then carry "Origin: null", which
    # the cross-origin check refuses; other sites still get no referrer.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
#: The browser's session after signing in; its value is `session_value(token)`.
SESSION_COOKIE = "agent_factory_dashboard"
Endpoint = Callable[[Request], Awaitable[Response]]


def session_value(token: str) -> str:
    """The session cookie's value for ``token``: stands for it without revealing it."""
    return hmac.new(token.encode(), b"agent-factory dashboard session", hashlib.sha256).hexdigest()


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
        self._session = None if self.token is None else session_value(self.token)
        self.demo_controls = dict(demo_controls or {})
        self.metrics = metrics if metrics is not None else instrument(db)
        self.timeline = Timeline()
        self.history = History(db.providers, size=60)
        self.sampler = Sampler(db, self.metrics, self.history, interval=sample_interval)
        self.static = {name: (resources.files(__package__) / "static" / name).read_bytes()
                       for name in _STATIC}
        db.add_listener(TimelineListener(self.timeline))
        self.timeline.add("operator", f"dashboard started; primary {db.primary_provider}")

    # -- signing in -------------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        """No token needed, or the request carries it (Bearer header or session cookie)."""
        if self.token is None or self._session is None:
            return True
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            value.strip().encode(), self.token.encode()
        ):
            return True
        cookie = request.cookies.get(SESSION_COOKIE, "")
        return hmac.compare_digest(cookie.encode(), self._session.encode())

    def signed_in(self, endpoint: Endpoint, *, form: bool = False) -> Endpoint:
        """``endpoint``, answering 401 instead to a request `authorized` refuses
        (or, when ``form``, sending a browser to the sign-in form)."""

        async def guarded(request: Request) -> Response:
            if self.authorized(request):
                return await endpoint(request)
            if form:
                # Relative: right under whatever path prefix the app is mounted at.
                return Response(status_code=303, headers={"Location": "login"})
            return _unauthorized()

        return guarded

    async def sign_in_form(self, request: Request) -> Response:
        return HTMLResponse(render_sign_in(None))

    async def sign_in(self, request: Request) -> Response:
        """Check the form's token; on success set the session cookie and go to the page."""
        if _foreign(request):
            return _error(403, "cross-origin request refused")
        fields = parse_qs((await request.body()).decode("utf-8", "replace"))
        given = (fields.get("token") or [""])[0].strip()
        if self.token is None or self._session is None:
            return Response(status_code=303, headers={"Location": "./"})
        if not hmac.compare_digest(given.encode(), self.token.encode()):
            logger.warning("dashboard: a sign-in with a wrong token from %s",
                           request.client.host if request.client else "?")
            return HTMLResponse(render_sign_in("wrong token"), status_code=401)
        response = Response(status_code=303, headers={"Location": "./"})
        response.set_cookie(SESSION_COOKIE, self._session, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https",
                            path=request.scope.get("root_path") or "/")
        return response

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
        if not self.authorized(request):
            return _unauthorized()
        if _foreign(request):
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


def _unauthorized() -> Response:
    return _error(401, "missing or wrong token (Authorization: Bearer <token>, or sign in "
                  "on the page)", {"WWW-Authenticate": "Bearer"})


def _foreign(request: Request) -> bool:
    """The request names an origin other than the page's own."""
    origin = request.headers.get("origin")
    return origin is not None and urlsplit(origin).netloc != request.headers.get("host")


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

    ``token``: when set, required by everything but the probes, the sign-in
    form and the static files (see the module's docstring). ``demo_controls``: extra fault
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

    probes = health_app(db)
    routes = [
        Route("/", dash.signed_in(dash.page, form=True)),
        Route("/static/{name}", dash.static_file),
        Route("/api/state", dash.signed_in(dash.api_state)),
        Route("/api/health-check", dash.health_check, methods=["POST"]),
        Route("/api/primary", dash.make_primary, methods=["POST"]),
        Route("/api/demo", dash.demo, methods=["POST"]),
        Route("/metrics", dash.signed_in(dash.prometheus)),
        Route("/login", dash.sign_in_form, methods=["GET"]),
        Route("/login", dash.sign_in, methods=["POST"]),
        Route("/healthz", probes),
        Route("/readyz", probes),
    ]
    middleware = [Middleware(_SecurityHeaders)]
    if allowed_hosts is not None:
        middleware.append(Middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts)))
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.dashboard = dash
    return app
