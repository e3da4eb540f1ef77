"""`query` runs the user's SQL as root: it may read the dataset and nothing else."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import run_agent


@pytest.fixture
def dataset(tmp_path) -> Path:
    root = tmp_path / "dataset"
    part = root / "table=runs" / "date=2026-12-01" / "host=h1"
    part.mkdir(parents=True)
    pq.write_table(pa.table({"probe": ["host", "tcp"], "status": ["ok", "ok"], "table": ["runs", "runs"]}),
                   part / "r1.parquet")
    return root


def test_normal_queries_still_work(cli_runner, dataset):
    result = cli_runner.invoke(["query", "--dataset", str(dataset), "--format", "csv",
                                "SELECT probe, host FROM runs ORDER BY probe"])
    assert result.exit_code == 0, result.output
    assert result.output.split() == ["probe,host", "host,h1", "tcp,h1"]
    for sql in ("WITH a AS (SELECT count(*) AS n FROM runs) SELECT n FROM a", "DESCRIBE runs",
                "EXPLAIN SELECT * FROM runs", "SELECT 1; SELECT 2"):
        result = cli_runner.invoke(["query", "--dataset", str(dataset), sql])
        assert result.exit_code == 0, (sql, result.output)


@pytest.mark.parametrize("sql, outside", [
    ("SELECT * FROM read_csv('/etc/shadow')", "/etc/shadow"),
    ("SELECT * FROM read_text('/etc/hostname')", None),
    ("SELECT * FROM glob('/etc/*')", None),
    ("COPY runs TO '{out}/copied.csv'", "copied.csv"),
    ("COPY (SELECT 1) TO '{root}/table=runs/evil.parquet'", "evil.parquet"),
    ("ATTACH '{out}/attached.db' AS evil", "attached.db"),
    ("EXPORT DATABASE '{out}/exported'", "exported"),
    ("INSTALL httpfs", None),
    ("LOAD httpfs", None),
    ("SET enable_external_access = true", None),
    ("SELECT 1; COPY runs TO '{out}/second.csv'", "second.csv"),
    ("EXPLAIN ANALYZE COPY runs TO '{out}/explained.csv'", "explained.csv"),
    ("CREATE TABLE t AS SELECT 1", None),
    ("PRAGMA enable_profiling", None),
])
def test_escapes_are_refused_with_one_line_exit_2(cli_runner, dataset, tmp_path, sql, outside):
    out = tmp_path / "out"
    out.mkdir()
    before = sorted(p.name for p in dataset.rglob("*"))
    result = cli_runner.invoke(["query", "--dataset", str(dataset), sql.format(out=out, root=dataset)])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("guardian-agent: query: "), result.output
    assert "root:" not in result.output  # nothing of /etc/shadow
    assert not any(out.iterdir()), "a file was written outside the dataset"
    assert sorted(p.name for p in dataset.rglob("*")) == before, "the dataset was written to"


def test_the_real_command_refuses_reading_outside_the_dataset(dataset):
    result = run_agent("query", "--dataset", str(dataset), "SELECT * FROM read_csv('/etc/passwd')")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "root:" not in result.stdout + result.stderr
