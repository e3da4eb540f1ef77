"""compact --catalog: a many-host dataset from real `collect` output, landed on a real S3 server
on loopback (moto), compacted into Apache Iceberg tables through a SQLite SQL catalog. Every row
and answer is kept, a plain pyiceberg read (what Spark or Trino do through the catalog) gives
the same rows, and a compaction SIGKILLed before or after its commit loses and doubles nothing."""

from __future__ import annotations

import json
import shutil
from datetime import date
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from agent.config import parse_config
from agent.fleet import compact as compact_module
from agent.fleet.compact import compact
from agent.fleet.iceberg import LEDGER_DIR
from agent.fleet.query import open_dataset_connection, run_query
from core.errors import BadInput
from tests.test_fleet_compact import DAYS, HOSTS, QUESTIONS, many_host_dataset

pytest.importorskip("pyiceberg", reason="pyiceberg not installed: run `make setup` (the iceberg extra)")

BUCKET = "fleet"
URL = f"s3://{BUCKET}/guardian"
TODAY = date(2026, 12, 1)
PARTITIONS = 2 * len(HOSTS) * len(DAYS)  # loadavg and runs


def upload(root: Path, client) -> int:
    client.create_bucket(Bucket=BUCKET)
    files = sorted(p for p in root.rglob("*.parquet"))
    for path in files:
        client.put_object(Bucket=BUCKET, Key=f"guardian/{path.relative_to(root).as_posix()}", Body=path.read_bytes())
    return len(files)


def keys(client, prefix: str = "guardian/") -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return sorted(item["Key"] for page in pages for item in page.get("Contents", []))


def landed(client) -> list[str]:
    return [key for key in keys(client) if key.startswith("guardian/table=")]


def answers(endpoint: str, catalog: str | None) -> list:
    """Every question over one set of views (one listing, one catalog load: the tests' main cost)."""
    connection, _ = open_dataset_connection(URL, endpoint, None, None, catalog)
    try:
        return [connection.execute(question).fetchall() for question in QUESTIONS]
    finally:
        connection.close()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Path:
    """The many-host dataset from real collect runs, built once for the module (read-only)."""
    return many_host_dataset(tmp_path_factory.mktemp("seed"))


