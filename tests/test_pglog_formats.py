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


# Syslog and Heroku logplex lines whose server prefix has no time: the same six statements as
# STDERR_LOG (pids 100-105, seconds 0-5 of 10:00 UTC), each message's first line carrying the
# header's time and pid, one two-line statement continued as [n-2] with '#011'.
def _syslog_lines(header) -> str:
    lines = []
    for i in range(6):
        lines.append(f"{header(i)}[{i + 1}-1] LOG:  duration: {i + 1}.500 ms  statement: SELECT * FROM t")
        lines.append(f"{header(i)}[{i + 1}-2] #011WHERE a = {i}")
    return "\n".join(lines) + "\n"


def _heroku_lines(header) -> str:
    return "".join(f"{header(i)}[{i + 1}-1] sql_error_code = 00000 LOG:  duration: {i + 1}.500 ms  "
                   f"statement: SELECT * FROM t WHERE a = {i}\n" for i in range(6))


SYSLOG_WITHOUT_SERVER_TIME = {
    "bsd": _syslog_lines(lambda i: f"Dec  1 10:00:0{i} db1 postgres[{100 + i}]: "),
    "rfc3339": _syslog_lines(lambda i: f"2026-12-01T11:00:0{i}.123456+01:00 db1 postgres[{100 + i}]: "),
    "heroku-drain": "".join(
        f"{len(line)} {line}\n" for line in _heroku_lines(
            lambda i: f"<134>1 2026-12-01T10:00:0{i}.5+00:00 host app postgres.{100 + i} - ").splitlines()),
    "heroku-logs": _heroku_lines(lambda i: f"2026-12-01T10:00:0{i}+00:00 app[postgres.{100 + i}]: [DATABASE] "),
}


@pytest.mark.parametrize("name", sorted(SYSLOG_WITHOUT_SERVER_TIME))
def test_syslog_and_heroku_without_server_time_take_the_syslog_time(tmp_path, name):
    import os

    from probes.pglog import analyse_logs

    log = tmp_path / "messages"
    log.write_text(SYSLOG_WITHOUT_SERVER_TIME[name])
    os.utime(log, (1796212800, 1796212800))   # 2026-12-01: the year a BSD header lacks
    notes = []
    analysis = analyse_logs([log], announce=notes.append)
    assert analysis.files[0].format == "syslog"
    assert analysis.errors.num_rows == 0, analysis.errors.to_pylist()
    rows = analysis.queries.to_pylist()
    assert len(rows) == 1 and rows[0]["calls"] == 6, rows
    assert rows[0]["total_ms"] == pytest.approx(sum(i + 1.5 for i in range(6)))
    assert rows[0]["query"] == "SELECT * FROM t WHERE a = $1"
    minutes = analysis.minutes.to_pylist()
    assert [(m["minute"].isoformat(), m["calls"]) for m in minutes] == [("2026-12-01T10:00:00+00:00", 6)]
    assert any("syslog time" in note for note in notes), notes
    assert ("no year" in analysis.files[0].note) == (name == "bsd")
