"""postgres probe: pg_stat_statements deltas over the window, table and index usage, wait events
and blocking sampled through the window, latency settings, and index advice confirmed with
hypothetical indexes (hypopg) where available.

What it does to the server: read-only catalog/statistics queries, one pg_stat_activity sample
every 0.5 s, and for index advice `PREPARE` + `EXPLAIN` (never ANALYZE: user statements are never
executed) inside a transaction that is always rolled back; hypothetical indexes live only in this
backend's memory and are reset. When hypopg is installable but not created, it is created inside
that same rolled-back transaction, so nothing persists.

The DSN's password never reaches a table, a finding or an error message: every message built
from a server or driver error goes through `scrub()`.
"""

from __future__ import annotations

import asyncio
import json
import re
import stat
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pyarrow as pa

from core.errors import BadInput, Unavailable
from probes.base import ProbeBase, Window, finding, findings_table, rows_to_table

CONNECT_TIMEOUT_S = 5.0
SAMPLE_INTERVAL_S = 0.5
# Index advice thresholds: small tables are cheaper to scan than to index.
MIN_TABLE_ROWS = 1000
MIN_ROWS_PER_SEQ_SCAN = 1000
MIN_COST_REDUCTION = 0.5
MAX_STATEMENTS_EXPLAINED = 50
# Planning stays well inside the runner's finish grace even when many statements are slow to plan.
ADVICE_BUDGET_S = 15.0

LATENCY_SETTINGS = (
    "server_version", "shared_buffers", "effective_cache_size", "work_mem", "maintenance_work_mem",
    "random_page_cost", "seq_page_cost", "effective_io_concurrency", "synchronous_commit", "fsync",
    "wal_sync_method", "commit_delay", "wal_compression", "full_page_writes", "checkpoint_timeout",
    "max_wal_size", "jit", "huge_pages", "max_connections", "max_parallel_workers_per_gather",
    "plan_cache_mode", "default_statistics_target", "autovacuum", "track_io_timing",
    "statement_timeout", "idle_in_transaction_session_timeout", "lock_timeout",
    "log_min_duration_statement", "shared_preload_libraries", "pg_stat_statements.max",
    "pg_stat_statements.track", "tcp_keepalives_idle",
)

PG_STATEMENTS_SCHEMA = pa.schema([
    ("database", pa.string()), ("userid", pa.int64()), ("queryid", pa.int64()),
    ("fingerprint", pa.string()), ("query", pa.string()), ("calls", pa.int64()),
    ("total_ms", pa.float64()), ("mean_ms", pa.float64()), ("plan_ms", pa.float64()),
    ("rows", pa.int64()), ("shared_blks_hit", pa.int64()), ("shared_blks_read", pa.int64()),
    ("temp_blks_read", pa.int64()), ("temp_blks_written", pa.int64()), ("wal_records", pa.int64()),
    ("wal_bytes", pa.int64()), ("new_in_window", pa.bool_()),
])
PG_TABLES_SCHEMA = pa.schema([
    ("schema", pa.string()), ("table", pa.string()), ("seq_scan", pa.int64()),
    ("seq_tup_read", pa.int64()), ("idx_scan", pa.int64()), ("idx_tup_fetch", pa.int64()),
    ("rows_per_seq_scan", pa.float64()), ("live_tuples", pa.int64()), ("dead_tuples", pa.int64()),
    ("dead_pct", pa.float64()), ("size_bytes", pa.int64()),
])
PG_UNUSED_INDEXES_SCHEMA = pa.schema([
    ("schema", pa.string()), ("table", pa.string()), ("index", pa.string()),
    ("size_bytes", pa.int64()), ("idx_scan", pa.int64()), ("stats_since", pa.string()),
])
PG_WAITS_SCHEMA = pa.schema([
    ("backend_type", pa.string()), ("state", pa.string()), ("wait_event_type", pa.string()),
    ("wait_event", pa.string()), ("samples", pa.int64()), ("backends_max", pa.int64()),
    ("share_pct", pa.float64()),
])
PG_BLOCKING_SCHEMA = pa.schema([
    ("blocked_pid", pa.int64()), ("blocking_pid", pa.int64()), ("blocked_queryid", pa.int64()),
    ("wait_event", pa.string()), ("samples", pa.int64()), ("seconds_observed", pa.float64()),
])
PG_SETTINGS_SCHEMA = pa.schema([
    ("name", pa.string()), ("setting", pa.string()), ("unit", pa.string()), ("source", pa.string()),
])
PG_INDEX_ADVICE_SCHEMA = pa.schema([
    ("schema", pa.string()), ("table", pa.string()), ("columns", pa.list_(pa.string())),
    ("fingerprint", pa.string()), ("query", pa.string()), ("calls", pa.int64()),
    ("cost_before", pa.float64()), ("cost_after", pa.float64()), ("cost_reduction_pct", pa.float64()),
    ("index_size_bytes", pa.int64()), ("confirmed", pa.bool_()), ("statement", pa.string()),
])


