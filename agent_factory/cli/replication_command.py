"""The replication commands: replicate setup|status|teardown, and sync.

    agent-factory-db replicate setup [--tables T ...] [--publisher-url URL]
                                     [--copy-data auto|yes|no]
    agent-factory-db replicate status [--json] [--max-lag SECONDS]
    agent-factory-db replicate teardown
    agent-factory-db sync --from NAME --to NAME [--table T]... [--since ISO8601] [--no-progress]

Exit codes (`agent_factory.cli.exit_codes`): 0 done (status: every backup
streams); 1 a step failed, a backup does not stream or lags too much; 2 a
prerequisite is missing (wal_level, the right to subscribe, a table) or the
configuration or an argument is wrong; 3 a provider cannot be reached.

Output names providers and ``user@host:port/db``, never a password or a
connection string, and every line is scrubbed once more before printing.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote

import psycopg

from ..continuity.replication import (
    COPY_DATA_MODES,
    PUBLICATION,
    BackupStatus,
    ReplicationReport,
    replication_status,
    setup_replication,
    teardown_replication,
)
from ..engine.settings import ProviderSettings, Settings, connection_params
from ..errors import ReplicationPrerequisiteError
from ..schema.copy import MANAGED_TABLES, TableReport
from .command_support import (
    Action,
    Context,
    add_json_flag,
    bind,
    connect,
    dispatch,
    exit_code,
    progress,
    source_and_target,
    table_reports_json,
)
from .exit_codes import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE

__all__ = ["add_replication_commands", "main"]


def add_replication_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add ``replicate setup|status|teardown`` and ``sync`` to a CLI's subcommands.

    Each action sets ``command`` to a function taking the parsed namespace and
    returning the exit code: ``return args.command(args)``.
    """
    replicate = subparsers.add_parser(
        "replicate", help="logical replication from the primary to the backups",
        description=f"Publish the managed tables on the primary (publication {PUBLICATION}) "
        f"and subscribe every backup to them ({PUBLICATION}_<backup>).")
    actions = replicate.add_subparsers(required=True, metavar="ACTION")

    setup = actions.add_parser("setup", help="create or complete the publication and "
                               "subscriptions (idempotent)")
    setup.add_argument("--tables", nargs="+", action="extend", default=[], metavar="T",
                       help=f"publish these tables too (always: {', '.join(MANAGED_TABLES)})")
    setup.add_argument("--publisher-url", metavar="URL",
                       help="how the backups reach the primary, when not by its configured "
                       "address")
    setup.add_argument("--copy-data", choices=COPY_DATA_MODES, default="auto",
                       help="copy the existing rows when subscribing (auto: only into empty "
                       "tables; default auto)")
    add_json_flag(setup)
    setup.set_defaults(command=_action(_setup))

    status = actions.add_parser("status", help="is every backup streaming, and how far behind")
    add_json_flag(status)
    status.add_argument("--max-lag", type=_seconds, metavar="SECONDS",
                        help="exit 1 when a backup is further behind than this")
    status.set_defaults(command=_action(_status))

    teardown = actions.add_parser("teardown", help="drop the subscriptions, then the "
                                  "publication (idempotent)")
    add_json_flag(teardown)
    teardown.set_defaults(command=_action(_teardown))

    sync = subparsers.add_parser(
        "sync", help="reconcile rows from one provider into another (newest wins)",
        description="Upsert the managed tables from one provider into another: new rows "
        "are inserted, a row is updated only when the source's updated_at is newer. Writes "
        "are tagged with a replication origin, so they are not replicated back.")
    sync.add_argument("--from", dest="source", metavar="NAME", required=True)
    sync.add_argument("--to", dest="target", metavar="NAME", required=True)
    sync.add_argument("--table", dest="tables", action="append", metavar="T",
                      help="only this table (repeatable; default: the managed tables)")
    sync.add_argument("--since", type=_timestamp, metavar="ISO8601",
                      help="only rows updated at or after this time (UTC unless it says)")
    sync.add_argument("--no-progress", action="store_true",
                      help="plain lines instead of a progress bar (automatic when not a TTY)")
    add_json_flag(sync)
    sync.set_defaults(command=_action(_sync))


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one replication command; returns the exit code.

    ``environ`` replaces ``os.environ`` and then no ``.env`` file is read.
    """
    parser = argparse.ArgumentParser(prog="agent-factory-db")
    add_replication_commands(parser.add_subparsers(required=True, metavar="COMMAND"))
    return dispatch(parser.parse_args(sys.argv[1:] if argv is None else list(argv)), environ)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _timestamp(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO 8601 time: {text!r} (e.g. 2024-05-01T12:00:00+00:00)") from None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _exit_code(exc: BaseException) -> int:
    # A prerequisite (wal_level, privileges) is the setup to fix, not an outage.
    return EXIT_USAGE if isinstance(exc, ReplicationPrerequisiteError) else exit_code(exc)


def _action(action: Action) -> Callable[[argparse.Namespace], int]:
    return bind(action, _exit_code)


def _hide_publisher_password(ctx: Context, url: str | None) -> None:
    if url:
        password = connection_params(url, "--publisher-url").get("password", "")
        if len(password) >= 4:
            ctx.secrets += (password, quote(password, safe=""))


# -- replicate ------------------------------------------------------------------


def _setup(ctx: Context, args: argparse.Namespace) -> int:
    settings = ctx.settings()
    _hide_publisher_password(ctx, args.publisher_url)
    primary = settings.providers[settings.primary]
    ctx.print(f"primary {primary.name} ({primary.describe()})")
    report = setup_replication(settings, tables=tuple(args.tables),
                               publisher_url=args.publisher_url, copy_data=args.copy_data)
    ctx.print(f"publication {PUBLICATION}: {report.publication} ({', '.join(report.tables)})")
    for name, action in report.actions.items():
        ctx.print(f"{name} ({settings.providers[name].describe()}): subscription "
                  f"{PUBLICATION}_{name} {action}")
    code = _report_errors(ctx, report)
    if ctx.json:
        ctx.print_json(_report_json(settings, report))
    return code


def _status(ctx: Context, args: argparse.Namespace) -> int:
    settings = ctx.settings()
    statuses = replication_status(settings)
    code = EXIT_OK
    for s in statuses:
        lagging = (args.max_lag is not None and s.streaming
                   and (s.lag_seconds or 0.0) > args.max_lag)
        if not s.reachable:
            code = EXIT_UNAVAILABLE
        elif not s.streaming or lagging:
            code = max(code, EXIT_FAILED)
    if ctx.json:
        ctx.print_json([_as_json(s, args.max_lag) for s in statuses])
        return code
    primary = settings.providers[settings.primary]
    ctx.print(f"primary {primary.name} ({primary.describe()}), publication {PUBLICATION}")
    for s in statuses:
        ctx.print(_status_line(s, settings, args.max_lag))
    return code


def _as_json(s: BackupStatus, max_lag: float | None) -> dict[str, Any]:
    out = asdict(s)
    out["streaming"] = s.streaming
    out["lagging"] = max_lag is not None and (s.lag_seconds or 0.0) > max_lag
    return out


def _status_line(s: BackupStatus, settings: Settings, max_lag: float | None) -> str:
    where = f"{s.provider} ({settings.providers[s.provider].describe()})"
    if not s.reachable:
        return f"{where}: UNREACHABLE: {s.error}"
    state = "streaming" if s.streaming else f"NOT streaming: {s.last_error}{_advice(s)}"
    parts = [f"subscription {s.subscription} {'enabled' if s.enabled else 'disabled'}"
             if s.present else "no subscription"]
    if s.lag_bytes is not None:
        parts.append(f"lag {s.lag_bytes} bytes")
    if s.lag_seconds is not None:
        over = " (over --max-lag)" if max_lag is not None and s.lag_seconds > max_lag else ""
        at_least = "at least " if s.lag_at_least else ""
        parts.append(f"{at_least}{s.lag_seconds:.1f} s{over}")
    if s.tables_syncing:
        parts.append(f"{s.tables_syncing} table(s) still in their initial copy")
    if s.apply_errors or s.sync_errors:
        parts.append(f"{s.apply_errors} apply error(s), {s.sync_errors} sync error(s)")
    return f"{where}: {state}; {', '.join(parts)}"


def _advice(s: BackupStatus) -> str:
    if not s.present:
        return ": run 'replicate setup'"
    if not s.enabled and (s.apply_errors or s.sync_errors):
        return (". The error is in the backup's server log: a lost connection to the primary "
                "(any outage of it), a conflicting row, missing privileges. Once fixed (the "
                "primary back, rows reconciled with 'sync'), run 'replicate setup' to enable it")
    if not s.enabled:
        return ": run 'replicate setup' to enable it"
    return ""


def _teardown(ctx: Context, args: argparse.Namespace) -> int:
    settings = ctx.settings()
    report = teardown_replication(settings)
    for name, action in report.actions.items():
        ctx.print(f"{name}: subscription {PUBLICATION}_{name} {action}")
    ctx.print(f"publication {PUBLICATION} on {settings.primary}: {report.publication}")
    code = _report_errors(ctx, report)
    unreached = [n for n in report.errors if n != settings.primary]
    if unreached:
        ctx.print(f"note: the subscription on {', '.join(unreached)} remains: run 'replicate "
                  "teardown' again once reachable")
    if ctx.json:
        ctx.print_json(_report_json(settings, report))
    return code


def _report_json(settings: Settings, report: ReplicationReport) -> dict[str, Any]:
    return {
        "primary": settings.primary,
        "publication": {"name": PUBLICATION, "action": report.publication,
                        "tables": list(report.tables)},
        "subscriptions": {name: {"name": f"{PUBLICATION}_{name}", "action": action}
                          for name, action in report.actions.items()},
        "errors": {name: str(exc) for name, exc in report.errors.items()},
        "notes": list(report.notes),
    }


def _report_errors(ctx: Context, report: ReplicationReport) -> int:
    for note in report.notes:
        ctx.print(f"note: {note}")
    code = EXIT_OK
    for name, exc in report.errors.items():
        ctx.print(f"{name}: FAILED")
        ctx.error(str(exc))
        code = max(code, _exit_code(exc))
    return code


# -- sync -----------------------------------------------------------------------


def _connect(target: ProviderSettings, settings: Settings) -> psycopg.Connection[Any]:
    # reconcile manages its transactions: no autocommit
    return connect(target, settings, application_name="agent-factory-sync", autocommit=False)


def _sync(ctx: Context, args: argparse.Namespace) -> int:
    from ..continuity.reconcile import reconcile

    settings = ctx.settings()
    source, target = source_and_target(settings, args)
    tables = tuple(dict.fromkeys(args.tables or MANAGED_TABLES))
    since = f" updated since {args.since.isoformat()}" if args.since else ""
    ctx.print(f"Syncing {', '.join(tables)}{since} from {source.name} ({source.describe()}) "
              f"to {target.name} ({target.describe()})")
    live = not args.no_progress and not ctx.json and ctx.out.isatty()
    with _connect(source, settings) as src, _connect(target, settings) as dst, \
            progress(ctx, live) as on_progress:
        reports = reconcile(src, dst, tables=tables, since=args.since, source_name=source.name,
                            target_name=target.name, on_progress=on_progress)
    for report in reports:
        ctx.print(_format_report(report))
    ctx.print(f"done: {sum(r.copied for r in reports)} row(s) written to {target.name}")
    if ctx.json:
        ctx.print_json({**table_reports_json(source.name, target.name, reports),
                        "since": args.since})
    return EXIT_OK


def _format_report(r: TableReport) -> str:
    text = (f"{r.table}: {r.source_rows} row(s) considered, {r.copied} copied "
            f"({r.inserted} inserted, {r.updated} updated), {r.unchanged} unchanged or newer "
            f"on the target (kept)")
    if r.skipped:
        text += (f", {r.skipped} conflict(s) skipped: they share a unique key with a "
                 "different row on the target")
    return text


if __name__ == "__main__":
    raise SystemExit(main())
