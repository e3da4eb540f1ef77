"""Live PostgreSQL tests: one throwaway server for the module (initdb in a temp dir, loopback
port, pg_stat_statements, every statement logged to stderr + csvlog + jsonlog at once), real
pgbench, a workload with a deliberately missing index, the pg-log command and the postgres probe."""

from __future__ import annotations

import os
import threading
import time

import pytest

from tests.pg_server import AUDITOR_PASSWORD, AUDITOR_ROLE, PgServer, free_loopback_port, postgres_available

pytestmark = pytest.mark.live

ORDERS_ROWS = 100_000
WORKLOAD_SQL = "\\set a random(1, 5000)\nSELECT id, amount FROM orders WHERE account_id = :a;\n"


@pytest.fixture(scope="module")
def pg():
    reason = postgres_available()
    if reason:
        pytest.skip(f"LIVE TEST SKIPPED: {reason}")
    server = PgServer(statement_logging=True)
    server.start()
    try:
        server.pgbench("-i", "-s", "1", "-q")
        # Simple protocol (literals in the log), prepared and extended (execute + DETAIL forms).
        server.pgbench("-c", "2", "-j", "1", "-t", "150")
        server.pgbench("-c", "2", "-j", "1", "-t", "150", "-M", "prepared")
        server.pgbench("-c", "1", "-t", "100", "-M", "extended")
        server.psql("SELECT aid,\n       abalance\n  FROM pgbench_accounts\n WHERE aid = 17")
        server.psql(f"""
            CREATE TABLE orders (id bigserial PRIMARY KEY, account_id int NOT NULL,
                                 amount numeric NOT NULL, note text);
            INSERT INTO orders (account_id, amount, note)
                SELECT (i * 7919) % 5000, (i % 1000) / 10.0, 'n' FROM generate_series(1, {ORDERS_ROWS}) i;
            CREATE INDEX orders_amount_idx ON orders (amount);
            ANALYZE orders;""")
        script = server.base_dir / "orders_workload.sql"
        script.write_text(WORKLOAD_SQL)
        os.chmod(script, 0o644)
        server.workload_script = script
        yield server
    finally:
        server.stop()


def run_workload(server: PgServer, seconds: float) -> threading.Thread:
    thread = threading.Thread(target=server.pgbench, args=("-n", "-f", str(server.workload_script), "-T",
                                                           str(seconds), "-c", "1", "-M", "prepared"))
    thread.start()
    return thread


def test_pg_log_formats_agree_on_live_logs(pg, tmp_path, agent_cli):
    from reports.bundle import Bundle

    pg.mark_logs()
    copies = {}
    for log_format, path in pg.log_paths().items():
        copies[log_format] = tmp_path / path.name
        copies[log_format].write_bytes(path.read_bytes())
    results = {}
    for log_format, path in copies.items():
        out = tmp_path / f"bundle-{log_format}"
        result = agent_cli("pg-log", str(path), "--out", str(out))
        assert result.returncode == 0, result.stderr
        bundle = Bundle(out)
        assert bundle.manifest["pg_log"]["files"][0]["format"] == log_format
        queries = bundle.table("pg_queries").to_pylist()
        results[log_format] = {r["fingerprint"]: (r["calls"], round(r["total_ms"], 3)) for r in queries}
        assert bundle.table("pg_log_errors").num_rows == 0, bundle.table("pg_log_errors").to_pylist()
    assert results["stderr"] == results["csv"] == results["json"]
    by_query = {r["query"]: r for r in Bundle(tmp_path / "bundle-stderr").table("pg_queries").to_pylist()}
    # 150 simple + 150 prepared + 100 extended transactions per client: one fingerprint.
    assert by_query["UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;"]["calls"] == 2 * 150 * 2 + 100
    multi_line = [r for q, r in by_query.items() if q.startswith("SELECT aid, abalance FROM pgbench_accounts")]
    assert multi_line and multi_line[0]["calls"] == 1


def test_log_fingerprints_join_pg_stat_statements(pg, tmp_path):
    from probes.pglog import analyse_logs
    from probes.pglog.fingerprint import fingerprint_statement

    pg.mark_logs()
    logged = {r["fingerprint"]: r for r in analyse_logs([pg.log_paths()["csv"]]).queries.to_pylist()}
    tracked = pg.psql("SELECT query FROM pg_stat_statements WHERE query LIKE '%pgbench_accounts SET%'").splitlines()
    assert tracked
    for text in tracked:
        assert fingerprint_statement(text)[0] in logged


def _probe(options: dict):
    from probes.base import ProbeConfig
    from probes.postgres import PostgresProbe

    return PostgresProbe(ProbeConfig(options=options))


def test_probe_finds_missing_index_confirmed_by_hypopg(pg, tmp_path):
    from probes.base import Window

    probe = _probe({"pg_dsn": pg.dsn()})
    probe.check()
    probe.prepare()
    worker = run_workload(pg, 2)
    try:
        tables = probe.collect(Window(2.5, tmp_path))
    finally:
        worker.join()
    statements = {r["query"]: r for r in tables["postgres"].to_pylist()}
    orders = statements["SELECT id, amount FROM orders WHERE account_id = $1"]
    assert orders["calls"] >= 3 and orders["total_ms"] > 0 and orders["fingerprint"]
    table_rows = {r["table"]: r for r in tables["pg_tables"].to_pylist()}
    assert table_rows["orders"]["seq_scan"] >= orders["calls"]
    advice = tables["pg_index_advice"].to_pylist()
    assert [(a["table"], a["columns"]) for a in advice] == [("orders", ["account_id"])]
    assert advice[0]["confirmed"] and advice[0]["cost_reduction_pct"] >= 50
    assert advice[0]["index_size_bytes"] > 0
    assert advice[0]["statement"] == "CREATE INDEX CONCURRENTLY orders_account_id_idx ON public.orders (account_id);"
    findings = tables["findings"].to_pylist()
    assert any(f["severity"] == "warning" and f["recommendation"] == advice[0]["statement"] for f in findings)
    assert any("orders_amount_idx" in f["subject"] for f in findings)  # unused index reported
    # Advice left nothing behind: no hypopg extension, no prepared statement, no real index.
    assert pg.psql("SELECT count(*) FROM pg_extension WHERE extname = 'hypopg'") == "0"
    assert pg.psql("SELECT count(*) FROM pg_indexes WHERE tablename = 'orders'") == "2"
    settings = {r["name"] for r in tables["pg_settings"].to_pylist()}
    assert {"shared_buffers", "synchronous_commit", "jit"} <= settings
    assert tables["pg_waits"].num_rows >= 1