# -- DSN handling --------------------------------------------------------------------------------
def read_dsn(dsn: str | None, dsn_file: str | Path | None) -> str | None:
    if dsn_file:
        path = Path(dsn_file)
        try:
            mode = path.stat().st_mode
        except OSError as error:
            raise Unavailable(f"--pg-dsn-file {path}: {error.strerror}") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise Unavailable(f"--pg-dsn-file {path}: readable by others; chmod 600 {path}")
        text = path.read_text().strip()
        if not text:
            raise Unavailable(f"--pg-dsn-file {path}: empty")
        return text
    return dsn or None


def dsn_password(dsn: str) -> str | None:
    if "://" in dsn:
        try:
            return urlsplit(dsn).password
        except ValueError:
            return None
    match = re.search(r"(?:^|\s)password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", dsn)
    return match.group(1).strip("'") if match else None


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, for messages."""
    if "://" in dsn:
        return re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", dsn)
    return re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn)


def scrub(message: str, dsn: str | None) -> str:
    if not dsn:
        return message
    message = message.replace(dsn, redact_dsn(dsn))
    password = dsn_password(dsn)
    if password:
        # Drivers may quote the password percent-decoded: scrub both spellings.
        for spelling in {password, unquote(password)}:
            message = message.replace(spelling, "***")
    return message


def dsn_target(dsn: str) -> str:
    """host:port/db for messages (no user secrets)."""
    if "://" in dsn:
        try:
            parts = urlsplit(dsn)
            return f"{parts.hostname or 'localhost'}:{parts.port or 5432}{parts.path or ''}"
        except ValueError:
            return "the server"
    host = re.search(r"host\s*=\s*(\S+)", dsn)
    port = re.search(r"port\s*=\s*(\d+)", dsn)
    return f"{host.group(1) if host else 'localhost'}:{port.group(1) if port else 5432}"


# -- pure aggregation ----------------------------------------------------------------------------
def statement_delta_rows(start: list[dict], end: list[dict], fingerprint=None) -> list[dict]:
    """Per-statement deltas between two pg_stat_statements snapshots (only statements that ran)."""
    before = {(r["userid"], r["dbid"], r["queryid"], r.get("toplevel", True)): r for r in start}
    rows = []
    counters = ("calls", "rows", "shared_blks_hit", "shared_blks_read", "temp_blks_read",
                "temp_blks_written", "wal_records", "wal_bytes")
    for record in end:
        key = (record["userid"], record["dbid"], record["queryid"], record.get("toplevel", True))
        previous = before.get(key)
        delta = {name: int(record[name] or 0) - int((previous or {}).get(name) or 0) for name in counters}
        total_ms = float(record["total_exec_time"] or 0) - float((previous or {}).get("total_exec_time") or 0)
        plan_ms = float(record.get("total_plan_time") or 0) - float((previous or {}).get("total_plan_time") or 0)
        if delta["calls"] <= 0:
            continue
        query = record["query"] or ""
        fp, normalised = fingerprint(query) if fingerprint else (None, query)
        rows.append({
            "database": record.get("datname"), "userid": int(record["userid"]),
            "queryid": int(record["queryid"]) if record["queryid"] is not None else None,
            "fingerprint": fp, "query": normalised, "total_ms": total_ms,
            "mean_ms": total_ms / delta["calls"], "plan_ms": plan_ms, "new_in_window": previous is None,
            **delta,
        })
    rows.sort(key=lambda row: -row["total_ms"])
    return rows


def table_delta_rows(start: list[dict], end: list[dict]) -> list[dict]:
    before = {r["relid"]: r for r in start}
    rows = []
    for record in end:
        previous = before.get(record["relid"], {})

        def delta(name):
            return int(record[name] or 0) - int(previous.get(name) or 0)

        seq_scan = delta("seq_scan")
        live, dead = int(record["n_live_tup"] or 0), int(record["n_dead_tup"] or 0)
        rows.append({
            "schema": record["schemaname"], "table": record["relname"], "seq_scan": seq_scan,
            "seq_tup_read": delta("seq_tup_read"), "idx_scan": delta("idx_scan"),
            "idx_tup_fetch": delta("idx_tup_fetch"),
            "rows_per_seq_scan": delta("seq_tup_read") / seq_scan if seq_scan > 0 else None,
            "live_tuples": live, "dead_tuples": dead,
            "dead_pct": 100.0 * dead / (live + dead) if live + dead else 0.0,
            "size_bytes": int(record["size_bytes"] or 0),
        })
    rows.sort(key=lambda row: -row["seq_tup_read"])
    return rows


def wait_rows(samples: list[list[dict]]) -> list[dict]:
    """Aggregate pg_stat_activity samples into (backend_type, state, wait) -> samples."""
    counts: dict[tuple, int] = {}
    peak: dict[tuple, int] = {}
    total = 0
    for sample in samples:
        here: dict[tuple, int] = {}
        for backend in sample:
            key = (backend.get("backend_type") or "", backend.get("state") or "",
                   backend.get("wait_event_type") or "CPU", backend.get("wait_event") or "running")
            here[key] = here.get(key, 0) + 1
        for key, count in here.items():
            counts[key] = counts.get(key, 0) + count
            peak[key] = max(peak.get(key, 0), count)
            total += count
    rows = [{"backend_type": k[0], "state": k[1], "wait_event_type": k[2], "wait_event": k[3],
             "samples": n, "backends_max": peak[k], "share_pct": 100.0 * n / total if total else 0.0}
            for k, n in counts.items()]
    rows.sort(key=lambda row: -row["samples"])
    return rows


def blocking_rows(samples: list[list[dict]], interval_s: float) -> list[dict]:
    pairs: dict[tuple, dict] = {}
    for sample in samples:
        for backend in sample:
            for blocker in backend.get("blocking_pids") or ():
                key = (backend["pid"], blocker)
                entry = pairs.setdefault(key, {"blocked_pid": backend["pid"], "blocking_pid": blocker,
                                               "blocked_queryid": backend.get("query_id"),
                                               "wait_event": backend.get("wait_event"), "samples": 0})
                entry["samples"] += 1
    rows = list(pairs.values())
    for row in rows:
        row["seconds_observed"] = row["samples"] * interval_s
    rows.sort(key=lambda row: -row["samples"])
    return rows


def _column_name(node) -> str | None:
    # pglast on first use (70 ms to import here): only plans with a Filter need it.
    from pglast import ast

    while isinstance(node, ast.TypeCast):
        node = node.arg
    if isinstance(node, ast.ColumnRef):
        names = [f.sval for f in node.fields if isinstance(f, ast.String)]
        return names[-1] if names else None
    return None


def _is_value(node) -> bool:
    from pglast import ast

    while isinstance(node, ast.TypeCast):
        node = node.arg
    return isinstance(node, (ast.ParamRef, ast.A_Const)) or (
        isinstance(node, (list, tuple)) and all(_is_value(item) for item in node))


def filter_columns(filter_text: str) -> tuple[list[str], list[str]]:
    """(equality columns, range columns) compared with a value in a plan's Filter expression."""
    from pglast import ast, parse_sql

    try:
        where = parse_sql(f"SELECT 1 WHERE {filter_text}")[0].stmt.whereClause
    except Exception:
        return [], []
    from pglast.enums.parsenodes import A_Expr_Kind
    from pglast.enums.primnodes import BoolExprType

    equality, ranges = [], []

    def add(target: list[str], column: str) -> None:
        if column not in target:
            target.append(column)

    def visit(node) -> None:
        if isinstance(node, ast.BoolExpr):
            # Only conjunctions: an index on one branch of an OR rarely replaces the scan.
            if node.boolop == BoolExprType.AND_EXPR:
                for argument in node.args:
                    visit(argument)
            return
        if not isinstance(node, ast.A_Expr):
            return
        operator = node.name[-1].sval if node.name else ""
        for column_side, value_side in ((node.lexpr, node.rexpr), (node.rexpr, node.lexpr)):
            column = _column_name(column_side)
            if not column or not _is_value(value_side):
                continue
            if node.kind == A_Expr_Kind.AEXPR_IN or (
                    node.kind in (A_Expr_Kind.AEXPR_OP, A_Expr_Kind.AEXPR_OP_ANY) and operator == "="):
                add(equality, column)
            elif node.kind == A_Expr_Kind.AEXPR_OP and operator in ("<", ">", "<=", ">="):
                add(ranges, column)
            elif node.kind in (A_Expr_Kind.AEXPR_BETWEEN, A_Expr_Kind.AEXPR_NOT_BETWEEN):
                add(ranges, column)
            break

    visit(where)
    return equality, [c for c in ranges if c not in equality]


