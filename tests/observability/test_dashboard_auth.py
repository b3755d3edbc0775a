"""Dashboard sign-in: with a token, every route but the probes needs it, reading included.

Served over real HTTP against the real fleet, as in test_dashboard; each
route is asked without credentials, with a wrong token, with the Bearer
token and with the session cookie of the sign-in form.
"""

from __future__ import annotations

from http.cookies import SimpleCookie

import httpx
import pytest
from test_dashboard import BEARER, TOKEN, Serve, db, serve  # noqa: F401  (fixtures)

from agent_factory.observability.dashboard.app import SESSION_COOKIE
from agent_factory.testing.fleet import Fleet

#: (method, path, JSON body): everything the token protects (the page: see the redirect).
PROTECTED = [("GET", "/api/state", None), ("GET", "/metrics", None),
             ("POST", "/api/health-check", {}), ("POST", "/api/demo", {"action": "none"})]
OPEN = ["/healthz", "/readyz", "/login", "/static/dashboard.css", "/static/dashboard.js"]


def _sign_in(client: httpx.Client, token: str) -> httpx.Response:
    return client.post("/login", content=f"token={token}",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})


def _leaks(text: str, fleet: Fleet) -> list[str]:
    """Hosts' ports and passwords of the fleet found in ``text``."""
    found = []
    for member in fleet:
        for secret in (member.server.password, str(member.proxy.port), str(member.server.port)):
            if secret in text:
                found.append(secret)
    return found


@pytest.fixture
def signed_out(serve: Serve) -> httpx.Client:  # noqa: F811
    return serve(token=TOKEN)


def test_without_the_token_nothing_but_the_probes_answers(
    signed_out: httpx.Client, healthy_fleet: Fleet
) -> None:
    c = signed_out
    for method, path, body in PROTECTED:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
            answer = c.request(method, path, json=body, headers=headers)
            assert answer.status_code == 401, (method, path, headers)
            assert not _leaks(answer.text, healthy_fleet), (method, path)
            assert "supabase" not in answer.text
        # The raw token as the cookie is not a session.
        answer = c.request(method, path, json=body,
                           headers={"Cookie": f"{SESSION_COOKIE}={TOKEN}"})
        assert answer.status_code == 401
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        page = c.get("/", headers=headers)
        assert page.status_code == 303 and page.headers["location"] == "login"
        assert page.text == ""
    form = c.get("/", follow_redirects=True)
    assert str(form.url).endswith("/login") and form.status_code == 200
    assert '<form id="sign-in" method="post" action="login">' in form.text
    assert not _leaks(form.text, healthy_fleet) and "supabase" not in form.text
    assert c.get("/api/state").headers["www-authenticate"] == "Bearer"
    for path in OPEN:
        assert c.get(path).status_code == 200, path
    assert c.get("/readyz").json()["status"] == "ready"


def test_api_clients_and_prometheus_send_the_bearer_token(
    signed_out: httpx.Client, healthy_fleet: Fleet
) -> None:
    c = signed_out
    assert 'data-provider="supabase"' in c.get("/", headers=BEARER).text
    for method, path, body in PROTECTED:
        answer = c.request(method, path, json=body, headers=BEARER)
        # The demo action is unknown here: 404 once past the token.
        assert answer.status_code == (404 if path == "/api/demo" else 200), (method, path)
    metrics = c.get("/metrics", headers=BEARER)
    assert "agent_factory_db_provider_up" in metrics.text
    assert not [s for s in _leaks(metrics.text, healthy_fleet)
                if s in (m.server.password for m in healthy_fleet)]


def test_the_sign_in_form_sets_an_http_only_strict_cookie(signed_out: httpx.Client) -> None:
    c = signed_out
    wrong = _sign_in(c, "not-the-token")
    assert wrong.status_code == 401 and "wrong token" in wrong.text
    assert "set-cookie" not in wrong.headers and not c.cookies
    foreign = c.post("/login", content=f"token={TOKEN}",
                     headers={"Content-Type": "application/x-www-form-urlencoded",
                              "Origin": "http://evil.example"})
    assert foreign.status_code == 403 and "set-cookie" not in foreign.headers

    signed = _sign_in(c, TOKEN)
    assert signed.status_code == 303 and signed.headers["location"] == "./"
    header = signed.headers["set-cookie"]
    morsel = SimpleCookie(header)[SESSION_COOKIE]
    assert morsel["httponly"] and morsel["samesite"] == "strict" and morsel["path"] == "/"
    assert not morsel["secure"]  # plain HTTP here; set over HTTPS
    assert TOKEN not in header and len(morsel.value) == 64  # an HMAC, not the token
    # The client keeps the cookie: the page, the state and the actions answer.
    assert 'data-provider="supabase"' in c.get("/").text
    assert c.get("/api/state").json()["token_required"] is True
    assert c.get("/metrics").status_code == 200
    assert c.post("/api/health-check", json={}).json()["healthy"]["supabase"] is True
    # A cookie does not stand in for the origin and content-type checks.
    assert c.post("/api/primary", json={"provider": "neon"},
                  headers={"Origin": "http://evil.example"}).status_code == 403
    assert c.post("/api/primary", data={"provider": "neon"}).status_code == 415


def test_a_dashboard_without_a_token_is_open(serve: Serve) -> None:  # noqa: F811
    c = serve()  # loopback only: check_bind refuses anything else without a token
    assert 'data-provider="supabase"' in c.get("/").text
    for method, path, body in PROTECTED:
        answer = c.request(method, path, json=body)
        assert answer.status_code == (404 if path == "/api/demo" else 200), (method, path)
    assert _sign_in(c, "anything").status_code == 303
