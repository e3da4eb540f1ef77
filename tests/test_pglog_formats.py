"""pg-log reads the inputs users really have: bz2, standard input, syslog by --format, csvlog
with a quoted first field. Every fixture is written here by the test."""

from __future__ import annotations

import bz2

import pyarrow.parquet as pq
import pytest

STDERR_LOG = "".join(
    f"2026-12-01 10:00:{i:02d}.000 UTC [{100 + i}] LOG:  duration: {i + 1}.500 ms  statement: SELECT * FROM t WHERE a = {i}\n"
    for i in range(6))


def calls(out) -> int:
    return sum(pq.read_table(out / "pg_queries.parquet").column("calls").to_pylist())


def test_bz2_log(tmp_path, agent_cli):
    log = tmp_path / "postgresql.log.bz2"
    log.write_bytes(bz2.compress(STDERR_LOG.encode()))
    result = agent_cli("pg-log", str(log), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path / "out") == 6


def test_standard_input(tmp_path, agent_cli):
    out = tmp_path / "out"
    result = agent_cli("pg-log", "-", "--out", str(out), input_text=STDERR_LOG)
    assert result.returncode == 0, result.stderr
    assert calls(out) == 6


def test_syslog_format_option(tmp_path, agent_cli):
    lines = [f"Dec  1 10:00:{i:02d} db1 postgres[{100 + i}]: [{i + 1}-1] {line}"
             for i, line in enumerate(STDERR_LOG.splitlines())]
    log = tmp_path / "messages"
    log.write_text("\n".join(lines) + "\n")
    result = agent_cli("pg-log", str(log), "--format", "syslog", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path / "out") == 6


def test_csvlog_with_quoted_first_field_is_detected(tmp_path, agent_cli):
    rows = [f'"2026-12-01 10:00:0{i}.000 UTC","u","db",{100 + i},"[local]","s{i}",1,"SELECT","2026-12-01 10:00:00 UTC",'
            f'3/4,0,"LOG","00000","duration: 1.{i}00 ms  statement: SELECT {i}",,,,,,,,,"psql","client backend",,0'
            for i in range(4)]
    log = tmp_path / "postgresql-log"
    log.write_text("\n".join(rows) + "\n")
    result = agent_cli("pg-log", str(log), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path / "out") == 4


def test_zone_abbreviations_resolved_by_the_tz_database_or_said(tmp_path, agent_cli):
    log = tmp_path / "zones.log"
    log.write_text(
        "2026-07-01 12:10:00.000 CEST [1] LOG:  duration: 1.000 ms  statement: SELECT 1\n"
        "2026-07-01 13:20:00.000 MSK [2] LOG:  duration: 1.000 ms  statement: SELECT 1\n"
        "2026-07-01 17:30:00.000 IST [3] LOG:  duration: 1.000 ms  statement: SELECT 1\n")
    out = tmp_path / "out"
    result = agent_cli("pg-log", str(log), "--prefix", "%m [%p] ", "--out", str(out))
    assert result.returncode == 0, result.stderr
    minutes = sorted((row["minute"].hour, row["minute"].minute)
                     for row in pq.read_table(out / "pg_query_minutes.parquet").to_pylist())
    # CEST = UTC+2, MSK = UTC+3; IST means India, Ireland or Israel: kept as UTC and said so.
    assert minutes == [(10, 10), (10, 20), (17, 30)]
    assert "IST" in result.stderr and "taken as UTC" in result.stderr
    import json

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["pg_log"]["unknown_zones_assumed_utc"] == ["IST"]


@pytest.mark.parametrize("fast", [True, False])
def test_rds_prefix_zone_does_not_swallow_the_next_field(tmp_path, fast):
    from probes.pglog import analyse_logs

    log = tmp_path / "rds.log"
    log.write_text("2026-11-24 03:10:00 CET:10.0.0.5(51234):app@trading:[5101]:LOG:  duration: 0.300 ms  "
                   "statement: SELECT 1\n")
    analysis = analyse_logs([log], prefix="%t:%r:%u@%d:[%p]:", fast=fast)
    assert analysis.unknown_zones == []
    assert [(m["minute"].hour, m["minute"].minute) for m in analysis.minutes.to_pylist()] == [(2, 10)]


def test_cloudnativepg_wrapped_records_are_read(tmp_path, agent_cli):
    import json

    lines = [json.dumps({"level": "info", "ts": "2026-12-01T10:00:0%dZ" % i, "logger": "postgres", "msg": "record",
                         "logging_pod": "cluster-1", "record": {
                             "log_time": f"2026-12-01 10:00:0{i}.000 UTC", "user_name": "app", "database_name": "db",
                             "process_id": str(300 + i), "error_severity": "LOG", "sql_state_code": "00000",
                             "message": f"duration: 2.500 ms  statement: SELECT * FROM t WHERE a = {i}"}})
             for i in range(5)]
    log = tmp_path / "cnpg.json"
    log.write_text("\n".join(lines) + "\n")
    result = agent_cli("pg-log", str(log), "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert calls(tmp_path / "out") == 5


def test_other_json_objects_exit_2_with_one_line(tmp_path, agent_cli):
    import json

    log = tmp_path / "cloudsql.json"
    log.write_text("\n".join(json.dumps({"textPayload": f"[{i}]: db=x LOG:  duration: 1.000 ms  statement: SELECT 1",
                                         "severity": "INFO", "timestamp": "2026-12-01T10:00:00Z"})
                             for i in range(3)) + "\n")
    result = agent_cli("pg-log", str(log), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "neither PostgreSQL's jsonlog nor CloudNativePG" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