def seq_scan_filters(plan: dict | list) -> list[dict]:
    """Seq Scan nodes with a Filter in an EXPLAIN (FORMAT JSON) plan."""
    found = []

    def walk(node: dict) -> None:
        if node.get("Node Type") == "Seq Scan" and node.get("Filter"):
            found.append({"schema": node.get("Schema"), "table": node.get("Relation Name"),
                          "filter": node["Filter"], "rows": node.get("Plan Rows")})
        for child in node.get("Plans", ()):
            walk(child)

    roots = plan if isinstance(plan, list) else [plan]
    for root in roots:
        walk(root.get("Plan", root))
    return found


def plan_total_cost(plan: dict | list) -> float:
    root = plan[0] if isinstance(plan, list) else plan
    return float(root.get("Plan", root)["Total Cost"])


def quote_identifier(name: str) -> str:
    if re.fullmatch(r"[a-z_][a-z0-9_$]*", name):
        return name
    return '"' + name.replace('"', '""') + '"'


def index_statement(schema: str, table: str, columns: list[str]) -> str:
    name = "_".join([table, *columns, "idx"])[:63]
    return (f"CREATE INDEX CONCURRENTLY {quote_identifier(name)} ON "
            f"{quote_identifier(schema)}.{quote_identifier(table)} "
            f"({', '.join(quote_identifier(c) for c in columns)});")