def test_probe_unavailable_reasons_never_leak_password(pg):
    from core.errors import Unavailable

    with pytest.raises(Unavailable, match="needs --pg-dsn or --pg-dsn-file"):
        _probe({}).check()
    wrong = pg.dsn(AUDITOR_ROLE, password="wrong-" + AUDITOR_PASSWORD)
    refused = f"postgresql://{AUDITOR_ROLE}:{AUDITOR_PASSWORD}@127.0.0.1:{free_loopback_port()}/postgres"
    pg.psql("DROP DATABASE IF EXISTS plain; CREATE DATABASE plain")
    missing = pg.dsn(AUDITOR_ROLE, database="plain", password=AUDITOR_PASSWORD)
    from core.errors import BadInput

    for dsn, reason, error in ((wrong, "authentication failed", BadInput), (refused, "connection refused", Unavailable),
                               (missing, "pg_stat_statements is not installed", Unavailable)):
        probe = _probe({"pg_dsn": dsn})
        probe.check()
        with pytest.raises(error) as caught:
            probe.prepare()
        assert reason in str(caught.value)
        assert AUDITOR_PASSWORD not in str(caught.value)


def test_audit_with_dsn_file_end_to_end(pg, tmp_path, agent_cli):
    from reports.bundle import Bundle

    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(pg.dsn(AUDITOR_ROLE, password=AUDITOR_PASSWORD))
    dsn_file.chmod(0o600)
    out = tmp_path / "audit"
    worker = run_workload(pg, 2)
    try:
        result = agent_cli("audit", "--probes", "postgres", "--duration", "2", "--pg-dsn-file", str(dsn_file),
                           "--out", str(out))
    finally:
        worker.join()
    assert result.returncode == 0, result.stderr
    bundle = Bundle(out)
    assert bundle.probe("postgres")["status"] == "ok", bundle.probe("postgres")
    statements = bundle.table("postgres").to_pylist()
    assert any(r["query"] == "SELECT id, amount FROM orders WHERE account_id = $1" for r in statements)
    everything = b"".join(p.read_bytes() for p in out.iterdir()) + result.stdout.encode() + result.stderr.encode()
    assert AUDITOR_PASSWORD.encode() not in everything

    # The rest of the audit completes when the server refuses the connection.
    bad = tmp_path / "bad"
    bad_dsn = f"postgresql://{AUDITOR_ROLE}:{AUDITOR_PASSWORD}@127.0.0.1:{free_loopback_port()}/postgres"
    result = agent_cli("audit", "--probes", "postgres", "--duration", "1", "--pg-dsn", bad_dsn, "--out", str(bad))
    # The only probe asked for could not run: the bundle says why, and the exit is not "all clear".
    assert result.returncode == 1, result.stderr
    assert "NOTHING MEASURED" in result.stdout
    record = Bundle(bad).probe("postgres")
    assert record["status"] == "unavailable" and "connection refused" in record["reason"]
    everything = b"".join(p.read_bytes() for p in bad.iterdir()) + result.stdout.encode() + result.stderr.encode()
    assert AUDITOR_PASSWORD.encode() not in everything


def test_dsn_file_must_be_private(tmp_path):
    from core.errors import Unavailable

    dsn_file = tmp_path / "dsn"
    dsn_file.write_text("postgresql://u:p@127.0.0.1/x")
    dsn_file.chmod(0o644)
    with pytest.raises(Unavailable, match="chmod 600"):
        _probe({"pg_dsn_file": dsn_file}).check()


def test_blocking_is_sampled(pg, tmp_path):
    """A session holding a row lock blocks another: pg_blocking names both pids."""
    import subprocess

    from probes.base import Window

    probe = _probe({"pg_dsn": pg.dsn()})
    probe.check()
    probe.prepare()
    holder = subprocess.Popen(
        ["/usr/lib/postgresql/15/bin/psql", "-X", "-q", "-h", str(pg.socket_dir), "-p", str(pg.port), "-U",
         "postgres", "-c", "BEGIN; UPDATE pgbench_branches SET bbalance = 0 WHERE bid = 1; SELECT pg_sleep(2.5); COMMIT;"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, user="postgres")
    time.sleep(0.3)
    waiter = threading.Thread(target=pg.psql, args=("UPDATE pgbench_branches SET bbalance = 1 WHERE bid = 1",))
    waiter.start()
    try:
        tables = probe.collect(Window(1.5, tmp_path))
    finally:
        holder.wait(timeout=30)
        waiter.join(timeout=30)
    blocking = tables["pg_blocking"].to_pylist()
    assert blocking and blocking[0]["blocking_pid"] > 0 and blocking[0]["samples"] >= 1
    waits = {(r["wait_event_type"], r["wait_event"]) for r in tables["pg_waits"].to_pylist()}
    assert ("Lock", "transactionid") in waits or ("Lock", "tuple") in waits
