"""Take the README's screenshot of the dashboard, in demo mode, after a crash and a recovery.

    .venv/bin/python scripts/screenshot_dashboard.py [--out docs/dashboard.png]

Starts three embedded providers with a light load (like ``agent-factory-db
dashboard --demo``), opens the page in Debian's Chromium, presses "crash
primary", waits for the failover, presses "restart primary", waits for the
return to the primary, then hangs it and saves a screenshot while a backup
serves. About 30 seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "dashboard.png")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    args = parser.parse_args(argv)

    from playwright.sync_api import expect, sync_playwright

    from agent_factory.observability.dashboard.app import create_app
    from agent_factory.observability.dashboard.demo import DemoFleet
    from agent_factory.observability.dashboard.server import BackgroundServer

    fleet = DemoFleet(hang_timeout=1.0)
    db = fleet.start()
    try:
        server = BackgroundServer(create_app(db, demo_controls=fleet.controls(),
                                             sample_interval=0.5))
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, headless=True,
                                            args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1440, "height": 940})
                page.goto(server.url)
                time.sleep(6)  # some latency history before the first fault
                page.click('button[data-demo="crash primary"]')
                expect(page.locator("#serving")).to_have_text("railway", timeout=10_000)
                time.sleep(4)
                page.click('button[data-demo="restart primary"]')
                expect(page.locator("#serving")).to_have_text("supabase", timeout=20_000)
                time.sleep(6)
                page.click('button[data-demo="hang primary"]')
                expect(page.locator("#serving")).to_have_text("railway", timeout=10_000)
                time.sleep(4)
                page.mouse.move(0, 0)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out), full_page=True)
                browser.close()
        finally:
            server.close()
    finally:
        fleet.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
