"""The ``agent-factory-db`` command: a live failover demo, health and stats.

    agent-factory-db demo [--no-live] [--no-hang] [--down-seconds N]
    agent-factory-db health [--json]     exit 0 ok, 1 primary down or failback failing,
                                         2 bad configuration
    agent-factory-db stats [--json]
    agent-factory-db dashboard [--host H] [--port P] [--token T] [--demo]
    agent-factory-db monitor [--interval S] [--once] [--json]
    agent-factory-db --version

Exit codes: one table for every command, in `agent_factory.cli.exit_codes`.

Rich draws for a terminal only and is imported inside the commands that use
it, so importing this module stays cheap; pipes, logs and machines without
Rich get plain aligned text. Nothing printed here contains a password: only names,
hosts and ports leave the manager, and every cell is scrubbed once more.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import BindRefusedError, EmbeddedPostgresError, PostgresNotFoundError
from .arguments import positive_float
from .console import ms, print_table, rich_console, scrub, yes_no
from .demo.screen import print_summary, run_live, run_plain
from .demo.screen import render as _render  # noqa: F401 - tests import it from here
from .exit_codes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from ..core.database_manager import DatabaseManager
    from ..observability.dashboard.demo import DemoFleet

__all__ = ["main"]

_PROG = "agent-factory-db"
_INSTALL = "pip install 'agent-factory[embedded]'"


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Library warnings (pool reconnects, failover notices) would garble the
    # tables; the demo shows the same facts as events. The level goes on the
    # handler too: psycopg sets its own logger to WARNING.
    level = logging.INFO if args.verbose else logging.ERROR
    handler = logging.StreamHandler()
    handler.setLevel(level)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def _parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog=_PROG, description="Multi-provider PostgreSQL with automatic failover."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show library logs")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(required=True, metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="three embedded providers, a crash and a hang of the primary, live"
    )
    demo.add_argument("--no-live", action="store_true",
                      help="plain line-by-line output (automatic when stdout is not a terminal)")
    demo.add_argument("--hang", action=argparse.BooleanOptionalAction, default=True,
                      help="also hang the primary (SIGSTOP) after the crash (default: yes)")
    demo.add_argument("--down-seconds", type=positive_float, default=4.0, metavar="N",
                      help="how long the primary stays down per fault (default: 4)")
    demo.set_defaults(command=_demo)

    health = sub.add_parser("health", help="probe every configured provider")
    health.add_argument("--json", action="store_true", help="machine-readable output")
    health.set_defaults(command=_health)

    stats = sub.add_parser("stats", help="per-provider statistics of the configured manager")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    stats.set_defaults(command=_stats)

    _add_dashboard_commands(sub)

    from .failback_command import add_failback_commands
    from .replication_command import add_replication_commands
    from .schema_command import add_schema_commands

    add_schema_commands(sub)
    add_replication_commands(sub)
    add_failback_commands(sub)
    return parser


# -- health and stats ----------------------------------------------------------


def _open_manager() -> DatabaseManager | None:
    """The manager configured by the environment, or None after printing why not."""
    from ..core.database_manager import DatabaseManager
    from ..errors import ConfigurationError

    try:
        return DatabaseManager()
    except ConfigurationError as exc:  # its message names the setting, never a password
        print(f"{_PROG}: configuration error: {exc}", file=sys.stderr)
        return None


def _health(args: argparse.Namespace) -> int:
    db = _open_manager()
    if db is None:
        return EXIT_USAGE
    try:
        healthy = db.health_check_all(max_age=0)
        primary = db.primary_provider
        if healthy.get(primary, False):
            db.failback_now()  # what any instance does at start-up
        failback = db.failback_status()["backups"]
        stats = db.get_provider_stats()
        secrets = _passwords(db)
    finally:
        db.close_all()
    failing = {name: b["last_error"] for name, b in failback.items() if b["last_error"]}
    report: dict[str, dict[str, Any]] = {
        name: {
            "healthy": healthy.get(name, False),
            "role": s["role"],
            "host": s["connection_string_host"],
            "port": s["port"],
            "latency_ms": s["last_latency_ms"] if healthy.get(name) else None,
            "error": None if healthy.get(name) else s["last_error"],
        }
        for name, s in stats.items()
    }
    up = healthy.get(primary, False)
    if args.json:
        doc = {"primary": primary, "primary_healthy": up, "providers": report,
               "failback": {"pending": {n: b["pending"] for n, b in failback.items()},
                            "failing": failing}}
        print(scrub(json.dumps(doc, indent=2), secrets))
    else:
        rows = [
            [name, yes_no(r["healthy"]), f"{r['host']}:{r['port']}",
             ms(r["latency_ms"]), r["error"] or ""]
            for name, r in report.items()
        ]
        print_table("Provider health", ["provider", "healthy", "host:port", "latency", "error"],
                    rows, secrets)
        print(f"primary {primary}: {'healthy' if up else 'DOWN'}")
        for name, error in failing.items():
            print(scrub(f"failback from {name} FAILING ({failback[name]['pending']} changes "
                        f"pending): {error}", secrets))
    return EXIT_OK if up and not failing else EXIT_FAILED


def _stats(args: argparse.Namespace) -> int:
    db = _open_manager()
    if db is None:
        return EXIT_USAGE
    try:
        # Unprobed providers count as healthy; probe so the table tells the truth.
        db.health_check_all()
        stats = db.get_provider_stats()
        secrets = _passwords(db)
    finally:
        db.close_all()
    if args.json:
        print(scrub(json.dumps(stats, indent=2, default=str), secrets))
        return EXIT_OK
    rows = [
        [name, s["role"], yes_no(s["healthy"]), f"{s['connection_string_host']}:{s['port']}",
         f"{s['pool_size']} ({s['pool_idle']} idle, {s['pool_waiting']} waiting)",
         ms(s["last_latency_ms"]), str(s["consecutive_failures"]), s["last_error"] or ""]
        for name, s in stats.items()
    ]
    headers = ["provider", "role", "healthy", "host:port", "pool", "latency",
               "failures", "last error"]
    print_table("Provider stats", headers, rows, secrets)
    return EXIT_OK


def _passwords(db: DatabaseManager) -> list[str]:
    return [p.password for p in db.settings.providers.values() if p.password]

# -- demo ----------------------------------------------------------------------


def _demo(args: argparse.Namespace) -> int:
    from ..testing.embedded import find_bin_dir
    from ..testing.postgres_process import check_platform

    try:
        check_platform()
    except EmbeddedPostgresError as exc:
        print(f"{_PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        find_bin_dir()
    except PostgresNotFoundError as exc:
        print(f"{_PROG}: the demo needs PostgreSQL binaries: {exc}\n"
              f"install them with: {_INSTALL}", file=sys.stderr)
        return EXIT_USAGE
    from .demo.scenario import Demo, DemoConfig

    config = DemoConfig(hang=args.hang, down_seconds=args.down_seconds)
    live = not args.no_live and rich_console() is not None
    _terminate_as_interrupt()
    try:
        result = run_live(Demo(config)) if live else run_plain(config)
    except PostgresNotFoundError as exc:
        print(f"{_PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as exc:  # servers are already stopped; say what went wrong, briefly
        print(f"{_PROG}: demo failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print_summary(result)
    return EXIT_OK if result.ok else EXIT_FAILED


def _terminate_as_interrupt() -> None:
    """Make SIGTERM clean up like Ctrl-C (the servers must not outlive the demo)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, interrupt)


