"""pg-log on recorded logs: prefixes, multi-line statements, execute/bind forms, auto_explain
plans, broken lines, compression, percentiles and literal redaction. The `recorded*` fixtures
are the three logs one real PostgreSQL 15 server wrote at once (stderr, csvlog, jsonlog)."""

from __future__ import annotations

import gzip
import math
import random
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from probes.pglog import analyse_logs, plan_query_text
from probes.pglog.aggregate import zone_offset_s
from probes.pglog.fingerprint import FingerprintCache, fingerprint_statement
from probes.pglog.prefix import detect_prefix, infer_prefix, prefix_to_pattern
from reports.bundle import Bundle

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "pglog"


def by_query(analysis) -> dict[str, dict]:
    return {row["query"]: row for row in analysis.queries.to_pylist()}


def errors_by_category(analysis) -> dict[str, dict]:
    return {row["category"]: row for row in analysis.errors.to_pylist()}


def test_pgbadger_prefix_fixture_all_forms():
    announced = []
    analysis = analyse_logs([FIXTURES / "pgbadger_prefix.log"], announce=announced.append)
    assert "'%t [%p]: [%l-1] user=%u,db=%d,app=%a,client=%h '" in announced[0]
    queries = by_query(analysis)
    # Two one-line and one multi-line SELECT with different literals: one fingerprint.
    orders = queries["SELECT * FROM orders WHERE account_id = $1 AND status = $2"]
    assert orders["calls"] == 3
    assert orders["total_ms"] == pytest.approx(0.412 + 1.250 + 0.588)
    assert orders["max_ms"] == pytest.approx(1.25)
    # execute <unnamed> and execute S_1 count; parse and bind phases do not.
    update = queries["UPDATE accounts SET balance = balance - $1 WHERE id = $2"]
    assert update["calls"] == 2 and update["total_ms"] == pytest.approx(0.733 + 0.905)
    assert analysis.bind_parse_phases == 2
    # auto_explain: the statement comes from the plan's Query Text (multi-line).
    plan = queries["SELECT count(*) FROM fills WHERE venue = $1"]
    assert plan["source"] == "plan" and plan["calls"] == 1 and plan["p99_ms"] == pytest.approx(12.5)
    errors = errors_by_category(analysis)
    assert errors["line_does_not_match_prefix"]["count"] == 1
    assert errors["line_does_not_match_prefix"]["first_line"] == 13
    assert errors["duration_without_statement"]["count"] == 1
    assert errors["statement_not_parsed_by_libpg_query"]["count"] == 1
    # Broken lines and unparsed statements are reported without their literals.
    text = repr(analysis.errors.to_pylist()) + repr(analysis.queries.to_pylist())
    for secret in ("4111111111111111", "Alice", "4242", "filled", "XNAS", "9001"):
        assert secret not in text


@pytest.mark.parametrize("name, prefix", [
    ("rds_prefix.log", "%t:%r:%u@%d:[%p]:"),
    ("recorded_stderr.log", "%m [%p] %q%u@%d "),
])
def test_known_prefixes_detected(name, prefix):
    lines = [line for line in (FIXTURES / name).read_text().splitlines() if not line.startswith("\t")]
    detected, fraction = detect_prefix(lines)
    assert detected == prefix and fraction == 1.0


def test_unknown_prefix_inferred_with_zone():
    analysis = analyse_logs([FIXTURES / "custom_prefix.log"])
    assert analysis.files[0].prefix == "%m pid=%p db=%d "
    row = analysis.queries.to_pylist()[0]
    assert row["calls"] == 3
    # 03:10 CET is 02:10 UTC: minutes are stored in UTC.
    minutes = analysis.minutes.to_pylist()
    assert [(m["minute"].hour, m["minute"].minute, m["calls"]) for m in minutes] == [(2, 10, 2), (2, 11, 1)]


def test_infer_prefix_with_optional_session_part():
    lines = ["2026-11-24 03:10:00.123 UTC [12] user=a,db=b LOG:  x",
             "2026-11-24 03:10:01.123 UTC [13] user=c,db=d LOG:  x",
             "2026-11-24 03:10:02.123 UTC [14] LOG:  checkpoint starting"]
    assert infer_prefix(lines) == "%m [%p] %quser=%u,db=%d "


