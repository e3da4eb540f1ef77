"""The postgres probe's pure functions on recorded snapshots and plans (no server needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from probes.postgres import (PG_INDEX_ADVICE_SCHEMA, PG_STATEMENTS_SCHEMA, PostgresProbe, advice_findings,
                             blocking_rows, dsn_target, filter_columns, index_statement, plan_total_cost,
                             redact_dsn, scrub, seq_scan_filters, statement_delta_rows, table_delta_rows,
                             wait_rows)
from probes.base import ProbeConfig, rows_to_table

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "pglog"


def statement(queryid, calls, total, query="SELECT * FROM t WHERE a = $1", **extra):
    row = {"userid": 10, "dbid": 5, "queryid": queryid, "toplevel": True, "datname": "trading", "query": query,
           "calls": calls, "total_exec_time": total, "total_plan_time": 0.0, "rows": calls,
           "shared_blks_hit": 10 * calls, "shared_blks_read": calls, "temp_blks_read": 0,
           "temp_blks_written": 0, "wal_records": 0, "wal_bytes": 0}
    row.update(extra)
    return row


def test_statement_deltas_only_what_ran_in_the_window():
    from probes.pglog.fingerprint import fingerprint_statement

    start = [statement(1, 100, 50.0), statement(2, 7, 3.0, query="SELECT 1")]
    end = [statement(1, 130, 80.5), statement(2, 7, 3.0, query="SELECT 1"),
           statement(3, 4, 2.0, query="UPDATE t SET b = $1 WHERE a = $2", wal_bytes=4096)]
    rows = statement_delta_rows(start, end, lambda q: fingerprint_statement(q)[:2])
    assert [(r["queryid"], r["calls"], r["total_ms"], r["new_in_window"]) for r in rows] == [
        (1, 30, 30.5, False), (3, 4, 2.0, True)]
    assert rows[0]["mean_ms"] == pytest.approx(30.5 / 30)
    assert rows[0]["shared_blks_hit"] == 300 and rows[1]["wal_bytes"] == 4096
    # The probe's fingerprint is the log's: SELECT ... a = 5 in a log joins this row.
    assert rows[0]["fingerprint"] == fingerprint_statement("SELECT * FROM t WHERE a = 5")[0]
    assert rows_to_table(rows, PG_STATEMENTS_SCHEMA).num_rows == 2


def test_table_deltas():
    start = [{"relid": 1, "schemaname": "public", "relname": "orders", "seq_scan": 10, "seq_tup_read": 1000,
              "idx_scan": 5, "idx_tup_fetch": 5, "n_live_tup": 100000, "n_dead_tup": 0, "size_bytes": 1}]
    end = [{**start[0], "seq_scan": 14, "seq_tup_read": 401000, "n_dead_tup": 25000}]
    row = table_delta_rows(start, end)[0]
    assert row["seq_scan"] == 4 and row["rows_per_seq_scan"] == 100000
    assert row["dead_pct"] == pytest.approx(20.0)


def test_waits_and_blocking_aggregation():
    samples = [
        [{"pid": 1, "backend_type": "client backend", "state": "active", "wait_event_type": None,
          "wait_event": None, "blocking_pids": []},
         {"pid": 2, "backend_type": "client backend", "state": "active", "wait_event_type": "Lock",
          "wait_event": "transactionid", "blocking_pids": [1], "query_id": 99}],
        [{"pid": 2, "backend_type": "client backend", "state": "active", "wait_event_type": "Lock",
          "wait_event": "transactionid", "blocking_pids": [1], "query_id": 99}],
    ]
    waits = wait_rows(samples)
    assert waits[0]["wait_event"] == "transactionid" and waits[0]["samples"] == 2
    assert {(w["wait_event_type"], w["wait_event"]) for w in waits} == {("Lock", "transactionid"), ("CPU", "running")}
    assert sum(w["share_pct"] for w in waits) == pytest.approx(100.0)
    blocking = blocking_rows(samples, 0.5)
    assert blocking == [{"blocked_pid": 2, "blocking_pid": 1, "blocked_queryid": 99,
                         "wait_event": "transactionid", "samples": 2, "seconds_observed": 1.0}]


@pytest.mark.parametrize("filter_text, equality, ranges", [
    ("(orders.account_id = $1)", ["account_id"], []),
    ("((o.account_id = $1) AND ((o.status)::text = ANY ($2)) AND (o.created_at >= $3))",
     ["account_id", "status"], ["created_at"]),
    ("((account_id = 5) OR (status = 'x'::text))", [], []),
    ("(lower(name) = $1)", [], []),
    ("(qty > 10)", [], ["qty"]),
])
def test_filter_columns(filter_text, equality, ranges):
    assert filter_columns(filter_text) == (equality, ranges)


def test_seq_scan_filters_from_recorded_plan():
    plan = json.loads("""[{"Plan": {"Node Type": "Aggregate", "Total Cost": 4206.0, "Plans": [
        {"Node Type": "Seq Scan", "Relation Name": "orders", "Schema": "public", "Total Cost": 4200.0,
         "Filter": "(orders.account_id = $1)", "Plan Rows": 40},
        {"Node Type": "Index Scan", "Relation Name": "accounts", "Schema": "public", "Total Cost": 8.3}]}}]""")
    assert seq_scan_filters(plan) == [{"schema": "public", "table": "orders", "filter": "(orders.account_id = $1)",
                                       "rows": 40}]
    assert plan_total_cost(plan) == 4206.0


def test_index_statement_quotes_when_needed():
    assert index_statement("public", "orders", ["account_id"]) == \
        "CREATE INDEX CONCURRENTLY orders_account_id_idx ON public.orders (account_id);"
    assert index_statement("Sales", "Order Lines", ["accountId", "day"]) == \
        'CREATE INDEX CONCURRENTLY "Order Lines_accountId_day_idx" ON "Sales"."Order Lines" ("accountId", day);'


def test_advice_findings_name_table_column_and_statement():
    advice = [{"schema": "public", "table": "orders", "columns": ["account_id"], "fingerprint": "ab",
               "query": "SELECT * FROM orders WHERE account_id = $1", "calls": 12, "cost_before": 4000.0,
               "cost_after": 12.5, "cost_reduction_pct": 99.7, "index_size_bytes": 2_200_000, "confirmed": True,
               "statement": index_statement("public", "orders", ["account_id"])},
              {"schema": "public", "table": "fills", "columns": ["venue"], "fingerprint": "cd",
               "query": "SELECT count(*) FROM fills WHERE venue = $1", "calls": 3, "cost_before": 900.0,
               "cost_after": None, "cost_reduction_pct": None, "index_size_bytes": None, "confirmed": False,
               "statement": index_statement("public", "fills", ["venue"]), "reason": "hypopg not available"}]
    findings = advice_findings(advice)
    assert findings[0]["subject"] == "public.orders (account_id)"
    assert "4000 -> 12.5" in findings[0]["message"] and "2.2 MB" in findings[0]["message"]
    assert findings[0]["recommendation"].startswith("CREATE INDEX CONCURRENTLY orders_account_id_idx")
    assert "not confirmed: hypopg not available" in findings[1]["message"]
    assert rows_to_table(advice, PG_INDEX_ADVICE_SCHEMA).num_rows == 2


@pytest.mark.parametrize("dsn, password", [
    ("postgresql://audit:Sup3r%s3cret@db.local:6432/trading", "Sup3r%s3cret"),
    ("host=db.local port=6432 user=audit password=Sup3rs3cret dbname=trading", "Sup3rs3cret"),
    ("host=db.local user=audit password='with space' dbname=trading", "with space"),
])
def test_dsn_password_is_scrubbed(dsn, password):
    assert password not in redact_dsn(dsn)
    message = f"could not connect using {dsn}: password {password} rejected"
    assert password not in scrub(message, dsn)
    assert dsn_target(dsn).startswith("db.local:") and password not in dsn_target(dsn)


def test_probe_without_dsn_is_unavailable_with_the_action():
    from core.errors import Unavailable

    with pytest.raises(Unavailable, match=r"needs --pg-dsn or --pg-dsn-file"):
        PostgresProbe(ProbeConfig(options={})).check()
    assert PostgresProbe.default_enabled is True
    assert set(PostgresProbe.extra_schemas) == {"pg_tables", "pg_unused_indexes", "pg_waits", "pg_blocking",
                                                "pg_settings", "pg_index_advice"}
