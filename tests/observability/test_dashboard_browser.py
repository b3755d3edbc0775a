"""The dashboard page in a real browser (Debian's Chromium through Playwright).

The app is served by uvicorn from a background thread against the test
fleet, with a light query load running like an application would. Without
Chromium (``/usr/bin/chromium``, ``chromium`` on PATH, or
``AGENT_FACTORY_CHROMIUM``) these tests fail when ``CI`` is set (CI installs
it) and are skipped otherwise.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from agent_factory.core.database_manager import DatabaseManager
from agent_factory.observability.dashboard.app import create_app
from agent_factory.observability.dashboard.server import BackgroundServer
from agent_factory.testing.fleet import Fleet

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
TOKEN = "browser-test-token"
TIMEOUT_MS = 8000  # the page polls every second; the manager notices a crash at once


def _unavailable(reason: str) -> None:
    message = f"browser tests need Chromium and Playwright: {reason}"
    if os.environ.get("CI"):
        pytest.fail(message + " (.ci/run installs Chromium from Debian's packages)",
                    pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        _unavailable(f"cannot import playwright ({exc})")
    executable = os.environ.get("AGENT_FACTORY_CHROMIUM") or (
        CHROMIUM if os.path.exists(CHROMIUM) else shutil.which("chromium"))
    if executable is None or not os.path.exists(executable):
        _unavailable(f"no Chromium at {executable or CHROMIUM} (nor chromium on PATH)")
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=executable, headless=True,
                                     args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Dashboard:
    url: str
    db: DatabaseManager


@pytest.fixture
def dashboard(healthy_fleet: Fleet) -> Iterator[Dashboard]:
    db = DatabaseManager(healthy_fleet.urls(), order=list(healthy_fleet.names),
                         hang_timeout=1.0, probe_interval=0.2)
    server = BackgroundServer(create_app(db, token=TOKEN, sample_interval=0.5))
    stop = threading.Event()

    def load() -> None:  # an application's steady trickle of reads
        while not stop.wait(0.05):
            with contextlib.suppress(Exception):  # failures are what the page shows
                db.execute_query("SELECT 1")

    loader = threading.Thread(target=load, name="browser-test-load", daemon=True)
    loader.start()
    try:
        yield Dashboard(server.url, db)
    finally:
        stop.set()
        loader.join(timeout=10)
        server.close()
        db.close_all()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    problems: list[str] = []
    page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
    page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
    page.problems = problems
    try:
        yield page
    finally:
        context.close()


def _cell(page: Any, provider: str, field: str) -> Any:
    return page.locator(f'tr[data-provider="{provider}"] [data-field="{field}"]')


def _sign_in(page: Any, url: str, token: str = TOKEN) -> None:
    page.goto(url)
    page.fill("#token", token)
    page.click('#sign-in button[type="submit"]')


def test_signing_in_through_the_form_shows_the_live_dashboard(
    page: Any, dashboard: Dashboard
) -> None:
    from playwright.sync_api import expect

    page.goto(dashboard.url)  # no session yet: sent to the form
    expect(page.locator("#sign-in")).to_be_visible()
    assert page.url == dashboard.url + "login"
    assert page.locator("#providers").count() == 0
    _sign_in(page, dashboard.url, "not-the-token")
    expect(page.locator(".sign-in-error")).to_have_text("wrong token")
    assert page.context.cookies() == []

    _sign_in(page, dashboard.url)
    expect(page.locator("#providers")).to_be_visible()
    assert page.url == dashboard.url
    for name, role in (("supabase", "primary"), ("railway", "backup"), ("neon", "backup")):
        expect(_cell(page, name, "role")).to_have_text(role)
        expect(_cell(page, name, "health")).to_have_text("up")
    # The polling script took over: counts grow and the latency line gets drawn.
    expect(_cell(page, "supabase", "queries")).not_to_have_text("0", timeout=TIMEOUT_MS)
    expect(_cell(page, "supabase", "spark")).to_have_attribute("d", _two_points(),
                                                                timeout=TIMEOUT_MS)
    expect(page.locator("#timeline")).to_contain_text("dashboard started")
    (cookie,) = page.context.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["value"] != TOKEN
    assert page.evaluate("document.cookie") == ""  # out of the scripts' reach
    # The wrong token's 401 is the only error the console saw (no script error, no CSP).
    assert page.problems == ["Failed to load resource: the server responded with a status "
                             "of 401 (Unauthorized)"]


def _two_points() -> Any:
    import re

    return re.compile(r"^M[\d.]+,[\d.]+L")


def test_killing_the_primary_shows_within_seconds(
    page: Any, dashboard: Dashboard, healthy_fleet: Fleet
) -> None:
    from playwright.sync_api import expect

    _sign_in(page, dashboard.url)
    expect(_cell(page, "supabase", "role")).to_have_text("primary")
    healthy_fleet["supabase"].server.kill()
    expect(_cell(page, "supabase", "role")).to_have_text("down", timeout=TIMEOUT_MS)
    expect(_cell(page, "supabase", "health")).to_have_text("down", timeout=TIMEOUT_MS)
    expect(_cell(page, "railway", "role")).to_have_text("serving", timeout=TIMEOUT_MS)
    expect(page.locator("#serving")).to_have_text("railway", timeout=TIMEOUT_MS)
    expect(page.locator("#timeline")).to_contain_text("failover supabase → railway",
                                                      timeout=TIMEOUT_MS)
    expect(_cell(page, "supabase", "last_error")).not_to_be_empty()
    assert page.problems == []


def test_make_primary_asks_first_and_a_lost_session_returns_to_the_form(
    page: Any, dashboard: Dashboard
) -> None:
    from playwright.sync_api import expect

    dialogs: list[str] = []

    def answer(dialog: Any) -> None:
        dialogs.append(dialog.type)
        if len(dialogs) == 1:
            dialog.dismiss()  # the first confirm: the operator changes their mind
        else:
            dialog.accept()

    page.on("dialog", answer)
    _sign_in(page, dashboard.url)
    button = page.locator('button[data-primary="railway"]')
    button.click()
    expect(page.locator("#primary")).to_have_text("supabase")
    assert dashboard.db.primary_provider == "supabase"

    button.click()  # the session cookie is the credential: no token asked for
    expect(_cell(page, "railway", "role")).to_have_text("primary", timeout=TIMEOUT_MS)
    expect(page.locator("#primary")).to_have_text("railway")
    expect(button).to_be_disabled()
    expect(page.locator("#timeline")).to_contain_text("operator: primary supabase → railway")
    assert dialogs == ["confirm", "confirm"]
    assert dashboard.db.primary_provider == "railway"

    # The session is gone (cookie cleared, as at its end): the next refresh sees
    # 401 and the page goes back to the form instead of showing stale numbers.
    page.context.clear_cookies()
    expect(page.locator("#sign-in")).to_be_visible(timeout=TIMEOUT_MS)
    assert page.url == dashboard.url + "login"
    assert dashboard.db.primary_provider == "railway"