def test_prefix_mismatch_is_refused_not_silent(tmp_path):
    from core.errors import BadInput

    with pytest.raises(BadInput, match="matches only 0%"):
        analyse_logs([FIXTURES / "recorded_stderr.log"], prefix="%t:%r:%u@%d:[%p]:")
    garbage = tmp_path / "garbage.log"
    garbage.write_text("hello\nworld\n")
    with pytest.raises(BadInput, match="could not detect the log_line_prefix"):
        analyse_logs([garbage])


def test_recorded_formats_agree():
    results = []
    for name in ("recorded_stderr.log", "recorded.csv", "recorded.json"):
        analysis = analyse_logs([FIXTURES / name])
        assert analysis.errors.num_rows == 0, analysis.errors.to_pylist()
        results.append(sorted((r["fingerprint"], r["calls"], round(r["total_ms"], 3), r["p99_ms"])
                              for r in analysis.queries.to_pylist()))
    assert results[0] == results[1] == results[2]
    assert len(results[0]) >= 25
    formats = [analyse_logs([FIXTURES / n]).files[0].format for n in ("recorded_stderr.log", "recorded.csv", "recorded.json")]
    assert formats == ["stderr", "csv", "json"]



def as_syslog(stderr_text: str, piece: int = 900) -> str:
    """What rsyslog writes for the same messages with log_destination = syslog: one syslog line
    per line of a message ("[N-1]", "[N-2]" ...), lines longer than `piece` bytes cut into
    numbered pieces, the tab after each newline inside a message escaped as #011."""
    out, number = [], 0
    entries: list[list[str]] = []
    for line in stderr_text.splitlines():
        if line.startswith("\t") and entries:
            entries[-1].append(line)
        else:
            entries.append([line])
    for entry in entries:
        number += 1
        part = 0
        for line in entry:
            text = line.replace("\t", "#011")
            for start in range(0, max(len(text), 1), piece):
                part += 1
                out.append(f"Nov 24 02:36:28 dbhost postgres[26151]: [{number}-{part}] {text[start:start + piece]}")
    return "\n".join(out) + "\n"


LONG_STATEMENT = ("2026-11-24 02:40:00.000 UTC [26199] postgres@bench LOG:  duration: 12.500 ms  statement: "
                  "SELECT " + ", ".join(f"col_{i}" for i in range(400)) + " FROM wide WHERE id = 42\n"
                  "\tAND venue = 'XNAS'\n")


@pytest.mark.parametrize("block_bytes", [None, 1 << 12, 700])
def test_syslog_gives_what_stderr_gives(tmp_path, block_bytes):
    """The same messages logged through syslog (multi-line statements as [N-2] lines, a 2.4 kB
    statement cut into pieces) read back to the same per-fingerprint figures as the stderr log."""
    stderr_text = (FIXTURES / "recorded_stderr.log").read_text() + LONG_STATEMENT
    stderr_log, syslog_log = tmp_path / "postgresql.log", tmp_path / "syslog"
    stderr_log.write_text(stderr_text)
    syslog_log.write_text(as_syslog(stderr_text))
    sizes = {"block_bytes": block_bytes} if block_bytes else {}
    results = []
    for path in (stderr_log, syslog_log):
        analysis = analyse_logs([path], **sizes)
        assert analysis.errors.num_rows == 0, analysis.errors.to_pylist()
        results.append(sorted((r["fingerprint"], r["calls"], round(r["total_ms"], 3), r["query"])
                              for r in analysis.queries.to_pylist()))
    assert results[0] == results[1]
    assert analyse_logs([syslog_log]).files[0].format == "syslog"
    wide = [row for row in results[1] if "col_399" in row[3]]
    assert len(wide) == 1 and wide[0][1] == 1 and "venue = $2" in wide[0][3], wide

def test_recorded_multiline_and_plan():
    queries = by_query(analyse_logs([FIXTURES / "recorded.csv"]))
    # The multi-line and the one-line GROUP BY differ only in literals and whitespace.
    assert queries["SELECT venue, sum(qty) FROM fills WHERE venue = $1 GROUP BY venue"]["calls"] == 2
    assert queries["SELECT count(*) FROM fills WHERE qty > $1"]["source"] == "plan"


def test_small_blocks_give_the_same_answer():
    """Entries (multi-line ones too) split across block boundaries are stitched back."""
    expected = analyse_logs([FIXTURES / "recorded_stderr.log"]).queries
    for name in ("recorded_stderr.log", "recorded.csv", "recorded.json"):
        small = analyse_logs([FIXTURES / name], block_bytes=4096).queries
        assert sorted(small.column("fingerprint").to_pylist()) == sorted(expected.column("fingerprint").to_pylist())
        assert sum(small.column("calls").to_pylist()) == sum(expected.column("calls").to_pylist())


