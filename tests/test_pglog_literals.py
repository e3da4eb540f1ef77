"""No literal of a logged statement reaches a pg-log bundle, whatever the statement's kind.

The log is written by the test: every statement carries literals that occur nowhere else (numbers
of 9+ digits, strings with a marker), and the whole bundle is decoded (Parquet tables read back,
not grepped compressed) and searched for them."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from probes.pglog.fingerprint import fingerprint_statement, redact_literals

SECRET_NUMBERS = [str(918273645 + 1111 * index) for index in range(40)]


def secret(index: int) -> str:
    return SECRET_NUMBERS[index]


# (statement lines, what the normalised query must still say). Continuation lines are written
# tab-indented (PostgreSQL's own) or space-indented (tabs expanded by a shipper).
STATEMENTS = [
    ([f"execute foo('zqsecret-a', {secret(0)})"], "execute foo("),
    ([f"FETCH {secret(1)} FROM c"], "FETCH ? FROM c"),
    ([f"FETCH FORWARD {secret(2)} FROM c"], "FETCH FORWARD ? FROM c"),
    ([f"DECLARE c CURSOR FOR SELECT * FROM trades WHERE qty > {secret(3)}"], "DECLARE c CURSOR FOR"),
    ([f"SET work_mem = {secret(4)}"], "SET work_mem"),
    ([f"ALTER SEQUENCE s RESTART WITH {secret(5)}"], "ALTER SEQUENCE s RESTART WITH ?"),
    ([f"PREPARE p AS SELECT {secret(6)} FROM t"], "PREPARE p AS SELECT"),
    ([f"NOTIFY ch, 'zqsecret-b {secret(7)}'"], "NOTIFY ch"),
    ([f"COPY t FROM '/tmp/zqsecret-c{secret(8)}.csv'"], "COPY t FROM"),
    ([f"SELECT $zz$zqsecret-d {secret(9)}$zz$, E'zqsecret-e\\' {secret(10)}'"], "SELECT"),
    ([f"SELECT /* user=zqsecret-f id={secret(11)} */ a FROM t WHERE b = {secret(12)}"], "SELECT a FROM t WHERE b"),
    (["SELECT a,", f"\t b -- zqsecret-g {secret(13)} it's",
      f"\tFROM orders_tab WHERE id = {secret(14)}"], "FROM orders_tab WHERE id"),
    (["SELECT a", f"    FROM orders_space WHERE id = {secret(15)}",
      f"    AND note = 'zqsecret-h {secret(16)}'"], "FROM orders_space WHERE id"),
    ([f"VACUUM (VERBOSE) t{secret(17)[:1]}"], "VACUUM"),
    ([f"SELECT 0x{secret(18)}, {secret(19)}.5e3, .{secret(20)}"], "SELECT"),
    ([f"CREATE TABLE x (a varchar({secret(21)}))"], "CREATE TABLE x"),
    ([f"SELECT * FROM t WHERE s = 'unterminated zqsecret-i {secret(22)}"], "SELECT * FROM t WHERE s"),
]


def write_log(path) -> None:
    lines = []
    for index, (statement, _) in enumerate(STATEMENTS):
        stamp = f"2026-12-01 10:00:{index:02d}.123 UTC [4{index:03d}] "
        lines.append(stamp + f"LOG:  duration: {index + 1}.250 ms  statement: {statement[0]}")
        lines.extend(statement[1:])
    # The extended protocol: an execute with its parameters on a DETAIL line.
    stamp = "2026-12-01 10:01:00.000 UTC [4999] "
    lines.append(stamp + "LOG:  duration: 0.300 ms  execute S_1: SELECT * FROM acct WHERE id = $1")
    lines.append(stamp + f"DETAIL:  parameters: $1 = '{secret(30)}'")
    lines.append(stamp + f"ERROR:  duplicate key value violates unique constraint, Key (id)=({secret(31)})")
    path.write_text("\n".join(lines) + "\n")


def bundle_text(out) -> str:
    parts = []
    for path in sorted(out.iterdir()):
        if path.suffix == ".parquet":
            parts.append(json.dumps(pq.read_table(path).to_pylist(), default=str))
            parts.append(json.dumps({k.decode(): v.decode("utf-8", "replace")
                                     for k, v in (pq.read_schema(path).metadata or {}).items()}))
        else:
            parts.append(path.read_text(errors="replace"))
    return "\n".join(parts)


def assert_no_literal(text: str) -> None:
    for number in SECRET_NUMBERS:
        assert number not in text
        # A literal cut in pieces (a digit group kept) would leak too.
        assert number[:6] not in text
    assert "zqsecret" not in text


def test_no_literal_reaches_the_bundle(tmp_path, agent_cli):
    log = tmp_path / "postgresql.log"
    write_log(log)
    out = tmp_path / "bundle"
    result = agent_cli("pg-log", str(log), "--out", str(out), "--prefix", "%m [%p] ")
    assert result.returncode == 0, result.stderr
    assert_no_literal(bundle_text(out) + result.stdout + result.stderr)
    queries = pq.read_table(out / "pg_queries.parquet").column("query").to_pylist()
    for _, expected in STATEMENTS:
        assert any(expected in query for query in queries), (expected, queries)
    # Continuation lines (tab or space indented) belong to their statement, and a `--` comment
    # does not swallow the rest of the statement once collapsed onto one line.
    assert any(query.startswith("SELECT a, b FROM orders_tab WHERE id") for query in queries), queries
    assert any("FROM orders_space WHERE id = $1 AND note = $2" in query for query in queries), queries
    errors = pq.read_table(out / "pg_log_errors.parquet").to_pylist()
    assert not [row for row in errors if row["category"] == "line_does_not_match_prefix"], errors


@pytest.mark.parametrize("statement, _", STATEMENTS)
def test_each_kind_normalised_without_literals(statement, _):
    text = "\n".join(line.lstrip() for line in statement)
    fingerprint, query, _parsed = fingerprint_statement(text)
    assert_no_literal(query)
    assert "--" not in query and "/*" not in query


def test_redaction_keeps_identifiers_and_parameters():
    assert redact_literals('SELECT "col 12", t1.x, $3 FROM t2 WHERE a = 12') == \
        'SELECT "col 12", t1.x, $3 FROM t2 WHERE a = ?'
    assert redact_literals("SELECT 'a -- b' FROM t -- c 'd\nWHERE x = 1") == "SELECT '?' FROM t WHERE x = ?"


def test_percentiles_above_100_ms_stay_within_min_and_max(tmp_path):
    """One statement always taking 123.4567 s: its 4-significant-digit bucket starts at 123.4 s,
    below the exact minimum; every percentile must be the exact duration."""
    from probes.pglog import analyse_logs

    log = tmp_path / "slow.log"
    log.write_text("".join(f"2026-12-01 10:00:0{i}.000 UTC [7] LOG:  duration: 123456.789 ms  "
                           "statement: SELECT pg_sleep(1)\n" for i in range(5)))
    row = analyse_logs([log], prefix="%m [%p] ").queries.to_pylist()[0]
    assert row["min_ms"] == row["max_ms"] == pytest.approx(123456.789)
    for name in ("p50_ms", "p90_ms", "p99_ms", "p999_ms"):
        assert row[name] == pytest.approx(123456.789), name
