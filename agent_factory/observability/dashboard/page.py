"""The dashboard page, rendered on the server from the state document.

``static/dashboard.js`` then polls ``api/state`` and updates the cells marked
``data-field`` in place. Every value goes through `html.escape`; URLs are
relative, so the page also works mounted under a path prefix.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from .state import SPARK_HEIGHT, SPARK_WIDTH

__all__ = ["render_page", "render_sign_in"]

POOL_BAR_WIDTH = 80
_COLUMNS = ("provider", "role", "health", "latency (probe)", "queries", "errors", "rate",
            "pool", "last error", "")


def fmt_ms(value: object) -> str:
    if not isinstance(value, (int, float)):
        return "–"
    return f"{value:.2f} ms" if value < 10 else f"{value:.0f} ms"


def fmt_rate(qps: object, avg_ms: object) -> str:
    if not isinstance(qps, (int, float)):
        return "–"
    return f"{qps:.1f}/s" + (f" · {fmt_ms(avg_ms)}" if isinstance(avg_ms, (int, float)) else "")


def fmt_pool(pool: Mapping[str, int]) -> str:
    text = f"{pool['used']} busy / {pool['size']} open (max {pool['max']})"
    return text + (f" · {pool['waiting']} waiting" if pool["waiting"] else "")


def pool_fill(pool: Mapping[str, int]) -> int:
    return round(POOL_BAR_WIDTH * min(pool["used"] / pool["max"], 1.0)) if pool["max"] else 0


def fmt_time(at: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(at))


def _row(p: Mapping[str, Any], primary: str) -> str:
    name = escape(p["name"])
    host = escape(f"{p['host']}:{p['port']}")
    health = "up" if p["healthy"] else "down"
    disabled = " disabled" if p["name"] == primary else ""
    outcomes = ", ".join(f"{k} {v}" for k, v in p["outcomes"].items())
    return f"""
<tr data-provider="{name}" class="role-{escape(p['role'])}">
  <td class="name">{name}<div class="host" data-field="host">{host}</div></td>
  <td><span class="badge" data-field="role">{escape(p['role'])}</span></td>
  <td><span class="health health-{health}" data-field="health"
    title="circuit breaker: {escape(p['breaker'] or '?')}">{health}</span></td>
  <td class="latency">
    <svg class="spark" viewBox="0 0 {SPARK_WIDTH:g} {SPARK_HEIGHT:g}" width="{SPARK_WIDTH:g}"
         height="{SPARK_HEIGHT:g}" aria-hidden="true">
      <path class="spark-line" data-field="spark" d="{escape(p['spark'])}"/>
      <path class="spark-down" data-field="spark_down" d="{escape(p['spark_down'])}"/>
    </svg>
    <span data-field="latency">{fmt_ms(p['latency_ms'] if p['healthy'] else None)}</span>
  </td>
  <td class="num" data-field="queries">{p['queries']}</td>
  <td class="num" data-field="errors" title="{escape(outcomes)}">{p['errors']}</td>
  <td class="num" data-field="rate">{escape(fmt_rate(p['qps'], p['avg_query_ms']))}</td>
  <td class="pool">
    <svg class="bar" width="{POOL_BAR_WIDTH}" height="8" aria-hidden="true">
      <rect class="bar-track" width="{POOL_BAR_WIDTH}" height="8" rx="2"/>
      <rect class="bar-fill" data-field="pool_fill" width="{pool_fill(p['pool'])}" height="8"
            rx="2"/>
    </svg>
    <div data-field="pool">{escape(fmt_pool(p['pool']))}</div>
  </td>
  <td class="error" data-field="last_error">{escape(p['last_error'] or '')}</td>
  <td><button type="button" class="make-primary" data-primary="{name}"{disabled}
    >make primary</button></td>
</tr>"""


def _events(events: Sequence[Mapping[str, Any]]) -> str:
    return "".join(
        f'<li class="kind-{escape(e["kind"])}"><time>{fmt_time(e["at"])}</time>'
        f"<span>{escape(e['text'])}</span></li>"
        for e in events
    )


def _demo(actions: Sequence[str]) -> str:
    if not actions:
        return ""
    buttons = "".join(f'<button type="button" class="demo" data-demo="{escape(a)}">'
                      f"{escape(a)}</button>" for a in actions)
    return (f'<section id="demo"><h2>Demo: break the primary</h2><p>These act on the '
            f"embedded server of the current primary.</p>{buttons}</section>")


def _banner(text: str) -> str:
    hidden = "" if text else " hidden"
    return f'<p id="failback" class="banner"{hidden}>{escape(text)}</p>'


def render_sign_in(error: str | None) -> str:
    """The sign-in form: the token, posted once; the answer sets the session cookie."""
    problem = f'<p class="sign-in-error" role="alert">{escape(error)}</p>' if error else ""
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>agent-factory · sign in</title>
<link rel="icon" href="static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="static/dashboard.css">
</head>
<body>
<header><h1>agent-factory <span>database providers</span></h1></header>
<main>
<form id="sign-in" method="post" action="login">
  <label for="token">Access token</label>
  <input id="token" name="token" type="password" autocomplete="current-password" required
    autofocus>
  <button type="submit">sign in</button>
  {problem}
</form>
</main>
</body>
</html>
"""


def render_page(state: Mapping[str, Any]) -> str:
    """The whole HTML document for ``state`` (see `build_state`)."""
    primary = state["primary"]
    rows = "".join(_row(p, primary) for p in state["providers"])
    headers = "".join(f"<th>{escape(c)}</th>" for c in _COLUMNS)
    serving = state["serving"] or "–"
    token = "true" if state["token_required"] else "false"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>agent-factory · database providers</title>
<link rel="icon" href="static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="static/dashboard.css">
<script src="static/dashboard.js" defer></script>
</head>
<body data-token-required="{token}">
<header>
  <h1>agent-factory <span>database providers</span></h1>
  <div class="summary">primary <b id="primary">{escape(primary)}</b>
    · serving <b id="serving">{escape(serving)}</b>
    · <span id="updated">updated {fmt_time(state['now'])}</span></div>
  <button type="button" id="recheck">re-check health</button>
  {_banner(state.get("failback") or "")}
</header>
<main>
{_demo(state["demo_actions"])}
<table id="providers">
  <thead><tr>{headers}</tr></thead>
  <tbody>{rows}
  </tbody>
</table>
<section id="events">
  <h2>Failover timeline</h2>
  <ol id="timeline">{_events(state["events"])}</ol>
</section>
</main>
<footer><a href="metrics">Prometheus metrics</a> <span id="status" role="status"></span></footer>
</body>
</html>
"""
