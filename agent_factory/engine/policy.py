"""Failover decisions, without I/O.

What counts as a provider being unavailable (as opposed to a SQL error that
must reach the caller unchanged), which statements may be retried on another
provider after they were sent, in which order providers are tried, and the
health state machine with its hysteresis. The sync manager (and later an
async twin) drives these; nothing here touches a socket or a clock of its own.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol, TypeVar

import psycopg
from psycopg_pool import PoolTimeout

# SQLSTATEs that mean "this server cannot serve now", not "your SQL is wrong":
# admin/crash/cannot-connect-now shutdown and too many connections.
_UNAVAILABLE_SQLSTATES = frozenset({"57P01", "57P02", "57P03", "53300"})


class Kind(enum.Enum):
    UNAVAILABLE = "unavailable"
    READ_ONLY = "read_only"  # a write refused by a read-only server: nothing applied
    SQL = "sql"


def classify(exc: BaseException) -> Kind:
    """Whether an error means the provider is unavailable or the SQL failed."""
    if isinstance(exc, PoolTimeout):
        return Kind.UNAVAILABLE
    if not isinstance(exc, psycopg.Error):
        return Kind.SQL
    state = exc.sqlstate
    if state is not None:
        if state.startswith("08") or state in _UNAVAILABLE_SQLSTATES:
            return Kind.UNAVAILABLE
        if state == "25006":  # read_only_sql_transaction: a standby or demoted server
            return Kind.READ_ONLY
        return Kind.SQL
    # No SQLSTATE: a client-side error. Lost/closed connections are
    # OperationalError or InterfaceError; anything else (bad placeholders,
    # wrong fetch) is the caller's.
    if isinstance(exc, (psycopg.OperationalError, psycopg.InterfaceError)):
        return Kind.UNAVAILABLE
    return Kind.SQL


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_COMMENTS = re.compile(r"^\s*(?:--[^\n]*\n\s*|/\*.*?\*/\s*)*", re.DOTALL)
# Lexemes whose text says nothing about what a statement does: comments,
# string literals (E'' strings too, and dollar-quoted ones) and quoted
# identifiers. The last alternative is an unterminated one.
_OPAQUE = re.compile(
    r"""(?=[-/'"$])  # cheap rejection of the other characters
    (?: --[^\n]*
      | /\*(?P<comment>.*?)\*/
      | (?P<string>'[^']*(?:''[^']*)*')
      | \$(?P<tag>(?:[^\W\d]\w*)?)\$.*?\$(?P=tag)\$
      | (?P<quoted>"[^"]*(?:""[^"]*)*")
      | (?P<open>['"]|/\*|\$(?:[^\W\d]\w*)?\$) )""",
    re.DOTALL | re.VERBOSE,
)
_READ_START = re.compile(r"\s*(?:select|show|values|table|explain|with)\b", re.IGNORECASE)
#: Words that make a statement a write wherever they appear (FOR UPDATE/SHARE,
#: SELECT INTO, a data-modifying WITH, EXPLAIN ANALYZE, which runs the statement).
_WRITE_WORDS = _words("""
    insert update delete merge into copy call lock truncate nextval setval analyze analyse
    share operator
""")
# Names (possibly schema-qualified), and any other character but a space: a
# call is a name, then "(" (`a = (SELECT ...)` and `%(name)s` are not).
_TOKEN = re.compile(r"[^\W\d][\w$]*(?:\s*\.\s*[^\W\d][\w$]*)*|[^\w\s]")
_CTE_BODY = frozenset({"select", "values", "with", "table"})

#: Words that take a parenthesis without being a function call.
_KEYWORDS = _words("""
    all and any array as asc between by case cast collate cross cube desc distinct else end
    escape except exists explain filter first from full group grouping having ilike in inner
    intersect is join last lateral left like limit materialized natural not null nulls offset
    on only or order ordinality outer over partition range recursive right rollup row rows
    select sets similar some table tablesample then to union using values when where window
    with within
""")

#: Built-in (and pgvector / pg_trgm) functions with no side effect on data,
#: and type names that take a modifier (numeric(10, 2)).
_PURE = _words("""
    count sum avg min max array_agg string_agg json_agg jsonb_agg json_object_agg
    jsonb_object_agg bool_and bool_or every bit_and bit_or bit_xor stddev stddev_pop
    stddev_samp variance var_pop var_samp percentile_cont percentile_disc mode corr covar_pop
    covar_samp regr_slope regr_intercept regr_count regr_r2 rank dense_rank row_number
    percent_rank cume_dist ntile lag lead first_value last_value nth_value range_agg
    coalesce nullif greatest least
    length char_length character_length octet_length bit_length lower upper initcap trim btrim
    ltrim rtrim substring substr position strpos overlay replace concat concat_ws format
    lpad rpad repeat reverse split_part string_to_array array_to_string string_to_table
    regexp_replace regexp_match regexp_matches regexp_split_to_array regexp_split_to_table
    regexp_like regexp_count regexp_substr regexp_instr starts_with translate md5 sha224 sha256
    sha384 sha512 encode decode to_hex ascii chr quote_ident quote_literal quote_nullable
    to_char to_number to_date to_timestamp convert_from convert_to normalize unistr
    abs ceil ceiling floor round trunc sign sqrt cbrt power pow exp ln log log10 mod div pi
    degrees radians sin cos tan asin acos atan atan2 sinh cosh tanh width_bucket gcd lcm
    factorial scale random gen_random_uuid uuidv4 uuidv7
    now current_timestamp current_date current_time localtime localtimestamp clock_timestamp
    statement_timestamp transaction_timestamp timeofday date_trunc date_part date_bin extract
    age make_date make_time make_timestamp make_timestamptz make_interval justify_days
    justify_hours justify_interval isfinite timezone to_timestamp
    json_build_object jsonb_build_object json_build_array jsonb_build_array to_json to_jsonb
    row_to_json array_to_json json_array_length jsonb_array_length json_extract_path
    json_extract_path_text jsonb_extract_path jsonb_extract_path_text json_array_elements
    jsonb_array_elements json_array_elements_text jsonb_array_elements_text json_each
    jsonb_each json_each_text jsonb_each_text json_object_keys jsonb_object_keys json_typeof
    jsonb_typeof jsonb_set jsonb_set_lax jsonb_insert jsonb_pretty json_strip_nulls
    jsonb_strip_nulls jsonb_path_query jsonb_path_exists jsonb_path_match
    jsonb_path_query_array jsonb_path_query_first json_populate_record jsonb_populate_record
    json_populate_recordset jsonb_populate_recordset json_to_record jsonb_to_record
    json_to_recordset jsonb_to_recordset json_object jsonb_object json_array json_scalar
    array_length array_upper array_lower cardinality array_position array_positions
    array_append array_prepend array_cat array_remove array_replace array_dims array_ndims
    array_fill array_reverse array_sample array_shuffle array_sort trim_array unnest
    generate_series generate_subscripts
    to_tsvector to_tsquery plainto_tsquery phraseto_tsquery websearch_to_tsquery ts_rank
    ts_rank_cd ts_headline setweight strip numnode querytree
    version current_database current_catalog current_schema current_schemas current_user
    session_user current_role current_setting inet_server_port inet_server_addr
    inet_client_addr inet_client_port pg_backend_pid pg_postmaster_start_time
    pg_conf_load_time pg_is_in_recovery pg_current_wal_lsn pg_current_wal_insert_lsn
    pg_last_wal_receive_lsn pg_last_wal_replay_lsn pg_wal_lsn_diff pg_database_size
    pg_relation_size pg_total_relation_size pg_table_size pg_indexes_size pg_size_pretty
    pg_size_bytes pg_typeof pg_column_size has_table_privilege has_schema_privilege
    has_database_privilege has_column_privilege has_function_privilege
    has_sequence_privilege pg_has_role pg_get_viewdef pg_get_indexdef pg_get_constraintdef
    pg_get_functiondef pg_get_function_identity_arguments pg_get_function_arguments
    pg_get_function_result pg_get_triggerdef pg_get_expr pg_get_userbyid
    pg_get_serial_sequence format_type obj_description col_description shobj_description
    to_regclass to_regtype to_regproc to_regnamespace to_regrole pg_sleep
    pg_table_is_visible pg_encoding_to_char pg_tablespace_location pg_sequence_last_value
    l2_distance cosine_distance inner_product l1_distance vector_dims vector_norm
    l2_normalize subvector binary_quantize hamming_distance jaccard_distance
    similarity word_similarity strict_word_similarity show_trgm
    numeric decimal varchar char character varying bit varbit time timestamp timestamptz
    timetz interval float vector halfvec sparsevec int int2 int4 int8 integer smallint bigint
    float4 float8 real text bool boolean date uuid json jsonb bytea
""")


class _Opaque(Exception):
    """The statement's text cannot be read with confidence."""


def _blank(match: re.Match[str]) -> str:
    if match["open"] is not None:
        raise _Opaque  # unterminated: the server would read it differently
    if match["comment"] is not None and "/*" in match["comment"]:
        raise _Opaque  # nested comment
    if match["string"] is not None and "\\" in match["string"]:
        # Where it ends depends on an E prefix or standard_conforming_strings.
        raise _Opaque
    return " _q_ " if match["quoted"] is not None else " 0 "


def _only_pure_calls(body: str) -> bool:
    """No writing word, and every function called is a known side-effect-free one."""
    text = body.lower()
    tokens = _TOKEN.findall(text)
    if "pg_advisory_" in text or not _WRITE_WORDS.isdisjoint(tokens):
        return False
    if "." in text and any(
        not _WRITE_WORDS.isdisjoint(re.split(r"\s*\.\s*", t)) for t in tokens if "." in t
    ):
        return False
    opens = [i for i, t in enumerate(tokens) if t == "("] if "(" in text else []
    for i in opens:
        if i and _is_name(tokens[i - 1]) and not (
            tokens[i - 2 : i - 1] in ([")"], ["as"])  # an alias's columns; AS numeric(10, 2)
            or _pure_call(tokens[i - 1], tokens, i)
        ):
            return False
    return True


def _is_name(token: str) -> bool:
    return token[0].isalpha() or token[0] == "_"


def _pure_call(name: str, tokens: list[str], start: int) -> bool:
    """Whether ``name(`` (its parenthesis at ``tokens[start]``) changes nothing."""
    name = re.sub(r"\s+", "", name).removeprefix("pg_catalog.")
    if name in _KEYWORDS or name in _PURE:
        return True
    end = _closing(tokens, start)
    if name == "set_config":
        # is_local: the setting ends with the statement's own transaction.
        return tokens[end - 2 : end] == [",", "true"]
    # A common table expression's column list: WITH name (a, b) AS (SELECT ...).
    columns = tokens[start + 1 : end]
    after = [t for t in tokens[end + 1 : end + 6] if t not in ("not", "materialized")]
    return (
        bool(columns)
        and all(t == "," for t in columns[1::2])
        and all(_is_name(t) and "." not in t for t in columns[0::2])
        and after[:2] == ["as", "("]
        and after[2:3] != []
        and after[2] in _CTE_BODY
    )


def _closing(tokens: list[str], start: int) -> int:
    """The index of the parenthesis that closes the one at ``start`` (len: none)."""
    depth = 0
    for i in range(start, len(tokens)):
        if tokens[i] == "(":
            depth += 1
        elif tokens[i] == ")":
            depth -= 1
            if depth == 0:
                return i
    return len(tokens)


#: Statements longer than this are classified each time rather than memoized,
#: so that the cache never keeps a multi-megabyte query alive.
MEMO_MAX_CHARS = 4096


def is_read_only(query: str) -> bool:
    """Conservatively true when a statement cannot change data.

    A read is a single SELECT/SHOW/VALUES/TABLE/EXPLAIN/WITH statement with
    no writing clause (INSERT, UPDATE, DELETE, MERGE, INTO, COPY, FOR
    UPDATE/SHARE, EXPLAIN ANALYZE or ANALYSE...) that calls only functions
    known to have no side effect: built-in aggregates and string, math,
    date, JSON, array, full-text and catalog functions, pgvector's and
    pg_trgm's. Any other function (a user's, a schema-qualified one,
    ``set_config(..., false)``, ``pg_notify``, ``dblink_exec``,
    ``lo_unlink``, ``nextval``) makes it a write, since its name does not
    say what it does. Text the classifier cannot read with confidence (an
    unterminated literal, a backslash in a standard string) is a write too.
    """
    if len(query) > MEMO_MAX_CHARS:
        return _classify(query)
    return _memo(query)


def _classify(query: str) -> bool:
    head = _COMMENTS.match(query)
    if not _READ_START.match(query, head.end() if head else 0):
        return False
    try:
        body = _OPAQUE.sub(_blank, query)
    except _Opaque:
        return False
    if ";" in body.rstrip().rstrip(";"):
        return False
    return _only_pure_calls(body)


_memo = lru_cache(maxsize=1024)(_classify)


def may_retry_after_send(query: str, read_only: bool | None, idempotent: bool | None) -> bool:
    """Whether a statement whose connection broke after sending may run elsewhere."""
    reads = read_only if read_only is not None else is_read_only(query)
    return retry_rule(reads, idempotent)


def retry_rule(reads: bool, idempotent: bool | None) -> bool:
    """The rule itself, for a statement already judged a read or not: `idempotent` wins."""
    return reads if idempotent is None else idempotent


class Routable(Protocol):
    name: str

    @property
    def health(self) -> Any: ...


R = TypeVar("R", bound=Routable)


def order_reads(plan: Sequence[R], policy: str, turn: int) -> list[R]:
    """Order providers for an opt-in read by the routing policy.

    ``nearest``: lowest measured latency first (unmeasured last);
    ``round_robin``: rotate, ``turn`` times, over a weighted ring;
    ``least_busy``: fewest calls in flight per unit of weight. Ties keep the
    failover order; the unhealthy ones keep their place at the end.
    """
    if policy == "primary" or len(plan) < 2:
        return list(plan)
    live = [p for p in plan if p.health.breaker.up]
    rest = [p for p in plan if not p.health.breaker.up]
    if policy == "nearest":
        live.sort(key=lambda p: (p.health.latency_ewma is None, p.health.latency_ewma or 0.0))
    elif policy == "round_robin" and live:
        ring = [p for p in live for _ in range(max(1, p.health.tuning.weight))]
        first = ring[turn % len(ring)]
        i = live.index(first)
        live = live[i:] + live[:i]
    elif policy == "least_busy":
        live.sort(key=lambda p: p.health.in_flight / max(1, p.health.tuning.weight))
    return live + rest


def candidates(primary: str, order: tuple[str, ...], failover_enabled: bool) -> tuple[str, ...]:
    """Providers to try, in order: the primary, then the failover order."""
    if not failover_enabled:
        return (primary,)
    return tuple(dict.fromkeys((primary, *order)))


class State(enum.Enum):
    CLOSED = "closed"  # takes traffic
    OPEN = "open"  # skipped at no cost; probed in the background
    HALF_OPEN = "half_open"  # probes passing, not yet enough of them


@dataclass
class Breaker:
    """A provider's circuit breaker, with hysteresis on the way back.

    Closed: failures are counted in a sliding ``window`` (seconds); the
    ``threshold``-th one opens the breaker (threshold 1: down at once). Open:
    traffic skips the provider; a background probe is the half-open trial.
    Each good probe moves towards closed, which takes ``required``
    consecutive ones; a failure reopens it. Times are monotonic seconds
    supplied by the caller; nothing here blocks or reads a clock.
    """

    threshold: int = 1
    window: float = 30.0
    state: State = State.CLOSED
    up: bool = True  # state is CLOSED; a plain attribute for the hot path
    checked: bool = False
    last_error: str | None = None
    consecutive_failures: int = 0
    probe_successes: int = 0
    changed_at: float = 0.0
    last_check: float = 0.0
    last_latency: float | None = None
    recent: list[float] = field(default_factory=list)

    def fail(self, reason: str, now: float) -> bool:
        """Record a failure; True when this opened the breaker."""
        self.consecutive_failures += 1
        self.probe_successes = 0
        self.last_error = reason
        self.last_check = now
        self.checked = True
        if self.state is State.CLOSED:
            self.recent = [t for t in self.recent if now - t < self.window]
            self.recent.append(now)
            if len(self.recent) < self.threshold:
                return False
        opened = self.state is State.CLOSED
        self._move(State.OPEN, now)
        return opened

    def succeed(self, now: float, latency: float | None, required: int) -> bool:
        """Record a good probe; True when this closed the breaker."""
        self.last_check = now
        self.checked = True
        if latency is not None:
            self.last_latency = latency
        if self.state is State.CLOSED:
            self.consecutive_failures = 0
            return False
        self.probe_successes += 1
        if self.probe_successes < required:
            self._move(State.HALF_OPEN, now)
            return False
        self.consecutive_failures = 0
        self.probe_successes = 0
        self.recent = []
        self._move(State.CLOSED, now)
        return True

    def closes_on_next_success(self, required: int) -> bool:
        return self.state is not State.CLOSED and self.probe_successes + 1 >= required

    def _move(self, state: State, now: float) -> None:
        if state is not self.state:
            self.state = state
            self.changed_at = now
        self.up = state is State.CLOSED