def advice_findings(advice: list[dict]) -> list[dict]:
    rows = []
    for item in advice:
        subject = f"{item['schema']}.{item['table']} ({', '.join(item['columns'])})"
        if item["confirmed"]:
            message = (f"sequential scans of {item['schema']}.{item['table']} filter on "
                       f"{', '.join(item['columns'])} ({item['calls']} calls in the window of `{item['query'][:120]}`); "
                       f"a hypothetical index cuts the estimated cost {item['cost_before']:.0f} -> "
                       f"{item['cost_after']:.1f} ({item['cost_reduction_pct']:.0f}% cheaper), "
                       f"index about {item['index_size_bytes'] / 1e6:.1f} MB")
        else:
            message = (f"sequential scans of {item['schema']}.{item['table']} filter on "
                       f"{', '.join(item['columns'])} ({item['calls']} calls of `{item['query'][:120]}`); "
                       f"not confirmed: {item.get('reason') or 'hypopg not available'}")
        rows.append(finding("postgres", "warning", subject, message, item["statement"]))
    return rows


# -- the probe -----------------------------------------------------------------------------------
HAS_STATEMENTS = "SELECT count(*) FROM pg_extension WHERE extname = 'pg_stat_statements'"
STATEMENTS_INFO = "SELECT dealloc, stats_reset::text FROM pg_stat_statements_info"
SNAPSHOT_STATEMENTS = """
SELECT s.userid::bigint AS userid, s.dbid::bigint AS dbid, s.queryid, s.toplevel, d.datname,
       s.query, s.calls, s.total_exec_time, s.total_plan_time, s.rows, s.shared_blks_hit,
       s.shared_blks_read, s.temp_blks_read, s.temp_blks_written, s.wal_records,
       s.wal_bytes::bigint AS wal_bytes
FROM pg_stat_statements s LEFT JOIN pg_database d ON d.oid = s.dbid
"""
SNAPSHOT_TABLES = """
SELECT relid::bigint AS relid, schemaname, relname, coalesce(seq_scan, 0) AS seq_scan,
       coalesce(seq_tup_read, 0) AS seq_tup_read, coalesce(idx_scan, 0) AS idx_scan,
       coalesce(idx_tup_fetch, 0) AS idx_tup_fetch, n_live_tup, n_dead_tup,
       pg_table_size(relid) AS size_bytes
FROM pg_stat_user_tables
"""
UNUSED_INDEXES = """
SELECT s.schemaname, s.relname, s.indexrelname, pg_relation_size(s.indexrelid) AS size_bytes,
       s.idx_scan, (SELECT stats_reset::text FROM pg_stat_database WHERE datname = current_database())
       AS stats_since
FROM pg_stat_user_indexes s JOIN pg_index i ON i.indexrelid = s.indexrelid
WHERE s.idx_scan = 0 AND NOT i.indisunique AND NOT i.indisprimary AND NOT i.indisexclusion
ORDER BY pg_relation_size(s.indexrelid) DESC
"""
ACTIVITY = """
SELECT pid, backend_type, state, wait_event_type, wait_event, query_id,
       pg_blocking_pids(pid) AS blocking_pids
FROM pg_stat_activity WHERE pid <> pg_backend_pid()
  AND state IS DISTINCT FROM 'idle' AND wait_event_type IS DISTINCT FROM 'Activity'
"""
LEADING_INDEX_COLUMNS = """
SELECT n.nspname AS schema, c.relname AS table, a.attname AS column
FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
"""