def test_compressed_inputs(tmp_path):
    import zstandard

    plain = FIXTURES / "recorded_stderr.log"
    gz = tmp_path / "postgresql.log.gz"
    with open(plain, "rb") as source, gzip.open(gz, "wb") as target:
        shutil.copyfileobj(source, target)
    zst = tmp_path / "postgresql.json.zst"
    zst.write_bytes(zstandard.ZstdCompressor().compress((FIXTURES / "recorded.json").read_bytes()))
    expected = sorted((r["fingerprint"], r["calls"]) for r in analyse_logs([plain]).queries.to_pylist())
    for path, compression, log_format in ((gz, "gzip", "stderr"), (zst, "zstd", "json")):
        analysis = analyse_logs([path])
        assert analysis.files[0].compression == compression and analysis.files[0].format == log_format
        assert sorted((r["fingerprint"], r["calls"]) for r in analysis.queries.to_pylist()) == expected


def test_broken_csv_and_json_lines_are_counted(tmp_path):
    json_file = tmp_path / "broken.json"
    good = (FIXTURES / "recorded.json").read_text().splitlines()
    json_file.write_text("\n".join(good[:5] + ['{"timestamp": "2026-11-24 02:36:28.870 UTC", "message": "dur',
                                               "not json at all 12345"] + good[5:]) + "\n")
    analysis = analyse_logs([json_file])
    errors = errors_by_category(analysis)
    assert errors["json_line_malformed"]["count"] == 2
    assert errors["json_line_malformed"]["first_line"] == 6
    assert "12345" not in repr(errors)
    csv_file = tmp_path / "broken.csv"
    csv_file.write_text((FIXTURES / "recorded.csv").read_text() + "2026-11-24 02:36:29.000 UTC,only,three\n")
    errors = errors_by_category(analyse_logs([csv_file]))
    assert errors["csv_row_malformed"]["count"] == 1


def test_percentiles_are_per_execution_at_microsecond_resolution(tmp_path):
    rng = random.Random(7)
    durations_us = [rng.randint(5, 900) for _ in range(5000)] + [rng.randint(1000, 250_000) for _ in range(40)]
    rng.shuffle(durations_us)
    lines = [f"2026-11-24 02:{index % 60:02d}:00.000 UTC [{100 + index % 7}] LOG:  duration: "
             f"{us / 1000:.3f} ms  statement: SELECT * FROM t WHERE id = {index}"
             for index, us in enumerate(durations_us)]
    log = tmp_path / "p.log"
    log.write_text("\n".join(lines) + "\n")
    row = analyse_logs([log]).queries.to_pylist()[0]
    ordered = sorted(durations_us)

    def nearest_rank(fraction):
        return ordered[max(1, math.ceil(fraction * len(ordered))) - 1] / 1000

    assert row["calls"] == len(durations_us)
    assert row["total_ms"] == pytest.approx(sum(durations_us) / 1000)
    from probes.pglog.histogram import RELATIVE_ERROR

    assert row["p50_ms"] == nearest_rank(0.50)      # exact below 1.024 ms
    assert row["p99_ms"] == nearest_rank(0.99)
    assert row["p999_ms"] == pytest.approx(nearest_rank(0.999), rel=RELATIVE_ERROR)   # 0.78 % above
    assert row["max_ms"] == ordered[-1] / 1000    # max is exact
    assert row["p50_ms"] < 1.0                     # sub-millisecond, unlike pgBadger's 1 ms floor


def test_duration_buckets_bounded_error():
    import numpy as np

    from probes.pglog.histogram import BUCKETS, RELATIVE_ERROR, bucket_index, bucket_low_us, bucket_middle_us

    values = np.r_[np.arange(0, 70_000), np.random.default_rng(3).integers(0, 2 ** 40, 200_000)]
    index = bucket_index(values)
    low, middle = bucket_low_us(index), bucket_middle_us(index)
    assert np.all(index[values < 1024] == values[values < 1024])           # exact below 1.024 ms
    assert np.all(low <= values) and np.all(middle >= low)
    assert np.all(bucket_index(low) == index) and np.all(bucket_index(low - 1)[index > 0] == index[index > 0] - 1)
    assert np.all(np.abs(middle - values)[values > 0] / values[values > 0] <= RELATIVE_ERROR)
    assert np.all(np.diff(bucket_index(np.arange(0, 300_000))) >= 0) and index.max() < BUCKETS
    # Beyond 2^40 us (12.7 days) and for any int64, the last bucket: indexes never leave the row.
    assert bucket_index(np.array([2 ** 40, 2 ** 62])).tolist() == [BUCKETS - 1] * 2


