"""Benchmark: `compact --catalog` of an S3 dataset into Iceberg, and `query` before and after.

The dataset is one real `collect` run of this host (the `host` probe), laid out again as
H hosts × D days × R runs per day (what a timer on every host writes), uploaded to a real S3
server on loopback (moto's, in this process, as the tests use). In-process timings:
- `query` count per host of the `host` table, the Hive read (no catalog);
- `compact --catalog sqlite:///…` of everything: seconds, landed files before, data files after;
- the same count through the catalog after compaction (Iceberg snapshot + nothing landed).

    python benchmarks/bench_iceberg.py [--hosts 20] [--days 3] [--runs 8]

Writes benchmarks/results/iceberg.json. moto is much slower per request than a real S3 service
and shares this process's CPU: the figures are an upper bound for the request-bound parts.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

COUNT_SQL = "SELECT host, count(*) AS n FROM host GROUP BY host ORDER BY host"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def seed_run(work: Path) -> Path:
    from agent.config import parse_config
    from agent.fleet.collect import collect_once
    from probes import REGISTRY

    config = parse_config(f'[dataset]\nroot = "{work / "seed"}"\n[collect]\nprobes = ["host"]\n')
    collect_once(config, REGISTRY, duration_s=1.0)
    return work / "seed"


def upload(seed: Path, client, hosts: int, days: int, runs: int) -> int:
    sources = sorted(seed.glob("table=*/date=*/host=*/*.parquet"))
    count = 0
    for source in sources:
        body = source.read_bytes()
        for day in range(days):
            for host in range(hosts):
                for run in range(runs):
                    key = (f"guardian/{source.parts[-4]}/date=2026-10-{day + 1:02d}/host=h{host:04d}/"
                           f"r{run:03d}-{source.name}")
                    client.put_object(Bucket="fleet", Key=key, Body=body)
                    count += 1
    return count


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", type=int, default=20)
    parser.add_argument("--days", type=int, default=3)
    parser.add_argument("--runs", type=int, default=8)
    args = parser.parse_args()
    for key, value in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1"}.items():
        os.environ.setdefault(key, value)
    import boto3
    from moto.server import ThreadedMotoServer

    from agent.fleet.compact import compact
    from agent.fleet.query import run_query

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint, url = f"http://127.0.0.1:{port}", "s3://fleet/guardian"
    try:
        with tempfile.TemporaryDirectory() as work_text:
            work = Path(work_text)
            client = boto3.client("s3", endpoint_url=endpoint)
            client.create_bucket(Bucket="fleet")
            files = upload(seed_run(work), client, args.hosts, args.days, args.runs)
            catalog = f"sqlite:///{work}/catalog.db"
            started = time.perf_counter()
            before = run_query(url, COUNT_SQL, endpoint_url=endpoint)[1]
            hive_s = time.perf_counter() - started
            started = time.perf_counter()
            report = compact(url, older_than_days=0, today=date(2026, 12, 1), catalog_uri=catalog,
                             endpoint_url=endpoint)
            compact_s = time.perf_counter() - started
            started = time.perf_counter()
            after = run_query(url, COUNT_SQL, endpoint_url=endpoint, catalog_uri=catalog)[1]
            iceberg_s = time.perf_counter() - started
    finally:
        server.stop()
    result = {"hosts": args.hosts, "days": args.days, "runs_per_day": args.runs, "landed_files": files,
              "compact_s": round(compact_s, 2), "partitions": report.partitions,
              "files_before": report.files_before, "files_after": report.files_after, "rows": report.rows,
              "query_hive_s": round(hive_s, 2), "query_iceberg_s": round(iceberg_s, 2),
              "same_answer": before == after, "load_avg_1m": os.getloadavg()[0]}
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "iceberg.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0 if before == after else 1


if __name__ == "__main__":
    sys.exit(main())
