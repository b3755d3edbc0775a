"""What the schema and replication commands share: context, exit codes, helpers.

Each command resolves a `Context` once (the environment, or ``.env`` plus
``os.environ``), prints through it so that every line is scrubbed of the
providers' passwords, and turns the package's errors into an exit code
(the table is `exit_codes`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import date, datetime
from functools import partial
from typing import Any, TextIO
from urllib.parse import quote

import psycopg

from ..engine.environment import load_environment, settings_from_env
from ..engine.settings import ProviderSettings, Settings
from ..errors import (
    AgentFactoryError,
    ConfigurationError,
    ExtensionUnavailableError,
    ProviderError,
    ProviderUnavailableError,
)
from ..schema.copy import ProgressCallback, TableReport
from ..schema.migrations import DEFAULT_EMBEDDING_DIM, check_embedding_dim, describe_db_error
from .exit_codes import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_UNAVAILABLE, EXIT_USAGE

__all__ = [
    "EMBEDDING_DIM_VAR", "Action", "Context",
    "add_json_flag", "bind", "connect", "context", "dispatch", "exit_code",
    "progress", "resolve_targets", "run", "source_and_target", "table_reports_json",
]

EMBEDDING_DIM_VAR = "DATABASE_EMBEDDING_DIM"
# Commands talk to one provider at a time and may wake a serverless one.
_MIN_CONNECT_TIMEOUT = 10.0


def exit_code(exc: BaseException) -> int:
    """The exit code for an error (see `exit_codes`): usage, unreachable, or failed."""
    if isinstance(exc, ConfigurationError):
        return EXIT_USAGE
    unreachable = (ProviderError, ExtensionUnavailableError, psycopg.OperationalError)
    return EXIT_UNAVAILABLE if isinstance(exc, unreachable) else EXIT_FAILED


def dispatch(args: argparse.Namespace, environ: Mapping[str, str] | None) -> int:
    """Run the parsed command with ``environ``; Ctrl-C exits 130 with one line."""
    args.environ = environ
    command: Callable[[argparse.Namespace], int] = args.command
    try:
        return command(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


@dataclass
class Context:
    """Configuration resolved once per command, and output that scrubs secrets.

    With ``json`` (the command's ``--json``), the lines for people are not
    printed: the command prints one document through `print_json` instead.
    Errors still go to stderr either way.
    """

    env: Mapping[str, str]
    secrets: tuple[str, ...] = ()
    out: TextIO = field(default_factory=lambda: sys.stdout)
    err: TextIO = field(default_factory=lambda: sys.stderr)
    json: bool = False

    def settings(self) -> Settings:
        settings = settings_from_env(self.env, dotenv=None)
        self.secrets = tuple(
            s for p in settings.providers.values() if len(p.password) >= 4
            for s in (p.password, quote(p.password, safe=""))
        )
        return settings

    def embedding_dim(self, flag: str | None) -> int:
        if flag is not None:
            return check_embedding_dim(flag, "--embedding-dim")
        if self.env.get(EMBEDDING_DIM_VAR, "").strip():
            return check_embedding_dim(self.env[EMBEDDING_DIM_VAR], EMBEDDING_DIM_VAR)
        return DEFAULT_EMBEDDING_DIM

    def print(self, text: str = "") -> None:
        if not self.json:
            print(self.scrub(text), file=self.out, flush=True)

    def print_json(self, document: object) -> None:
        """One machine-readable document (datetimes as ISO 8601), scrubbed like every line."""
        text = json.dumps(document, indent=2, sort_keys=True, default=_json_default)
        for secret in self.secrets:  # as JSON escapes it: a quote or backslash in a password
            text = text.replace(json.dumps(secret)[1:-1], "***")
        print(self.scrub(text), file=self.out, flush=True)

    def error(self, text: str) -> None:
        print(self.scrub(f"error: {text}"), file=self.err, flush=True)

    def scrub(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def _json_default(value: object) -> object:
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return str(value)


def context(args: argparse.Namespace) -> Context:
    environ = getattr(args, "environ", None)
    as_json = bool(getattr(args, "json", False))
    return Context(load_environment() if environ is None else dict(environ), json=as_json)


def add_json_flag(parser: argparse.ArgumentParser) -> None:
    """The ``--json`` flag every command that prints data takes."""
    parser.add_argument("--json", action="store_true",
                        help="print one JSON document instead of lines for people")


Action = Callable[[Context, argparse.Namespace], int]
ExitCode = Callable[[BaseException], int]


def bind(action: Action, code: ExitCode = exit_code) -> Callable[[argparse.Namespace], int]:
    """The ``command`` an argparse action sets: `run` with ``action``."""
    return partial(run, action=action, code=code)


def run(args: argparse.Namespace, action: Action, code: ExitCode = exit_code) -> int:
    """Run ``action``, turning our errors into a message and an exit code."""
    ctx = context(args)
    try:
        return action(ctx, args)
    except AgentFactoryError as exc:
        ctx.error(str(exc))
        return code(exc)


def resolve_targets(settings: Settings, name: str | None, option: str = "--provider"
                    ) -> list[ProviderSettings]:
    """Every provider in failover order, or the one ``name`` picks (else a clear error)."""
    ordered = list(dict.fromkeys((*settings.failover_order, *settings.providers)))
    if name is None:
        return [settings.providers[n] for n in ordered]
    key = name.strip().lower()
    if key not in settings.providers:
        raise ConfigurationError(
            f"{option} {name!r} is not a configured provider; configured: "
            f"{', '.join(ordered)}. Set {key.upper()}_DB_URL (and list it in "
            "DATABASE_FAILOVER_ORDER) or pick a configured one."
        )
    return [settings.providers[key]]


def source_and_target(settings: Settings, args: argparse.Namespace
                      ) -> tuple[ProviderSettings, ProviderSettings]:
    """The two different providers that ``--from`` and ``--to`` name."""
    source = resolve_targets(settings, args.source, "--from")[0]
    target = resolve_targets(settings, args.target, "--to")[0]
    if source.name == target.name:
        raise ConfigurationError(f"--from and --to both name {source.name!r}; pick two "
                                 "different providers")
    return source, target


def connect(target: ProviderSettings, settings: Settings, *, application_name: str,
            autocommit: bool = True) -> psycopg.Connection[Any]:
    """One connection to ``target``, no failover; patient with a waking provider."""
    timeout = math.ceil(max(settings.connect_timeout, _MIN_CONNECT_TIMEOUT))
    conninfo = target.conninfo(connect_timeout=str(timeout), application_name=application_name)
    try:
        return psycopg.connect(conninfo, autocommit=autocommit)
    except psycopg.Error as exc:
        raise ProviderUnavailableError(target.name, describe_db_error(exc)) from None


def table_reports_json(source: str, target: str, reports: Sequence[TableReport]
                       ) -> dict[str, Any]:
    """The ``--json`` document of a copy or a sync: per table, what it did."""
    return {
        "source": source,
        "target": target,
        "tables": {r.table: {**asdict(r), "copied": r.copied} for r in reports},
        "written": sum(r.copied for r in reports),
    }


@contextmanager
def progress(ctx: Context, live: bool) -> Iterator[ProgressCallback]:
    """A Rich progress bar on a terminal, else one plain line per batch."""
    if live:
        try:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeRemainingColumn,
            )
        except ImportError:
            live = False
    if not live:
        def plain(table: str, done: int, total: int) -> None:
            if done or not total:
                ctx.print(f"  {table}: {done}/{total} rows")

        yield plain
        return
    tasks: dict[str, Any] = {}
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeRemainingColumn(), transient=False) as bar:

        def update(table: str, done: int, total: int) -> None:
            if table not in tasks:
                tasks[table] = bar.add_task(table, total=total)
            bar.update(tasks[table], completed=done, total=total)

        yield update