@pytest.fixture
def s3_landed(tmp_path, s3_server, seeded):
    """(boto3 client, catalog URI) with the many-host dataset landed on S3, nothing compacted."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server.endpoint)
    upload(seeded, client)
    return client, f"sqlite:///{tmp_path}/catalog.db"


@pytest.fixture
def s3_dataset(s3_landed, s3_server):
    """(client, catalog URI, answers before compaction: the Hive read, no catalog)."""
    before = answers(s3_server.endpoint, None)
    assert before[0] and len(before[0]) == len(HOSTS) * len(DAYS)
    return (*s3_landed, before)


def iceberg_table(catalog_uri: str, endpoint: str, name: str):
    """Plain pyiceberg, no guardian code: the catalog and the store, as another engine opens them."""
    from pyiceberg.catalog.sql import SqlCatalog

    catalog = SqlCatalog("guardian", uri=catalog_uri, **{"s3.endpoint": endpoint, "s3.region": "us-east-1"})
    return catalog.load_table(("guardian", name))


def test_s3_compaction_through_the_catalog_keeps_rows_answers_and_evolves_the_schema(s3_dataset, s3_server):
    client, catalog, before = s3_dataset
    endpoint = s3_server.endpoint
    files_before = len(landed(client))
    assert answers(endpoint, catalog) == before  # nothing compacted yet: the landed files alone
    report = compact(URL, older_than_days=1, today=TODAY, catalog_uri=catalog, endpoint_url=endpoint)
    assert (report.partitions, report.files_before, report.files_after) == (PARTITIONS, files_before, PARTITIONS)
    assert landed(client) == [], "every landed run file moved into the Iceberg tables"
    assert not [k for k in keys(client) if f"/{LEDGER_DIR}/" in k], "no ledger left once the keys are gone"
    assert answers(endpoint, catalog) == before

    # What Spark, Trino or Athena do through the catalog: a plain pyiceberg scan, no guardian code.
    table = iceberg_table(catalog, endpoint, "loadavg")
    rows = table.scan().to_arrow()
    counts = sorted(rows.group_by(["host", "date"]).aggregate([("runnable", "sum"), ("runnable", "count")])
                    .select(["host", "date", "runnable_count", "runnable_sum"]).to_pylist(),
                    key=lambda row: (row["host"], row["date"]))
    assert [(r["host"], str(r["date"]), r["runnable_count"], r["runnable_sum"]) for r in counts] == \
        [(host, day, n, runnable) for host, day, n, _, runnable in before[0]]
    assert [f.name for f in table.spec().fields] == ["date", "host"]
    data_files = [task.file for task in table.scan().plan_files()]
    assert len(data_files) == len(HOSTS) * len(DAYS)
    first = pq.ParquetFile(landing_file(data_files[0].file_path, endpoint))
    assert first.metadata.row_group(0).column(0).compression == "ZSTD"
    assert first.metadata.row_group(0).column(0).statistics is not None

    # A newer agent lands a run with an extra column: queried at once, then compacted into the
    # partition's one file, the table's schema evolved (older rows NULL), nothing doubled.
    day, host = DAYS[0], HOSTS[0]
    newer = pa.table({"ts_ns": [1, 2], "load1": [0.5, 0.25], "runnable": [7, 9], "run_id": ["newer"] * 2,
                      "steal_pct": [1.5, 2.5]})
    sink = pa.BufferOutputStream()
    pq.write_table(newer, sink)
    client.put_object(Bucket=BUCKET, Key=f"guardian/table=loadavg/date={day}/host={host}/newer.parquet",
                      Body=sink.getvalue().to_pybytes())
    question = "SELECT count(*), sum(runnable), sum(steal_pct), count(steal_pct) FROM loadavg"
    total = sum(row[2] for row in before[0]), sum(row[4] for row in before[0])
    expected = [(total[0] + 2, total[1] + 16, 4.0, 2)]
    assert run_query(URL, question, endpoint_url=endpoint, catalog_uri=catalog)[1] == expected
    again = compact(URL, older_than_days=1, today=TODAY, catalog_uri=catalog, endpoint_url=endpoint)
    assert (again.partitions, again.files_before, again.files_after) == (1, 2, 1)  # landed + the old file
    assert run_query(URL, question, endpoint_url=endpoint, catalog_uri=catalog)[1] == expected
    table = iceberg_table(catalog, endpoint, "loadavg")
    assert "steal_pct" in table.schema().column_names
    assert len(list(table.scan().plan_files())) == len(HOSTS) * len(DAYS), "still one file per partition"
    assert compact(URL, today=TODAY, catalog_uri=catalog, endpoint_url=endpoint).partitions == 0


def landing_file(uri: str, endpoint: str):
    from agent.fleet.query import s3_filesystem

    return s3_filesystem(endpoint, None).open_input_file(uri.split("://", 1)[1])


def test_compaction_killed_before_or_after_its_commit_loses_nothing_and_doubles_nothing(
        s3_dataset, s3_server, agent_cli, tmp_path):
    client, catalog, before = s3_dataset
    config = tmp_path / "config.toml"
    config.write_text(f'[dataset]\nroot = "{URL}"\ns3_endpoint_url = "{s3_server.endpoint}"\n'
                      f'iceberg_catalog = "{catalog}"\n')
    for point in ("iceberg-before-commit", "iceberg-after-commit"):
        killed = agent_cli("compact", "--config", str(config), "--older-than", "0",
                           env={"GUARDIAN_AGENT_KILL_AT": f"compact:{point}"}, timeout=120)
        assert killed.returncode == -9, killed.stderr
        # What a reader sees right after the crash: before the commit, the landed files (the new
        # data files are referenced by no snapshot); after it, the first batch's Iceberg rows and
        # the landed rest, the batch's landed keys hidden by its ledger: every row exactly once.
        assert answers(s3_server.endpoint, catalog) == before, point
    finished = compact(URL, older_than_days=0, today=TODAY, catalog_uri=catalog, endpoint_url=s3_server.endpoint)
    # The kill after the commit came at the first batch (one table): only the other one is left.
    assert (finished.recovered, finished.partitions) == (1, PARTITIONS // 2)
    assert landed(client) == [] and answers(s3_server.endpoint, catalog) == before
    answer = agent_cli("query", "--config", str(config), "--format", "json",
                       "SELECT host, count(*) AS n FROM loadavg GROUP BY host ORDER BY host", timeout=120)
    assert answer.returncode == 0, answer.stderr
    per_host = {}
    for host, _, n, _, _ in before[0]:
        per_host[host] = per_host.get(host, 0) + n
    assert json.loads(answer.stdout) == [{"host": h, "n": n} for h, n in sorted(per_host.items())]


def test_a_concurrent_compactor_wins_the_commit_and_ours_plans_again(s3_dataset, s3_server, monkeypatch):
    """Two compactors on one table: the other commits while ours is about to; the catalog's check
    refuses ours, which lists again, skips what the other took and commits the rest."""
    client, catalog, before = s3_dataset
    endpoint = s3_server.endpoint
    original = compact_module.kill_point
    raced = []

    def other_compactor_first(name):
        if name == "iceberg-before-commit" and not raced:
            raced.append(name)
            report = compact(URL, older_than_days=0, today=TODAY, catalog_uri=catalog, endpoint_url=endpoint)
            raced.append(report.partitions)
        original(name)

    monkeypatch.setattr(compact_module, "kill_point", other_compactor_first)
    report = compact(URL, older_than_days=0, today=TODAY, catalog_uri=catalog, endpoint_url=endpoint)
    assert raced == ["iceberg-before-commit", PARTITIONS]  # the other one did everything first
    assert report.partitions == 0 and landed(client) == []
    assert answers(endpoint, catalog) == before


def test_a_query_racing_a_compaction_plans_again_and_counts_each_row_once(s3_dataset, s3_server, monkeypatch):
    """The compactor commits and deletes the landed files between the query's listing and its
    reads: the read fails, the query lists again and finds the rows in the new snapshot."""
    from agent.fleet import iceberg

    client, catalog, before = s3_dataset
    endpoint = s3_server.endpoint
    original = iceberg.load_table
    raced = []

    def compaction_right_after_the_listing(*args):
        if not raced:
            raced.append(True)
            compact(URL, older_than_days=0, today=TODAY, catalog_uri=catalog, endpoint_url=endpoint)
        return original(*args)

    monkeypatch.setattr(iceberg, "load_table", compaction_right_after_the_listing)
    assert run_query(URL, QUESTIONS[0], endpoint_url=endpoint, catalog_uri=catalog)[1] == before[0]
    assert raced and landed(client) == []


def test_a_local_dataset_compacts_through_the_catalog_too(tmp_path, seeded):
    root = tmp_path / "dataset"
    shutil.copytree(seeded, root)
    before = [run_query(str(root), question)[1] for question in QUESTIONS]
    catalog = f"sqlite:///{tmp_path}/catalog.db"
    report = compact(str(root), older_than_days=0, today=TODAY, catalog_uri=catalog)
    assert report.partitions == PARTITIONS and not list(root.glob("table=*/*/*/*.parquet"))
    assert [run_query(str(root), question, catalog_uri=catalog)[1] for question in QUESTIONS] == before


def test_a_bad_catalog_is_one_line_and_exit_2_before_anything_changes(s3_landed, s3_server, agent_cli, tmp_path):
    client, _ = s3_landed
    untouched = keys(client)
    config = tmp_path / "config.toml"
    config.write_text(f'[dataset]\nroot = "{URL}"\ns3_endpoint_url = "{s3_server.endpoint}"\n')
    absent = f"sqlite:///{tmp_path}/absent/catalog.db"
    for args, says in ((["compact", "--catalog", "mysql://user:s3cret@db/x"], "expected a sqlite"),
                       (["query", "--catalog", absent, "SELECT 1"], "does not exist or is not writable")):
        done = agent_cli(args[0], "--config", str(config), *args[1:], timeout=60)
        assert done.returncode == 2, done.stderr
        assert done.stderr.count("\n") == 1 and says in done.stderr and "Traceback" not in done.stderr
        assert "s3cret" not in done.stderr, "a catalog password never reaches the output"
    endpoint = s3_server.endpoint
    for bad, says in ((absent, "does not exist or is not writable"), ("sqlite:///relative.db", "absolute path"),
                      ("postgresql://u:s3cret@127.0.0.1:1/x", "driver|cannot open")):
        with pytest.raises(BadInput, match=says) as raised:
            compact(URL, older_than_days=0, today=TODAY, catalog_uri=bad, endpoint_url=endpoint)
        assert "s3cret" not in str(raised.value)
    with pytest.raises(BadInput, match=r"dataset\.iceberg_catalog: expected a sqlite"):
        parse_config('[dataset]\niceberg_catalog = "oracle://x"\n')
    with pytest.raises(BadInput, match="S3 has no atomic multi-object swap.*--catalog"):
        compact(URL, endpoint_url=endpoint)
    assert keys(client) == untouched


@pytest.mark.live
def test_a_postgresql_catalog_as_a_fleet_shares_it(s3_dataset, s3_server):
    """The fleet's catalog: a real PostgreSQL 15 on loopback with a password role. `compact`
    commits through it; a second, independent catalog client (what Spark or Trino open through
    Iceberg's JdbcCatalog, whose tables these are) reads the same rows."""
    from tests.pg_server import PgServer, postgres_available

    reason = postgres_available()
    if reason:
        pytest.skip(f"POSTGRESQL CATALOG TEST SKIPPED: {reason}")
    client, _, before = s3_dataset
    password = "iceberg-s3cret-pw"
    with PgServer(statement_logging=False) as server:
        server.psql(f"CREATE ROLE iceberg_catalog LOGIN PASSWORD '{password}'")
        server.psql("CREATE DATABASE iceberg OWNER iceberg_catalog")
        catalog = f"postgresql+psycopg2://iceberg_catalog:{password}@127.0.0.1:{server.port}/iceberg"
        report = compact(URL, older_than_days=0, today=TODAY, catalog_uri=catalog, endpoint_url=s3_server.endpoint)
        assert report.partitions == PARTITIONS and landed(client) == []
        assert answers(s3_server.endpoint, catalog) == before
        rows = iceberg_table(catalog, s3_server.endpoint, "loadavg").scan().to_arrow()
        assert rows.num_rows == sum(row[2] for row in before[0])
        # The rows a JdbcCatalog reads: one per table, pointing at its current metadata file on S3.
        pointers = server.psql("SELECT catalog_name, table_namespace, table_name, metadata_location "
                               "FROM iceberg_tables ORDER BY table_name", database="iceberg").split()
        assert [line.split("|")[:3] for line in pointers] == [["guardian", "guardian", "loadavg"],
                                                              ["guardian", "guardian", "runs"]]
        assert all(line.split("|")[3].startswith(f"{URL}/_iceberg/") for line in pointers)
        with pytest.raises(BadInput, match="cannot open the catalog") as wrong:
            compact(URL, catalog_uri=catalog.replace(password, "wrong-pw"), endpoint_url=s3_server.endpoint)
        assert password not in str(wrong.value) and "wrong-pw" not in str(wrong.value)