# -- dashboard and monitor -----------------------------------------------------

_DASHBOARD_INSTALL = "pip install 'agent-factory[dashboard]'"


def _add_dashboard_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    dash = sub.add_parser(
        "dashboard", help="web dashboard: health, latency, failover timeline, operator actions"
    )
    dash.add_argument("--host", default="127.0.0.1",
                      help="address to listen on (default: 127.0.0.1; others need a token)")
    dash.add_argument("--port", type=int, default=8765, help="port (default: 8765; 0: any)")
    dash.add_argument("--token", default=None,
                      help="required by everything but /healthz and /readyz "
                           "(default: $AGENT_FACTORY_DASHBOARD_TOKEN)")
    dash.add_argument("--demo", action="store_true",
                      help="run against three embedded providers with a light load and "
                           "buttons that crash, hang and restart the primary")
    dash.set_defaults(command=_dashboard)

    monitor = sub.add_parser("monitor", help="live health table of the configured providers")
    monitor.add_argument("--interval", type=positive_float, default=2.0, metavar="SECONDS",
                         help="refresh period (default: 2)")
    monitor.add_argument("--once", action="store_true", help="print one snapshot and exit")
    monitor.add_argument("--json", action="store_true",
                         help="one JSON document per refresh, one per line (JSON Lines)")
    monitor.set_defaults(command=_monitor)


