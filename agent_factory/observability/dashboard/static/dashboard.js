// agent-factory dashboard: refresh the server-rendered page from api/state, send operator actions.
// With a token, the session cookie set by the sign-in form goes with every request (the
// script never sees it: HttpOnly); a 401 means it is gone, and reloading shows the form.
"use strict";
(() => {
  const POLL_MS = 1000;
  const BAR = 80;

  function signedOut(response) {
    if (response.status !== 401) return false;
    location.reload();
    return true;
  }

  const ms = (v) => (typeof v !== "number" ? "–" : v < 10 ? `${v.toFixed(2)} ms` : `${v.toFixed(0)} ms`);
  const clock = (at) => new Date(at * 1000).toLocaleTimeString([], { hour12: false });
  const rate = (p) => (typeof p.qps !== "number" ? "–"
    : `${p.qps.toFixed(1)}/s` + (typeof p.avg_query_ms === "number" ? ` · ${ms(p.avg_query_ms)}` : ""));
  const pool = (x) => `${x.used} busy / ${x.size} open (max ${x.max})` + (x.waiting ? ` · ${x.waiting} waiting` : "");

  function status(text, bad) {
    const el = document.getElementById("status");
    el.textContent = text;
    el.className = bad ? "bad" : "";
  }

  function set(row, field, value, attr) {
    const el = row.querySelector(`[data-field="${field}"]`);
    if (!el) return;
    if (attr) {
      if (el.getAttribute(attr) !== String(value)) el.setAttribute(attr, value);
    } else if (el.textContent !== String(value)) {
      el.textContent = value;
    }
  }

  let lastEvents = "";
  function render(state) {
    document.getElementById("primary").textContent = state.primary;
    document.getElementById("serving").textContent = state.serving || "–";
    document.getElementById("updated").textContent = `updated ${clock(state.now)}`;
    const banner = document.getElementById("failback");
    if (banner.textContent !== (state.failback || "")) banner.textContent = state.failback || "";
    banner.hidden = !state.failback;
    for (const p of state.providers) {
      const row = document.querySelector(`tr[data-provider="${CSS.escape(p.name)}"]`);
      if (!row) continue;
      row.className = `role-${p.role}`;
      set(row, "role", p.role);
      const health = p.healthy ? "up" : "down";
      set(row, "health", health);
      set(row, "health", `circuit breaker: ${p.breaker || "?"}`, "title");
      row.querySelector('[data-field="health"]').className = `health health-${health}`;
      set(row, "spark", p.spark, "d");
      set(row, "spark_down", p.spark_down, "d");
      set(row, "latency", p.healthy ? ms(p.latency_ms) : "–");
      set(row, "queries", p.queries);
      set(row, "errors", p.errors);
      set(row, "errors", Object.entries(p.outcomes).map(([k, v]) => `${k} ${v}`).join(", "), "title");
      set(row, "rate", rate(p));
      set(row, "pool", pool(p.pool));
      set(row, "pool_fill", p.pool.max ? Math.round(BAR * Math.min(p.pool.used / p.pool.max, 1)) : 0, "width");
      set(row, "last_error", p.last_error || "");
      row.querySelector("button[data-primary]").disabled = p.name === state.primary;
    }
    const key = JSON.stringify(state.events.map((e) => [e.at, e.text]));
    if (key !== lastEvents) {
      lastEvents = key;
      const items = state.events.map((e) => {
        const li = document.createElement("li");
        li.className = `kind-${e.kind}`;
        const time = document.createElement("time");
        time.textContent = clock(e.at);
        const text = document.createElement("span");
        text.textContent = e.text;
        li.append(time, text);
        return li;
      });
      document.getElementById("timeline").replaceChildren(...items);
    }
  }

  async function refresh() {
    try {
      const response = await fetch("api/state", { cache: "no-store" });
      if (signedOut(response)) return;
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      render(await response.json());
      if (document.getElementById("status").className === "bad") status("");
    } catch (err) {
      status(`cannot reach the dashboard (${err.message}); retrying`, true);
    }
  }

  async function loop() {
    await refresh();
    setTimeout(loop, POLL_MS);
  }

  async function post(path, body) {
    const headers = { "Content-Type": "application/json" };
    const response = await fetch(path, { method: "POST", headers, body: JSON.stringify(body) });
    if (signedOut(response)) return null;
    const doc = await response.json().catch(() => ({}));
    if (!response.ok) {
      status(doc.error || `request failed (HTTP ${response.status})`, true);
      return null;
    }
    status("");
    return doc;
  }

  document.addEventListener("click", async (event) => {
    const button = event.target.closest("button");
    if (!button || button.disabled) return;
    let sent;
    if (button.dataset.primary) {
      const name = button.dataset.primary;
      if (!confirm(`Make ${name} the primary provider? Queries will go to ${name} first.`)) return;
      sent = () => post("api/primary", { provider: name });
    } else if (button.dataset.demo) {
      sent = () => post("api/demo", { action: button.dataset.demo });
    } else if (button.id === "recheck") {
      sent = () => post("api/health-check", {});
    } else {
      return;
    }
    button.disabled = true;
    status("working…");
    try {
      await sent();
    } finally {
      button.disabled = false;
      await refresh();
    }
  });

  setTimeout(loop, POLL_MS);
})();
