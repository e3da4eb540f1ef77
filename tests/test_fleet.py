"""collect → Hive dataset → query, locally and through a real S3 server on loopback (moto)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from agent.config import parse_config
from core.errors import BadInput
from agent.fleet.collect import collect_once, upload_only
from agent.fleet.layout import stage_bundle
from agent.fleet.query import format_rows, run_query
from agent.fleet.spool import Spool, SpoolFull
from agent.fleet.stores import LocalStore, S3Store, StoreUnavailable
from probes.base import ProbeBase, rows_to_table

LOADAVG_SCHEMA = pa.schema([("ts_ns", pa.int64()), ("load1", pa.float64()), ("runnable", pa.int64())])


class LoadavgProbe(ProbeBase):
    """A real, cheap probe for the fleet tests: samples /proc/loadavg through the Host seam."""

    name = "loadavg"
    schema = LOADAVG_SCHEMA
    description = "load average samples (test probe)"
    finish_grace_s = 5.0
    rolling = True
    prepared = 0

    def prepare(self) -> None:
        type(self).prepared += 1

    def collect(self, window):
        rows = []
        while True:
            fields = self.host.read_text("/proc/loadavg").split()
            rows.append({"ts_ns": time.time_ns(), "load1": float(fields[0]),
                         "runnable": int(fields[3].split("/")[0])})
            if window.wait(0.1):
                break
        return {"loadavg": rows_to_table(rows, LOADAVG_SCHEMA)}


REGISTRY = (LoadavgProbe,)


def make_config(root, spool=None, extra: str = "", probes=("loadavg",)):
    text = f'[dataset]\nroot = "{root}"\n'
    if spool:
        text += f'spool_dir = "{spool}"\n'
    text += extra
    config = parse_config(text)
    # The test probe is not in the project registry, so it is set after validation.
    config.collect.probes = probes
    config.daemon.probes = probes
    return config


def test_collect_local_layout_is_hive_and_readable_by_every_reader(tmp_path):
    root = tmp_path / "dataset"
    config = make_config(root)
    first = collect_once(config, REGISTRY, duration_s=0.3)
    second = collect_once(config, REGISTRY, duration_s=0.3)
    assert not first.drain.error and first.drain.published_runs == [first.run_id]

    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()
                   and not p.relative_to(root).as_posix().startswith("_spool"))
    date = first.run_id[:4] + "-" + first.run_id[4:6] + "-" + first.run_id[6:8]
    host = first.result.manifest["host"]["hostname"]
    assert f"table=loadavg/date={date}/host={host}/{first.run_id}.parquet" in files
    assert f"table=runs/date={date}/host={host}/{second.run_id}.parquet" in files
    assert f"manifests/date={date}/host={host}/{first.run_id}.json" in files
    assert not any("findings" in f for f in files), "empty tables are not laid out"
    assert not list((root / "_spool" / "entries").iterdir()), "published runs leave the spool"

    rows_per_run = {o.run_id: o.result.manifest["tables"]["loadavg"] for o in (first, second)}
    # pyarrow.dataset, as a notebook would open it (the _spool dir is skipped by its prefix).
    dataset = ds.dataset(root / "table=loadavg", format="parquet", partitioning="hive")
    table = dataset.to_table()
    assert table.num_rows == sum(rows_per_run.values())
    assert set(table.column("host").to_pylist()) == {host}
    assert set(table.column("run_id").to_pylist()) == set(rows_per_run)

    columns, rows = run_query(str(root), "SELECT run_id, count(*) AS n, min(host) AS host, min(date) AS d "
                                         "FROM loadavg GROUP BY run_id ORDER BY run_id")
    assert columns == ["run_id", "n", "host", "d"]
    assert {row[0]: row[1] for row in rows} == rows_per_run
    assert str(rows[0][3]) == date
    _, runs = run_query(str(root), "SELECT probe, status FROM runs")
    assert runs == [("loadavg", "ok"), ("loadavg", "ok")]


def test_polars_reads_the_dataset_when_installed(tmp_path):
    polars = pytest.importorskip("polars", reason="polars not installed: SKIPPED polars reader check")
    root = tmp_path / "dataset"
    outcome = collect_once(make_config(root), REGISTRY, duration_s=0.2)
    frame = polars.scan_parquet(str(root / "table=loadavg" / "**" / "*.parquet"), hive_partitioning=True).collect()
    assert frame.height == outcome.result.manifest["tables"]["loadavg"]


def test_query_formats_and_errors(tmp_path):
    root = tmp_path / "dataset"
    collect_once(make_config(root), REGISTRY, duration_s=0.2)
    columns, rows = run_query(str(root), "SELECT probe, status FROM runs")
    as_json = json.loads(format_rows(columns, rows, "json"))
    assert as_json == [{"probe": "loadavg", "status": "ok"}]
    assert format_rows(columns, rows, "csv").splitlines() == ["probe,status", "loadavg,ok"]
    table = format_rows(columns, rows, "table").splitlines()
    assert table[0].split() == ["probe", "status"] and table[-1] == "(1 row)"
    # Every column type a bundle holds must come back, timestamps with time zones included.
    columns, rows = run_query(str(root), "SELECT * FROM runs")
    record = json.loads(format_rows(columns, rows, "json"))[0]
    assert record["started_at"].endswith("+00:00") and record["probe"] == "loadavg"
    assert format_rows(columns, rows, "table").splitlines()[-1] == "(1 row)"
    with pytest.raises(BadInput, match=r"query: .*nosuch.*\(tables: loadavg, runs\)"):
        run_query(str(root), "SELECT * FROM nosuch")
    with pytest.raises(BadInput, match="--dataset .*: no such directory"):
        run_query(str(tmp_path / "absent"), "SELECT 1")


def test_cli_collect_then_query(agent_cli, tmp_path):
    root = tmp_path / "dataset"
    config = tmp_path / "config.toml"
    config.write_text('[collect]\nprobes = ["host"]\nduration_s = 0.5\n')
    done = agent_cli("collect", "--config", str(config), "--dataset", str(root), timeout=90)
    assert done.returncode == 0, done.stderr
    assert "uploaded 1 run(s)" in done.stdout
    answer = agent_cli("query", "--dataset", str(root), "--format", "json",
                       "SELECT probe, count(DISTINCT run_id) AS runs FROM runs GROUP BY probe", timeout=60)
    assert answer.returncode == 0, answer.stderr
    assert json.loads(answer.stdout) == [{"probe": "host", "runs": 1}]
    bad = agent_cli("query", "--dataset", str(root), "SELEC nonsense", timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("guardian-agent: query: ")
    assert "Traceback" not in bad.stderr
    wrong = agent_cli("collect", "--dataset", "ftp://host/x", timeout=60)
    assert wrong.returncode == 2 and "--dataset: only local paths and s3://" in wrong.stderr


def test_spool_cap_policies(tmp_path):
    root = tmp_path / "dataset"
    spool_dir = tmp_path / "spool"
    config = make_config(root, spool_dir)
    # Three runs staged but not published, then a cap that fits about one of them.
    runs = [collect_once(config, REGISTRY, duration_s=0.2, upload=False).run_id for _ in range(3)]
    spool = Spool(spool_dir, max_bytes=1, policy="drop-oldest")
    one_run_bytes = Spool(spool_dir).size_bytes() // 3
    spool.max_bytes = int(one_run_bytes * 1.5)
    dropped = spool.enforce_cap(runs[-1])
    assert dropped == runs[:2]
    assert spool.ready_runs() == runs[-1:]
    assert [entry["run_id"] for entry in spool.dropped()] == runs[:2]

    strict = Spool(spool_dir, max_bytes=1, policy="refuse-new")
    with pytest.raises(SpoolFull, match="policy refuse-new"):
        strict.enforce_cap(runs[-1])
    assert strict.ready_runs() == []


def test_crash_mid_publish_sends_nothing_twice(tmp_path):
    root = tmp_path / "dataset"
    spool_dir = tmp_path / "spool"
    config = make_config(root, spool_dir)
    run_id = collect_once(config, REGISTRY, duration_s=0.2, upload=False).run_id
    spool = Spool(spool_dir)

    class FlakyStore(LocalStore):
        def put(self, obj, source):
            if self.put_count == 1:
                raise StoreUnavailable("store went away mid-run")
            super().put(obj, source)

    flaky = FlakyStore(root)
    report = spool.drain(flaky)
    assert report.error and flaky.put_count == 1 and spool.ready_runs() == [run_id]
    # Lose the journal too, as a crash between an upload and its journal line would.
    (spool_dir / "entries" / run_id / "published.txt").unlink()
    store = LocalStore(root)
    report = spool.drain(store)
    assert report.published_runs == [run_id] and report.already_there == 1
    assert store.put_count == report.uploaded_objects == 2  # loadavg sent once in all: runs + manifest now


def test_recover_stages_a_bundle_left_by_a_crash(tmp_path):
    root = tmp_path / "dataset"
    spool_dir = tmp_path / "spool"
    config = make_config(root, spool_dir)
    run_id = collect_once(config, REGISTRY, duration_s=0.2, upload=False).run_id
    entry = spool_dir / "entries" / run_id
    # Rebuild the state "bundle complete, not staged yet".
    (entry / "ready.json").unlink()
    staged = entry / "staged"
    bundle = entry / "bundle"
    bundle.mkdir()
    manifest = next(staged.rglob("*.json"))
    (bundle / "manifest.json").write_text(manifest.read_text())
    for parquet in staged.glob("table=*/**/*.parquet"):
        table_name = parquet.relative_to(staged).parts[0].split("=", 1)[1]
        if table_name != "runs":
            (bundle / f"{table_name}.parquet").write_bytes(parquet.read_bytes())
    spool = Spool(spool_dir)
    assert spool.recover() == [run_id]
    report = upload_only(config)
    assert report.published_runs == [run_id]
    _, rows = run_query(str(root), "SELECT count(DISTINCT run_id) FROM loadavg")
    assert rows == [(1,)]


# -- S3: a real S3 server on loopback (the s3_server fixture of conftest.py) ---------------------

def list_keys(store: S3Store) -> list[str]:
    paginator = store.client.get_paginator("list_objects_v2")
    keys = []
    for page in paginator.paginate(Bucket=store.bucket, Prefix=store.prefix + "/"):
        keys.extend(item["Key"] for item in page.get("Contents", []))
    return keys


def test_s3_round_trip_survives_an_outage_without_loss_or_duplicates(tmp_path, s3_server, agent_cli):
    url = "s3://fleet/guardian"
    config = make_config(url, tmp_path / "spool",
                         extra=f's3_endpoint_url = "{s3_server.endpoint}"\nspool_max_mb = 64\n')
    probe = S3Store(url, endpoint_url=s3_server.endpoint)
    probe.client.create_bucket(Bucket="fleet")

    first = collect_once(config, REGISTRY, duration_s=0.2)
    assert first.drain.published_runs == [first.run_id] and not first.drain.error
    assert first.drain.uploaded_objects == 3  # loadavg, runs, manifest

    s3_server.stop()
    started = time.monotonic()
    down = [collect_once(config, REGISTRY, duration_s=0.2) for _ in range(2)]
    assert time.monotonic() - started < 60, "an outage must not stall collection"
    assert all(o.drain.error and "unreachable" in o.drain.error for o in down)
    spool = Spool(tmp_path / "spool")
    assert spool.ready_runs() == [o.run_id for o in down], "the spool holds every run while the store is down"

    s3_server.start()
    report = upload_only(config)
    assert report.published_runs == [o.run_id for o in down] and not report.error
    assert report.already_there == 0 and spool.ready_runs() == []
    again = upload_only(config)
    assert again.published_runs == [] and again.uploaded_objects == 0

    keys = list_keys(probe)
    assert len(keys) == len(set(keys)) == 9
    all_runs = [first] + down
    assert sum(1 for k in keys if "/manifests/" in k) == 3
    columns, rows = run_query(url, "SELECT run_id, count(*) FROM loadavg GROUP BY run_id ORDER BY run_id",
                              endpoint_url=s3_server.endpoint)
    assert dict(rows) == {o.run_id: o.result.manifest["tables"]["loadavg"] for o in all_runs}
    _, hosts = run_query(url, "SELECT DISTINCT host, CAST(date AS VARCHAR) FROM runs",
                         endpoint_url=s3_server.endpoint)
    assert hosts == [(first.result.manifest["host"]["hostname"], first.run_id[:4] + "-" + first.run_id[4:6]
                      + "-" + first.run_id[6:8])]

    # The same through the CLI, configured by a config file (endpoint, spool), as on a host.
    config_file = tmp_path / "config.toml"
    config_file.write_text(f'[dataset]\nroot = "{url}"\ns3_endpoint_url = "{s3_server.endpoint}"\n'
                           f'spool_dir = "{tmp_path / "cli-spool"}"\n[collect]\nprobes = ["host"]\n')
    collected = agent_cli("collect", "--config", str(config_file), "--duration", "0.3", timeout=90)
    assert collected.returncode == 0 and "uploaded 1 run(s)" in collected.stdout, collected.stderr
    answer = agent_cli("query", "--config", str(config_file), "--format", "csv",
                       "SELECT count(DISTINCT run_id) AS runs FROM runs", timeout=90)
    assert answer.returncode == 0 and answer.stdout.split() == ["runs", "4"], answer.stderr


def test_stage_bundle_moves_partition_named_columns_aside(tmp_path):
    from reports.bundle import BundleWriter

    writer = BundleWriter(tmp_path / "bundle", run_id="20260101T000000Z-h-000000")
    writer.write_table("odd", pa.table({"host": ["a"], "value": [1]}), "test")
    writer.finish()
    objects = stage_bundle(tmp_path / "bundle", tmp_path / "staged")
    assert objects[-1].key.startswith("manifests/") and objects[-1].key.endswith(".json")
    odd = next(o for o in objects if o.key.startswith("table=odd/"))
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "staged" / odd.key)
    assert table.column_names == ["host_column", "value", "run_id"]
    assert Path(odd.key).name == "20260101T000000Z-h-000000.parquet"
