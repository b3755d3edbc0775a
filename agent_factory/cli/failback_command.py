"""``agent-factory-db failback status|run``: the backups' journals, seen and drained by hand.

``status`` reads each backup's journal (changes pending, oldest) and the
primary's conflict record; ``run`` drains every reachable backup into the
primary exactly as an application instance does (same lock, same policy from
the environment), so it is safe while applications run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import psycopg

from ..continuity import drain, journal
from ..continuity.merge import ConflictPolicy
from ..engine.settings import ProviderSettings, Settings
from ..errors import ConfigurationError, ProviderUnavailableError
from .command_support import Context, add_json_flag, bind, connect, dispatch
from .exit_codes import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE

__all__ = ["add_failback_commands", "main"]


def add_failback_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Add ``failback status|run`` to a CLI's subcommands."""
    failback = subparsers.add_parser(
        "failback", help="changes made on backups during an outage, and their way back",
        description="Each backup records the changes it took while standing in for the "
        "primary (agent_factory_journal); failback replays them on the primary.")
    actions = failback.add_subparsers(required=True, metavar="ACTION")
    status = actions.add_parser("status", help="pending changes per backup, conflicts by table "
                                "(exit 1 while changes are pending)")
    add_json_flag(status)
    status.set_defaults(command=bind(_status))
    run = actions.add_parser("run", help="drain every reachable backup into the primary now")
    run.add_argument("--force", action="store_true",
                     help="with DATABASE_CONFLICT_POLICY=callback (a function this command "
                     "cannot call): settle conflicts by backup_wins instead of refusing")
    add_json_flag(run)
    run.set_defaults(command=bind(_run))


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one failback command; returns the exit code (``environ`` replaces ``os.environ``)."""
    parser = argparse.ArgumentParser(prog="agent-factory-db")
    add_failback_commands(parser.add_subparsers(required=True, metavar="COMMAND"))
    return dispatch(parser.parse_args(sys.argv[1:] if argv is None else list(argv)), environ)


def _backups(settings: Settings) -> list[ProviderSettings]:
    return [p for n, p in settings.providers.items() if n != settings.primary]


def _status(ctx: Context, args: argparse.Namespace) -> int:
    settings = ctx.settings()
    report: dict[str, Any] = {"primary": settings.primary, "pending": {}, "oldest": {},
                              "unreachable": [], "conflicts": {}}
    for backup in _backups(settings):
        try:
            with connect(backup, settings, application_name="agent-factory-failback") as conn:
                count, oldest = journal.pending(conn)
        except (ProviderUnavailableError, psycopg.Error):
            report["unreachable"].append(backup.name)
            continue
        report["pending"][backup.name] = count
        report["oldest"][backup.name] = None if oldest is None else oldest.isoformat()
    primary = settings.providers[settings.primary]
    try:
        with connect(primary, settings, application_name="agent-factory-failback") as conn:
            report["conflicts"] = journal.conflicts_by_table(conn)
    except (ProviderUnavailableError, psycopg.Error):
        report["unreachable"].append(primary.name)
    if ctx.json:
        ctx.print_json(report)
    else:
        for name, count in report["pending"].items():
            since = f" (oldest {report['oldest'][name]})" if count else ""
            ctx.print(f"{name}: {count} change(s) pending{since}")
        for name in report["unreachable"]:
            ctx.print(f"{name}: unreachable")
        conflicts = report["conflicts"]
        ctx.print("conflicts on the primary: " + (", ".join(
            f"{t} {n}" for t, n in sorted(conflicts.items())) or "none"))
    if primary.name in report["unreachable"]:
        return EXIT_UNAVAILABLE
    return EXIT_FAILED if any(report["pending"].values()) else EXIT_OK


def _run(ctx: Context, args: argparse.Namespace) -> int:
    settings = ctx.settings()
    if settings.conflict_policy == "callback":
        if not args.force:
            raise ConfigurationError(
                "DATABASE_CONFLICT_POLICY=callback names a function in the application; "
                "this command cannot call it. Drain from the application, or pass --force to "
                "settle conflicts by backup_wins")
        settings = replace(settings, conflict_policy="backup_wins", conflict_resolver=None)
    policy = ConflictPolicy.from_settings(settings)
    primary = settings.providers[settings.primary]
    failed = False
    backups: dict[str, dict[str, Any]] = {}
    with connect(primary, settings, application_name="agent-factory-failback",
                 autocommit=False) as target:
        journal.prepare_session(target)
        subscribed = journal.subscribers(target)
        for backup in _backups(settings):
            try:
                with connect(backup, settings, application_name="agent-factory-failback",
                             autocommit=False) as source, \
                        connect(backup, settings, application_name="agent-factory-failback",
                                autocommit=False) as pruner:
                    journal.prepare_session(source)
                    total = drain.drain_all(
                        source, target, backup.name, policy,
                        delete_inserted_on_source=backup.name in subscribed, pruner=pruner)
                if total.skipped:
                    ctx.print(f"{backup.name}: another drainer holds it; skipped")
                ctx.print(f"{backup.name}: {total.changes} change(s) replayed, "
                          f"{total.conflicts} conflict(s)")
                backups[backup.name] = {"state": "skipped" if total.skipped else "drained",
                                        "changes": total.changes, "conflicts": total.conflicts}
            except ProviderUnavailableError as exc:
                ctx.print(f"{backup.name}: unreachable ({exc})")
                backups[backup.name] = {"state": "unreachable", "error": str(exc)}
            except psycopg.Error as exc:
                failed = True
                ctx.error(f"{backup.name}: drain failed: {type(exc).__name__}: {exc}")
                backups[backup.name] = {"state": "failed",
                                        "error": f"{type(exc).__name__}: {exc}"}
    if ctx.json:
        ctx.print_json({"primary": primary.name, "backups": backups})
    return EXIT_FAILED if failed else EXIT_OK