def test_fingerprints_join_pg_stat_statements_text():
    logged, _, _ = fingerprint_statement("UPDATE pgbench_accounts SET abalance = abalance + -42 WHERE aid = 7;")
    tracked, _, _ = fingerprint_statement("UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2")
    assert logged == tracked


def test_fingerprint_cache_calls_parser_once_per_shape():
    import pyarrow as pa

    cache = FingerprintCache()
    statements = pa.array([f"SELECT * FROM t WHERE a = {i} AND b = 'x{i}'" for i in range(5000)]
                          + ['SELECT * FROM "t1" WHERE a = 1', 'SELECT * FROM "t2" WHERE a = 1'])
    ids = cache.ids(statements).to_pylist()
    assert len(set(ids[:5000])) == 1
    assert len(set(ids)) == 3          # quoted identifiers are not literals
    assert cache.parser_calls == 3


def test_plan_query_text_forms():
    text_plan = "\n\tQuery Text: SELECT 1\n\t  FROM t\n\tSeq Scan on t  (cost=0.00..1.00 rows=1 width=4)\n"
    assert plan_query_text(text_plan) == "SELECT 1\n  FROM t"
    json_plan = '\n{\n  "Query Text": "SELECT \\"x\\" FROM t",\n  "Plan": {"Node Type": "Seq Scan"}\n}'
    assert plan_query_text(json_plan) == 'SELECT "x" FROM t'
    assert plan_query_text("\n\tSeq Scan on t  (cost=0.00..1.00 rows=1 width=4)") is None


def test_zone_offsets():
    assert zone_offset_s("UTC") == 0
    assert zone_offset_s("+0530") == 19800 and zone_offset_s("-03") == -10800
    assert zone_offset_s("CET") == 3600
    assert zone_offset_s("NOPE") is None


def test_prefix_pattern_escapes():
    import re

    pattern = re.compile(prefix_to_pattern("%m [%p] %q%u@%d "))
    assert pattern.match("2026-11-24 02:10:00.123 UTC [4] app@db ")
    assert pattern.match("2026-11-24 02:10:00.123 UTC [4] ")


