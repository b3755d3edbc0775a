"""The schema commands: deploy, verify, status and copy.

    agent-factory-db schema deploy (--provider NAME | --all) [--dry-run] [--embedding-dim N]
    agent-factory-db schema verify [--embedding-dim N]
    agent-factory-db schema status [--provider NAME]
    agent-factory-db schema copy --from NAME --to NAME [--table T] [--batch-size N]

``scripts/deploy_multi_provider_schema.py`` runs `main`, which takes the same
actions and also the flags of the original script: ``--provider NAME``,
``--all``, ``--verify`` and ``--dry-run``.

Exit codes (`agent_factory.cli.exit_codes`): 0 done (verify: the providers
match); 1 a migration failed, the schemas drifted or a copy was refused; 2 the
configuration or a command-line argument is wrong; 3 a provider cannot be
reached or lacks pgvector.

Providers come from the environment like `DatabaseManager()` does
(`settings_from_env`); ``DATABASE_EMBEDDING_DIM`` is read here only (through
`agent_factory.cli.command_support`, which holds what the commands share). Output
names providers and ``user@host:port/db``, never a password, and every line is
scrubbed once more before printing.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import psycopg

from ..engine.settings import ProviderSettings, Settings
from ..errors import AgentFactoryError
from ..schema.catalog import Catalog, diff_catalogs, format_differences, read_catalogs
from ..schema.copy import DEFAULT_BATCH_SIZE, MANAGED_TABLES, TableReport, copy_tables
from ..schema.migrations import (
    DEFAULT_EMBEDDING_DIM,
    AppliedMigration,
    Migration,
    apply_migrations,
    load_migrations,
    plan_migrations,
    render_script,
)
from .arguments import positive_float, positive_int
from .command_support import (
    EMBEDDING_DIM_VAR,
    Context,
    add_json_flag,
    bind,
    connect,
    context,
    dispatch,
    exit_code,
    progress,
    resolve_targets,
    run,
    source_and_target,
    table_reports_json,
)
from .exit_codes import EXIT_FAILED, EXIT_OK, EXIT_UNAVAILABLE, EXIT_USAGE
from .schema_json import status_json, verify_json

__all__ = ["ACTIONS", "add_schema_commands", "exit_code", "main"]

ACTIONS = ("deploy", "verify", "status", "copy")
_DEFAULT_TIMEOUT = 60.0
# The old private names of the shared helpers, for code that still imports them here.
_Context, _context, _progress, _targets = Context, context, progress, resolve_targets


def add_schema_commands(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> argparse.ArgumentParser:
    """Add ``schema deploy|verify|status|copy`` to a CLI's subcommands.

    Each action sets ``command`` to a function taking the parsed namespace and
    returning the exit code: ``return args.command(args)``.
    """
    schema = subparsers.add_parser(
        "schema", help="deploy, verify, inspect and copy the database schema",
        description="Deploy the schema migrations to the configured providers, compare "
        "their catalogs, and copy data between them.",
    )
    _add_actions(schema.add_subparsers(required=True, metavar="ACTION"))
    return schema


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Run one schema command; returns the exit code.

    ``environ`` replaces ``os.environ`` and then no ``.env`` file is read.
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    prog = "deploy_multi_provider_schema.py"
    if args_list and args_list[0] in ACTIONS:
        parser = argparse.ArgumentParser(prog=prog, description=_DESCRIPTION)
        _add_actions(parser.add_subparsers(required=True, metavar="ACTION"))
    else:
        parser = _script_parser(prog)
    return dispatch(parser.parse_args(args_list), environ)


_DESCRIPTION = (
    "Deploy the agent-factory schema (versioned migrations) to the configured PostgreSQL "
    "providers, verify that their catalogs match, show their status, or copy data. "
    "Providers come from the same environment variables as DatabaseManager."
)
_EPILOG = (
    "Actions: deploy, verify, status, copy (e.g. 'copy --from supabase --to neon'); "
    "run '%(prog)s ACTION --help'. Exit codes: 0 ok, 1 migration failed or drift, "
    "2 unreachable provider, missing pgvector or bad configuration."
)


def _script_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=_DESCRIPTION, epilog=_EPILOG)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--provider", metavar="NAME", help="deploy to this provider")
    where.add_argument("--all", action="store_true", help="deploy to every configured provider")
    parser.add_argument("--verify", action="store_true",
                        help="compare the catalogs of all providers (after deploying, if asked)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the rendered SQL; connects to nothing")
    _add_schema_options(parser)
    parser.set_defaults(command=_legacy)
    return parser


def _add_actions(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    deploy = sub.add_parser("deploy", help="apply pending migrations",
                            description="Apply the pending migrations, each in its own "
                            "transaction. Deploying twice changes nothing.")
    where = deploy.add_mutually_exclusive_group()
    where.add_argument("--provider", metavar="NAME", help="deploy to this provider")
    where.add_argument("--all", action="store_true", help="deploy to every configured provider")
    deploy.add_argument("--dry-run", action="store_true",
                        help="print the rendered SQL; connects to nothing")
    _add_schema_options(deploy)
    add_json_flag(deploy)
    deploy.set_defaults(command=_deploy_command, verify=False)

    verify = sub.add_parser("verify", help="compare the catalogs of all configured providers",
                            description="Exit 0 when the providers' schemas match and every "
                            "migration is applied, 1 on drift, 2 when a provider is unreachable.")
    _add_schema_options(verify)
    add_json_flag(verify)
    verify.set_defaults(command=bind(_verify))

    status = sub.add_parser("status", help="migrations and pgvector on each provider")
    status.add_argument("--provider", metavar="NAME", help="only this provider")
    _add_schema_options(status)
    add_json_flag(status)
    status.set_defaults(command=bind(_status))

    copy = sub.add_parser("copy", help="copy session_memories and knowledge_atoms rows",
                          description="Copy the managed tables from one provider to another. "
                          "Existing rows are updated only when the source's is newer; "
                          "re-running is safe.")
    copy.add_argument("--from", dest="source", metavar="NAME", required=True)
    copy.add_argument("--to", dest="target", metavar="NAME", required=True)
    copy.add_argument("--table", dest="tables", action="append", choices=MANAGED_TABLES,
                      help="copy only this table (repeatable; default: all managed tables)")
    copy.add_argument("--batch-size", type=positive_int, default=DEFAULT_BATCH_SIZE,
                      metavar="N", help=f"rows per batch (default {DEFAULT_BATCH_SIZE})")
    copy.add_argument("--no-progress", action="store_true",
                      help="plain lines instead of a progress bar (automatic when not a TTY)")
    add_json_flag(copy)
    copy.set_defaults(command=bind(_copy))


def _add_schema_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--embedding-dim", metavar="N",
                        help=f"vector dimension of knowledge_atoms.embedding (default: "
                        f"${EMBEDDING_DIM_VAR} or {DEFAULT_EMBEDDING_DIM})")
    parser.add_argument("--migrations-dir", metavar="DIR", type=Path,
                        help="use the migrations in DIR instead of the shipped ones")
    parser.add_argument("--timeout", type=positive_float, default=_DEFAULT_TIMEOUT,
                        metavar="SECONDS", help="give up on a silent provider after this "
                        f"long when reading catalogs (default {_DEFAULT_TIMEOUT:g})")


def _connect(target: ProviderSettings, settings: Settings) -> psycopg.Connection[Any]:
    return connect(target, settings, application_name="agent-factory-schema")


# -- deploy --------------------------------------------------------------------


def _legacy(args: argparse.Namespace) -> int:
    if not (args.provider or args.all or args.verify or args.dry_run):
        return _usage_error("choose --provider NAME, --all, --verify or --dry-run")
    if args.verify and args.dry_run:
        return _usage_error("--dry-run prints the deploy SQL; it cannot be combined "
                            "with --verify")
    code = EXIT_OK
    if args.provider or args.all or args.dry_run:
        code = _deploy_command(args)
    if args.verify and code != EXIT_UNAVAILABLE:
        code = max(code, run(args, _verify))
    return code


def _usage_error(message: str) -> int:
    print(f"error: {message} (see --help)", file=sys.stderr)
    return EXIT_USAGE


def _deploy_command(args: argparse.Namespace) -> int:
    if not (args.provider or args.all or args.dry_run):
        return _usage_error("deploy needs --provider NAME or --all (or --dry-run)")
    return run(args, _deploy)


def _deploy(ctx: Context, args: argparse.Namespace) -> int:
    dim = ctx.embedding_dim(args.embedding_dim)
    migrations = load_migrations(args.migrations_dir)
    if args.dry_run:
        script = render_script(migrations, dim).rstrip("\n")
        ctx.print(script)
        if ctx.json:
            ctx.print_json({"dry_run": True, "embedding_dim": dim, "sql": script})
        print("-- dry run: nothing was sent to any provider", file=ctx.err)
        return EXIT_OK
    settings = ctx.settings()
    failed: dict[str, int] = {}
    done: dict[str, dict[str, Any]] = {}
    for target in resolve_targets(settings, args.provider):
        ctx.print(f"{target.name} ({target.describe()}): deploying, {len(migrations)} "
                  f"migration(s) shipped, embedding dimension {dim}")

        def report(record: AppliedMigration, name: str = target.name) -> None:
            ctx.print(f"{name}: applied {record.label}")

        try:
            with _connect(target, settings) as conn:
                applied = apply_migrations(conn, embedding_dim=dim, provider=target.name,
                                           directory=args.migrations_dir, on_applied=report)
        except AgentFactoryError as exc:
            ctx.error(str(exc))
            failed[target.name] = exit_code(exc)
            done[target.name] = {"address": target.describe(), "applied": [], "error": str(exc)}
            continue
        done[target.name] = {"address": target.describe(),
                             "applied": [r.label for r in applied], "error": None}
        if applied:
            ctx.print(f"{target.name}: done, {len(applied)} migration(s) applied")
        else:
            ctx.print(f"{target.name}: already up to date, nothing changed")
    if ctx.json:
        ctx.print_json({"embedding_dim": dim, "shipped": [m.label for m in migrations],
                        "providers": done})
    if failed:
        ctx.error(f"deploy failed on {', '.join(failed)}")
        return max(failed.values())
    return EXIT_OK


# -- verify and status ---------------------------------------------------------


def _read_catalogs(settings: Settings, targets: Sequence[ProviderSettings],
                   migrations: Sequence[Migration], timeout: float
                   ) -> dict[str, Catalog | AgentFactoryError]:
    connectors = {t.name: partial(_connect, t, settings) for t in targets}
    return read_catalogs(connectors, _required(migrations), timeout)


def _verify(ctx: Context, args: argparse.Namespace) -> int:
    dim = ctx.embedding_dim(args.embedding_dim)
    migrations = load_migrations(args.migrations_dir)
    settings = ctx.settings()
    targets = resolve_targets(settings, None)
    ctx.print(f"Verifying the schema of {len(targets)} provider(s): "
              f"{', '.join(t.name for t in targets)}")
    results = _read_catalogs(settings, targets, migrations, args.timeout)
    catalogs = {n: r for n, r in results.items() if isinstance(r, Catalog)}
    for target in targets:
        result = results[target.name]
        if isinstance(result, Catalog):
            ctx.print(f"  {target.name} ({target.describe()}): PostgreSQL "
                      f"{result.server_version}, {len(result.applied)} migration(s) applied")
        else:
            ctx.print(f"  {target.name} ({target.describe()}): UNREACHABLE")
            ctx.error(str(result))
    problems = _migration_problems(catalogs, migrations, dim)
    diffs = diff_catalogs(catalogs)
    if diffs:
        ctx.print(format_differences(diffs))
    for line in problems:
        ctx.print(line)
    if ctx.json:
        ctx.print_json(verify_json(targets, results, diffs, problems, migrations))
    if len(catalogs) < len(targets):
        unreachable = [t.name for t in targets if t.name not in catalogs]
        ctx.error(f"cannot verify: {', '.join(unreachable)} unreachable")
        return EXIT_UNAVAILABLE
    if diffs or problems:
        ctx.print("DRIFT: the providers' schemas do not match the shipped migrations "
                  "or each other")
        return EXIT_FAILED
    ctx.print(f"OK: {len(catalogs)} provider(s) match, {len(migrations)} migration(s) applied")
    return EXIT_OK


def _migration_problems(
    catalogs: Mapping[str, Catalog], migrations: Sequence[Migration], dim: int
) -> list[str]:
    lines = []
    for name, catalog in catalogs.items():
        plan = plan_migrations(migrations, catalog.applied, dim)
        if plan.pending:
            lines.append(f"{name}: {len(plan.pending)} migration(s) not applied: "
                         f"{', '.join(m.label for m in plan.pending)} "
                         f"(run: schema deploy --provider {name})")
        if plan.conflicts:
            lines.append(plan.drift_message(name))
    return lines


def _required(migrations: Sequence[Migration]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(e for m in migrations for e in m.extensions))


def _status(ctx: Context, args: argparse.Namespace) -> int:
    dim = ctx.embedding_dim(args.embedding_dim)
    migrations = load_migrations(args.migrations_dir)
    settings = ctx.settings()
    targets = resolve_targets(settings, args.provider)
    required = _required(migrations)
    results = _read_catalogs(settings, targets, migrations, args.timeout)
    if ctx.json:
        ctx.print_json({t.name: status_json(t, results[t.name], migrations, required, dim)
                        for t in targets})
    code = EXIT_OK
    for target in targets:
        result = results[target.name]
        ctx.print(f"{target.name} ({target.describe()})")
        if not isinstance(result, Catalog):
            ctx.print(f"  UNREACHABLE: {result}")
            code = EXIT_UNAVAILABLE
            continue
        catalog = result
        ctx.print(f"  PostgreSQL {catalog.server_version}")
        for ext in required:
            state = (f"installed, version {catalog.extensions[ext]}" if ext in catalog.extensions
                     else "available, not installed yet" if ext in catalog.available
                     else "NOT AVAILABLE on this server (see schema deploy for how to install)")
            ctx.print(f"  extension {ext}: {state}")
        plan = plan_migrations(migrations, catalog.applied, dim)
        for record in catalog.applied:
            ctx.print(f"  applied {record.label} at {record.applied_at:%Y-%m-%d %H:%M:%S%z}")
        if plan.pending:
            ctx.print(f"  pending: {', '.join(m.label for m in plan.pending)}")
        if plan.conflicts:
            ctx.print(plan.drift_message(target.name))
        ctx.print("  up to date" if plan.up_to_date else "  NOT up to date")
        if not plan.up_to_date:
            code = max(code, EXIT_FAILED)
    return code


# -- copy ----------------------------------------------------------------------


def _copy(ctx: Context, args: argparse.Namespace) -> int:
    settings = ctx.settings()
    source, target = source_and_target(settings, args)
    tables = tuple(dict.fromkeys(args.tables or MANAGED_TABLES))
    ctx.print(f"Copying {', '.join(tables)} from {source.name} ({source.describe()}) "
              f"to {target.name} ({target.describe()})")
    live = not args.no_progress and not ctx.json and ctx.out.isatty()
    with _connect(source, settings) as src, _connect(target, settings) as dst, \
            progress(ctx, live) as on_progress:
        reports = copy_tables(src, dst, tables=tables, batch_size=args.batch_size,
                              source_name=source.name, target_name=target.name,
                              on_progress=on_progress)
    for report in reports:
        ctx.print(_format_report(report))
    total = sum(r.copied for r in reports)
    ctx.print(f"done: {total} row(s) written to {target.name}")
    if ctx.json:
        ctx.print_json(table_reports_json(source.name, target.name, reports))
    return EXIT_OK


def _format_report(r: TableReport) -> str:
    text = (f"{r.table}: {r.source_rows} row(s) in source, {r.copied} copied "
            f"({r.inserted} inserted, {r.updated} updated), {r.unchanged} unchanged")
    if r.skipped:
        text += (f", {r.skipped} skipped: they share a unique key with a different row "
                 "on the target")
    return text