class PostgresProbe(ProbeBase):
    name = "postgres"
    schema = PG_STATEMENTS_SCHEMA
    extra_schemas = {
        "pg_tables": PG_TABLES_SCHEMA, "pg_unused_indexes": PG_UNUSED_INDEXES_SCHEMA,
        "pg_waits": PG_WAITS_SCHEMA, "pg_blocking": PG_BLOCKING_SCHEMA,
        "pg_settings": PG_SETTINGS_SCHEMA, "pg_index_advice": PG_INDEX_ADVICE_SCHEMA,
    }
    description = "PostgreSQL: pg_stat_statements deltas, waits, table/index usage, index advice (asyncpg)"
    default_enabled = True
    finish_grace_s = 30.0

    def __init__(self, config=None):
        super().__init__(config)
        self._dsn: str | None = None
        self._start: dict | None = None

    def check(self) -> None:
        dsn = read_dsn(self.option("pg_dsn"), self.option("pg_dsn_file"))
        if not dsn:
            raise Unavailable("needs --pg-dsn or --pg-dsn-file")
        try:
            import asyncpg  # noqa: F401
        except ImportError:
            raise Unavailable("asyncpg not installed: pip install asyncpg (make setup)") from None
        self._dsn = dsn

    # asyncpg is asyncio-only; the runner calls prepare/collect from plain threads, so each
    # phase runs its own short event loop and connection.
    def _connect(self):
        import asyncpg

        async def connect():
            try:
                return await asyncpg.connect(self._dsn, timeout=CONNECT_TIMEOUT_S,
                                             server_settings={"application_name": "guardian-agent"})
            # A refused login or an unknown database is the DSN the user gave (bad input, before the
            # window); a server that is down is a probe that cannot run now (unavailable).
            except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError) as error:
                raise BadInput(f"--pg-dsn: authentication failed at {dsn_target(self._dsn)}: "
                               f"{scrub(str(error), self._dsn)}") from None
            except asyncpg.InvalidCatalogNameError as error:
                raise BadInput(f"--pg-dsn: {scrub(str(error), self._dsn)} (check the database in --pg-dsn)") from None
            except (OSError, asyncio.TimeoutError) as error:
                why = "connection refused" if isinstance(error, ConnectionRefusedError) else \
                    ("timed out" if isinstance(error, asyncio.TimeoutError) else scrub(str(error), self._dsn))
                raise Unavailable(f"cannot connect to {dsn_target(self._dsn)}: {why} "
                                  "(is PostgreSQL running? check --pg-dsn)") from None
            except asyncpg.PostgresError as error:
                raise Unavailable(f"connection failed: {scrub(str(error), self._dsn)}") from None
            except ValueError as error:  # malformed DSN
                raise Unavailable(f"bad --pg-dsn: {scrub(str(error), self._dsn)}") from None

        return connect()

    async def _snapshot(self, connection) -> dict:
        has_statements = await connection.fetchval(HAS_STATEMENTS)
        if not has_statements:
            raise Unavailable("pg_stat_statements is not installed in this database: add it to "
                              "shared_preload_libraries, restart, then CREATE EXTENSION pg_stat_statements")
        try:
            statements = [dict(r) for r in await connection.fetch(SNAPSHOT_STATEMENTS)]
            info = dict(await connection.fetchrow(STATEMENTS_INFO))
        except Exception as error:
            raise Unavailable(f"pg_stat_statements unreadable: {scrub(str(error), self._dsn)} "
                              "(grant pg_read_all_stats to the audit role)") from None
        tables = [dict(r) for r in await connection.fetch(SNAPSHOT_TABLES)]
        return {"statements": statements, "info": info, "tables": tables, "at": time.monotonic()}

    def prepare(self) -> None:
        async def run():
            connection = await self._connect()
            try:
                return await self._snapshot(connection)
            finally:
                await connection.close()

        self._start = asyncio.run(run())

    def collect(self, window: Window) -> dict[str, pa.Table]:
        if self._start is None:
            self.prepare()
        return asyncio.run(self._collect(window))

    async def _collect(self, window: Window) -> dict[str, pa.Table]:
        connection = await self._connect()
        try:
            samples: list[list[dict]] = []
            while True:
                try:
                    rows = await connection.fetch(ACTIVITY)
                    samples.append([dict(r) for r in rows])
                except Exception:
                    pass  # one failed sample is not worth failing the probe
                if window.wait(SAMPLE_INTERVAL_S):
                    break
            end = await self._snapshot(connection)
            settings = [dict(r) for r in await connection.fetch(
                "SELECT name, setting, unit, source FROM pg_settings WHERE name = ANY($1::text[])",
                list(LATENCY_SETTINGS))]
            unused = [dict(r) for r in await connection.fetch(UNUSED_INDEXES)]
            statements = [row for row in statement_delta_rows(self._start["statements"], end["statements"],
                                                              _fingerprint)
                          if row["fingerprint"] not in _own_fingerprints()]
            tables = table_delta_rows(self._start["tables"], end["tables"])
            database = await connection.fetchval("SELECT current_database()")
            advice = await self._index_advice(connection, statements, tables, database)
        finally:
            await connection.close()

        findings = advice_findings(advice)
        dealloc = int(end["info"]["dealloc"] or 0) - int(self._start["info"]["dealloc"] or 0)
        if dealloc > 0:
            findings.append(finding("postgres", "warning", "pg_stat_statements",
                                    f"{dealloc} entries were evicted during the window: deltas miss them",
                                    "raise pg_stat_statements.max (restart needed)"))
        for setting in settings:
            if setting["name"] == "jit" and setting["setting"] == "on":
                findings.append(finding("postgres", "info", "jit", "JIT compilation is on: it can add "
                                        "milliseconds to the first executions of costly OLTP plans",
                                        "ALTER SYSTEM SET jit = off; SELECT pg_reload_conf();"))
        for table in tables:
            if table["dead_pct"] >= 20 and table["dead_tuples"] >= 10000:
                findings.append(finding("postgres", "info", f"{table['schema']}.{table['table']}",
                                        f"{table['dead_pct']:.0f}% dead tuples ({table['dead_tuples']:,})",
                                        f"VACUUM (ANALYZE) {quote_identifier(table['schema'])}."
                                        f"{quote_identifier(table['table'])}; check autovacuum settings"))
        for index in unused[:10]:
            if index["size_bytes"] >= 1 << 20:
                findings.append(finding("postgres", "info", f"{index['schemaname']}.{index['indexrelname']}",
                                        f"index never used since statistics reset ({index['stats_since'] or 'cluster start'}),"
                                        f" {index['size_bytes'] / 1e6:.1f} MB slowing every write",
                                        f"check replicas, then DROP INDEX CONCURRENTLY "
                                        f"{quote_identifier(index['schemaname'])}.{quote_identifier(index['indexrelname'])};"))
        unused_rows = [{"schema": r["schemaname"], "table": r["relname"], "index": r["indexrelname"],
                        "size_bytes": r["size_bytes"], "idx_scan": r["idx_scan"], "stats_since": r["stats_since"]}
                       for r in unused]
        return {
            "postgres": rows_to_table(statements, PG_STATEMENTS_SCHEMA),
            "pg_tables": rows_to_table(tables, PG_TABLES_SCHEMA),
            "pg_unused_indexes": rows_to_table(unused_rows, PG_UNUSED_INDEXES_SCHEMA),
            "pg_waits": rows_to_table(wait_rows(samples), PG_WAITS_SCHEMA),
            "pg_blocking": rows_to_table(blocking_rows(samples, SAMPLE_INTERVAL_S), PG_BLOCKING_SCHEMA),
            "pg_settings": rows_to_table(settings, PG_SETTINGS_SCHEMA),
            "pg_index_advice": rows_to_table(advice, PG_INDEX_ADVICE_SCHEMA),
            "findings": findings_table(findings),
        }

    async def _index_advice(self, connection, statements, tables, database) -> list[dict]:
        candidates = {(t["schema"], t["table"]) for t in tables
                      if t["seq_scan"] > 0 and t["live_tuples"] >= MIN_TABLE_ROWS
                      and (t["rows_per_seq_scan"] or 0) >= MIN_ROWS_PER_SEQ_SCAN}
        if not candidates:
            return []
        indexed = {(r["schema"], r["table"], r["column"]) for r in await connection.fetch(LEADING_INDEX_COLUMNS)}
        hypopg = await connection.fetchval("SELECT count(*) FROM pg_extension WHERE extname = 'hypopg'")
        hypopg_available = hypopg or await connection.fetchval(
            "SELECT count(*) FROM pg_available_extensions WHERE name = 'hypopg'")
        advice: dict[tuple, dict] = {}
        explained = 0
        deadline = time.monotonic() + ADVICE_BUDGET_S
        for statement in statements:
            if explained >= MAX_STATEMENTS_EXPLAINED or time.monotonic() > deadline:
                break
            if statement["database"] != database:
                continue
            query = statement["query"]
            if not re.match(r"\s*(SELECT|UPDATE|DELETE|WITH)\b", query, re.I):
                continue
            explained += 1
            found = await self._explain_candidates(connection, query, candidates, indexed,
                                                   bool(hypopg), bool(hypopg_available))
            for item in found:
                key = (item["schema"], item["table"], tuple(item["columns"]))
                item.update(fingerprint=statement["fingerprint"], query=query, calls=statement["calls"])
                if key not in advice or (item["confirmed"] and not advice[key]["confirmed"]):
                    advice[key] = item
        return sorted(advice.values(), key=lambda a: (not a["confirmed"], -a["calls"]))

    async def _explain_candidates(self, connection, query, candidates, indexed, hypopg_created,
                                  hypopg_available) -> list[dict]:
        parameters = max((int(n) for n in re.findall(r"\$(\d+)", query)), default=0)
        arguments = f"({', '.join(['NULL'] * parameters)})" if parameters else ""
        explain = f"EXPLAIN (FORMAT JSON, VERBOSE) EXECUTE guardian_advice{arguments}"
        results = []
        transaction = connection.transaction()
        await transaction.start()
        try:
            await connection.execute("SET LOCAL statement_timeout = '5s'; "
                                     "SET LOCAL plan_cache_mode = force_generic_plan")
            hypopg_ready = hypopg_created
            if not hypopg_ready and hypopg_available:
                try:
                    await connection.execute("SAVEPOINT guardian_hypopg; CREATE EXTENSION hypopg; "
                                             "RELEASE SAVEPOINT guardian_hypopg")
                    hypopg_ready = True
                except Exception:
                    await connection.execute("ROLLBACK TO SAVEPOINT guardian_hypopg")
            try:
                # PREPARE only plans: the statement is never executed (no ANALYZE anywhere).
                await connection.execute(f"PREPARE guardian_advice AS {query}")
                plan = json.loads(await connection.fetchval(explain))
            except Exception:
                return []  # not plannable here (privileges, unknown parameter types...)
            cost_before = plan_total_cost(plan)
            for scan in seq_scan_filters(plan):
                if (scan["schema"], scan["table"]) not in candidates:
                    continue
                equality, ranges = filter_columns(scan["filter"])
                columns = equality + ranges[:1]
                if not columns or (scan["schema"], scan["table"], columns[0]) in indexed:
                    continue
                item = {"schema": scan["schema"], "table": scan["table"], "columns": columns,
                        "cost_before": cost_before, "cost_after": None, "cost_reduction_pct": None,
                        "index_size_bytes": None, "confirmed": False,
                        "statement": index_statement(scan["schema"], scan["table"], columns),
                        "reason": "hypopg not available (apt-get install postgresql-NN-hypopg)"}
                if hypopg_ready:
                    definition = (f"CREATE INDEX ON {quote_identifier(scan['schema'])}."
                                  f"{quote_identifier(scan['table'])} "
                                  f"({', '.join(quote_identifier(c) for c in columns)})")
                    await connection.execute("SAVEPOINT guardian_hypothetical")
                    try:
                        index_oid = await connection.fetchval(
                            "SELECT indexrelid FROM hypopg_create_index($1)", definition)
                        # The generic plan is cached with the statement and hypopg does not
                        # invalidate it: prepare again to let the planner see the new index.
                        await connection.execute(f"DEALLOCATE guardian_advice; PREPARE guardian_advice AS {query}")
                        after = json.loads(await connection.fetchval(explain))
                        size = await connection.fetchval("SELECT hypopg_relation_size($1)", index_oid)
                        await connection.execute("SELECT hypopg_reset()")
                        cost_after = plan_total_cost(after)
                        reduction = 1.0 - cost_after / cost_before if cost_before > 0 else 0.0
                        item.update(cost_after=cost_after, cost_reduction_pct=100.0 * reduction,
                                    index_size_bytes=int(size or 0),
                                    confirmed=reduction >= MIN_COST_REDUCTION,
                                    reason="" if reduction >= MIN_COST_REDUCTION else
                                    f"a hypothetical index is only {100 * reduction:.0f}% cheaper")
                    except Exception as error:
                        await connection.execute("ROLLBACK TO SAVEPOINT guardian_hypothetical")
                        item["reason"] = f"hypopg failed: {scrub(str(error), self._dsn)[:200]}"
                if item["confirmed"] or not hypopg_ready:
                    results.append(item)
            return results
        finally:
            await transaction.rollback()
            try:
                # Prepared statements outlive a rollback; asyncpg's own ones must stay.
                await connection.execute("DEALLOCATE guardian_advice")
            except Exception:
                pass

    @staticmethod
    def headlines(tables: dict[str, pa.Table]) -> list[str]:
        lines = []
        statements = tables.get("postgres")
        if statements is not None and statements.num_rows:
            top = statements.slice(0, 1).to_pylist()[0]
            lines.append(f"postgres: {statements.num_rows} statements ran; top {top['total_ms']:.1f} ms "
                         f"in {top['calls']} calls (mean {top['mean_ms']:.3f} ms): {top['query'][:80]}")
        advice = tables.get("pg_index_advice")
        if advice is not None:
            for row in advice.to_pylist()[:3]:
                lines.append(f"postgres: {row['statement']}")
        return lines


_OWN: set[str] = set()


def _own_fingerprints() -> set[str]:
    """The probe's own statements that run inside the window, left out of the deltas."""
    if not _OWN:
        for text in (HAS_STATEMENTS, STATEMENTS_INFO, SNAPSHOT_STATEMENTS, SNAPSHOT_TABLES, ACTIVITY):
            _OWN.add(_fingerprint(text)[0])
    return _OWN


def _fingerprint(query: str) -> tuple[str | None, str]:
    """Same fingerprint as the pg-log command, so both sources join on it."""
    from probes.pglog.fingerprint import fingerprint_statement

    fingerprint, normalised, _ = fingerprint_statement(query)
    return fingerprint, normalised