# -- the command ---------------------------------------------------------------------------------
def test_cli_writes_bundle_without_literals(tmp_path, agent_cli):
    out = tmp_path / "bundle"
    result = agent_cli("pg-log", str(FIXTURES / "pgbadger_prefix.log"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "detected log_line_prefix" in result.stderr
    assert "not used: 1 × line_does_not_match_prefix" in result.stderr
    bundle = Bundle(out)
    assert {"pg_queries", "pg_query_minutes", "pg_log_errors"} <= set(bundle.table_names())
    queries = bundle.table("pg_queries")
    for column in ("fingerprint", "query", "calls", "total_ms", "p50_ms", "p99_ms", "p999_ms", "max_ms"):
        assert column in queries.column_names
    assert bundle.manifest["pg_log"]["files"][0]["prefix"] == "%t [%p]: [%l-1] user=%u,db=%d,app=%a,client=%h "
    everything = b"".join(path.read_bytes() for path in out.iterdir()) + result.stdout.encode() + result.stderr.encode()
    for secret in (b"4111111111111111", b"Alice", b"4242", b"9001", b"XNAS"):
        assert secret not in everything
    assert queries.column("example").null_count == queries.num_rows


def test_cli_keep_literals(tmp_path, agent_cli):
    out = tmp_path / "bundle"
    result = agent_cli("pg-log", str(FIXTURES / "pgbadger_prefix.log"), "--out", str(out), "--keep-literals")
    assert result.returncode == 0, result.stderr
    examples = [e for e in pq.read_table(out / "pg_queries.parquet").column("example").to_pylist() if e]
    assert any("4242" in e or "'filled'" in e or "= 5 " in e for e in examples)


@pytest.mark.parametrize("arguments, message", [
    (["missing.log", "--out", "{out}"], "no such file"),
    (["{fixture}", "--out", "{out}", "--prefix", "%t [%p] "], "matches only"),
    (["{fixture}", "--out", "{out}", "--prefix", "%u@%d"], "needs a time escape"),
    (["{fixture}", "--out", "{out}", "--format", "xml"], "xml"),
    (["{fixture}", "--out", "{nonempty}"], "not empty"),
    (["{fixture}", "--out", "{out}", "--format", "csv"], "not a csvlog file"),
    (["{fixture}", "--out", "{out}", "--format", "json"], "not a jsonlog file"),
    (["{fixture}", "{nonempty}", "--out", "{out}"], "not a regular file"),
])
def test_cli_bad_input_exit_2(tmp_path, agent_cli, arguments, message):
    nonempty = tmp_path / "nonempty"
    nonempty.mkdir()
    (nonempty / "x").write_text("x")
    values = {"out": str(tmp_path / "out"), "fixture": str(FIXTURES / "rds_prefix.log"), "nonempty": str(nonempty)}
    result = agent_cli("pg-log", *[a.format(**values) for a in arguments])
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


FOREIGN_LOGS = {
    "german.log": "2026-11-24 10:00:00.123 UTC [123] LOG:  Dauer: 1.234 ms  Anweisung: SELECT 1\n"
                  "2026-11-24 10:00:01.123 UTC [123] LOG:  Dauer: 0.532 ms  Anweisung: SELECT 2\n",
    "french.csv": '2026-11-24 10:00:00.123 UTC,"app","db",123,"[local]",1,1,"SELECT",2026-11-24 10:00:00 UTC,'
                  '3/4,0,LOG,00000,"durée : 1.234 ms  instruction : SELECT 1",,,,,,,,,"psql","client backend",,0\n',
}


@pytest.mark.parametrize("name", sorted(FOREIGN_LOGS))
def test_durations_in_another_language_are_refused_with_the_fix(tmp_path, agent_cli, name):
    """A server with lc_messages other than English logs 'Dauer: 1.234 ms': rather than report
    zero executions (and blame log_min_duration_statement), say what is wrong. Exit 2, no bundle."""
    log = tmp_path / name
    log.write_text(FOREIGN_LOGS[name], encoding="utf-8")
    result = agent_cli("pg-log", str(log), "--out", str(tmp_path / "out"))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "another language" in result.stderr and "lc_messages = 'C'" in result.stderr, result.stderr
    assert f"{name}:1:" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
    english = tmp_path / "english.log"  # the same lines in English are analysed
    english.write_text(FOREIGN_LOGS["german.log"].replace("Dauer", "duration").replace("Anweisung", "statement"))
    result = agent_cli("pg-log", str(english), "--out", str(tmp_path / "out"))
    assert result.returncode == 0 and "2 executions" in result.stdout, result.stdout + result.stderr

@pytest.mark.parametrize("name", ["pgbadger_prefix.log", "recorded_stderr.log", "rds_prefix.log", "custom_prefix.log"])
def test_fast_path_equals_regex_path(name):
    """The numpy fast path (prefixes starting with %m/%t) and the RE2 capture path agree."""
    fast = analyse_logs([FIXTURES / name], fast=True)
    careful = analyse_logs([FIXTURES / name], fast=False)
    assert fast.queries.equals(careful.queries)
    # Fingerprint ids (hence the minute rows' order) follow the order statements were first met,
    # which differs when digit keys are ambiguous (t1/t2): the rows themselves must agree.
    order = [("fingerprint", "ascending"), ("minute", "ascending")]
    assert fast.minutes.sort_by(order).equals(careful.minutes.sort_by(order))
    assert fast.errors.equals(careful.errors)
    assert fast.files[0].entries == careful.files[0].entries


def test_long_portal_names_and_invalid_utf8(tmp_path):
    portal = "p" * 200
    log = tmp_path / "odd.log"
    log.write_bytes(
        f"2026-11-24 02:10:00.000 UTC [1] LOG:  duration: 0.100 ms  execute {portal}: SELECT 1\n".encode()
        + b"2026-11-24 02:10:00.000 UTC [1] LOG:  duration: 0.200 ms  statement: SELECT '\xff\xfe'\n"
        + b"2026-11-24 02:10:00.000 UTC [1] LOG:  duration: 12345.678 ms  statement: SELECT 2\n")
    for fast in (True, False):
        analysis = analyse_logs([log], fast=fast)
        assert sum(analysis.queries.column("calls").to_pylist()) == 3
        assert analysis.queries.column("max_ms").to_pylist()[0] == pytest.approx(12345.678)
        assert analysis.errors.num_rows == 0


def test_phases_and_unknown_kinds_are_accounted(tmp_path):
    log = tmp_path / "kinds.log"
    log.write_text(
        "2026-11-24 02:10:00.000 UTC [1] LOG:  duration: 0.100 ms  parse s1: SELECT 1\n"
        "2026-11-24 02:10:00.000 UTC [1] LOG:  duration: 0.100 ms  bind s1: SELECT 1\n"
        "2026-11-24 02:10:00.000 UTC [1] LOG:  duration: 0.100 ms  fastpath function call: lo_open\n"
        "2026-11-24 02:10:00.000 UTC [1] LOG:  duration: 0.100 ms  frobnicate: SELECT 1\n"
        "2026-11-24 02:10:00.000 UTC [1] LOG:  duration: 0.300 ms\n"
        "2026-11-24 02:10:00.000 UTC [1] LOG:  duration: 0.200 ms  execute s1: SELECT 1\n")
    for fast in (True, False):
        analysis = analyse_logs([log], fast=fast)
        assert analysis.bind_parse_phases == 3
        assert analysis.durations_counted == 1
        assert errors_by_category(analysis)["duration_without_statement"]["count"] == 2


@pytest.mark.parametrize("block_bytes", [8 << 20, 2048])
def test_log_statement_and_log_duration_lines_are_paired(block_bytes):
    """Recorded with log_statement = all + log_duration = on (no log_min_duration_statement):
    pgbench -c 2 -t 4 (simple) and -c 1 -t 3 -M extended, written as stderr, csv and json."""
    results = []
    for name in ("log_duration_stderr.log", "log_duration.csv", "log_duration.json"):
        analysis = analyse_logs([FIXTURES / name], block_bytes=block_bytes)
        queries = by_query(analysis)
        assert queries["UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;"]["calls"] == 2 * 4 + 3
        assert analysis.paired_durations == analysis.durations_counted == 111
        # The extended protocol's parse and bind durations (3 transactions x 7 statements x 2)
        # have no statement line: reported, not guessed.
        assert errors_by_category(analysis)["duration_without_statement"]["count"] == 42
        results.append(sorted((r["fingerprint"], r["calls"], round(r["total_ms"], 3)) for r in analysis.queries.to_pylist()))
    assert results[0] == results[1] == results[2]


def test_pairing_survives_block_boundaries_and_background_lines(tmp_path):
    """The statement ends one block and its duration starts the next; a background process
    line without the %q part (no pid) sits between them."""
    log = tmp_path / "split.log"
    log.write_text("2026-11-24 02:10:00.000 UTC app@db [11] LOG:  statement: SELECT 1\n"
                   "2026-11-24 02:10:00.000 UTC LOG:  checkpoint starting: time\n"
                   "2026-11-24 02:10:00.001 UTC app@db [11] LOG:  duration: 0.500 ms\n")
    for fast in (True, False):
        for block_bytes in (8 << 20, 70):
            analysis = analyse_logs([log], prefix="%m %q%u@%d [%p] ", fast=fast, block_bytes=block_bytes)
            assert analysis.durations_counted == 1 and analysis.errors.num_rows == 0


def test_stderr_blocks_cut_only_at_entry_boundaries():
    import io

    from probes.pglog.readers import stderr_blocks

    data = b"a 1\n\tcontinued\nb 2\nc 3\n\tx\n\n"
    for block_bytes in (1, 2, 3, 5, 7, 100):
        blocks = list(stderr_blocks(io.BytesIO(data), block_bytes))
        assert b"".join(blocks) == data
        assert not any(block.startswith((b"\t", b"\n")) for block in blocks)


def test_password_in_a_logged_create_role_never_reaches_the_bundle(tmp_path, agent_cli):
    """PostgreSQL logs `CREATE ROLE ... PASSWORD '...'` verbatim; the recorded logs hold one."""
    from tests.pg_server import AUDITOR_PASSWORD

    assert AUDITOR_PASSWORD in (FIXTURES / "recorded_stderr.log").read_text()
    for name in ("recorded_stderr.log", "recorded.csv", "recorded.json"):
        out = tmp_path / name
        result = agent_cli("-v", "pg-log", str(FIXTURES / name), "--out", str(out))
        assert result.returncode == 0, result.stderr
        everything = b"".join(p.read_bytes() for p in out.iterdir()) + (result.stdout + result.stderr).encode()
        assert AUDITOR_PASSWORD.encode() not in everything