def _dashboard(args: argparse.Namespace) -> int:
    from ..engine.environment import load_environment

    try:
        from ..observability.dashboard.app import create_app
        from ..observability.dashboard.server import (
            LOOPBACK_NAMES,
            bind,
            check_bind,
            is_loopback,
            serve,
        )
    except ImportError as exc:
        print(f"{_PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    token = args.token or load_environment().get("AGENT_FACTORY_DASHBOARD_TOKEN") or None
    try:
        check_bind(args.host, token)
        sock = bind(args.host, args.port)
    except BindRefusedError as exc:
        print(f"{_PROG}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"{_PROG}: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}",
              file=sys.stderr)
        return EXIT_FAILED
    _terminate_as_interrupt()
    with sock:
        demo, db, code = _dashboard_manager(args.demo)
        if db is None:
            return code
        try:
            # On loopback, answer only loopback Host headers (DNS rebinding).
            hosts = [*LOOPBACK_NAMES, args.host] if is_loopback(args.host) else None
            app = create_app(db, token=token, demo_controls=demo.controls() if demo else None,
                             allowed_hosts=hosts)
            host = f"[{args.host}]" if ":" in args.host else args.host
            print(f"dashboard on http://{host}:{sock.getsockname()[1]}/  (Ctrl-C to stop)"
                  + ("\nsign in on the page with the token; API clients and Prometheus "
                     "send Authorization: Bearer <token>" if token else ""), flush=True)
            serve(app, sock)
        finally:
            if demo is not None:
                print("stopping the demo servers", flush=True)
                demo.close()
            else:
                db.close_all()
    print("dashboard stopped", flush=True)
    return EXIT_OK


def _dashboard_manager(demo: bool) -> tuple[DemoFleet | None, DatabaseManager | None, int]:
    """The manager to show (and the demo fleet behind it), or None and the exit code."""
    if not demo:
        return None, _open_manager(), EXIT_USAGE
    from ..observability.dashboard.demo import DemoFleet

    fleet = DemoFleet()
    print("starting three embedded PostgreSQL servers for the demo", flush=True)
    try:
        return fleet, fleet.start(), EXIT_OK
    except PostgresNotFoundError as exc:
        print(f"{_PROG}: the demo needs PostgreSQL binaries: {exc}\n"
              f"install them with: {_INSTALL}", file=sys.stderr)
        return None, None, EXIT_USAGE
    except Exception as exc:  # start() stopped what it had started
        print(f"{_PROG}: demo servers failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None, None, EXIT_FAILED


def _monitor(args: argparse.Namespace) -> int:
    from .monitor import run_monitor

    db = _open_manager()
    if db is None:
        return EXIT_USAGE
    _terminate_as_interrupt()
    try:
        run_monitor(db, interval=args.interval, once=args.once, console=rich_console(),
                    secrets=_passwords(db), as_json=args.json)
    except KeyboardInterrupt:
        pass  # the normal way to stop watching
    finally:
        db.close_all()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
