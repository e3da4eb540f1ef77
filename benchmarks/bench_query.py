"""Benchmark: `guardian-agent query` vs DuckDB reading the same files directly, by fleet size.

The dataset is made here: one real `collect` run of this host (host, syscalls and tcp probes),
whose files are then laid out again under H hosts × 30 days (hard links, so 1,000 hosts cost no
disk), the layout `collect` writes for a fleet with --runs-per-day timer runs per host per day. Nothing is kept.

Side by side, whole process each (python start-up included on both sides, pyperf command):
- `SELECT 1`: the fixed cost of `query` (the issue's 35 s at 1,000 hosts);
- a count per host over `syscalls`: ours against a python -c that runs the same read_parquet
  (hive_partitioning, union_by_name: the same semantics as the dataset's views) in DuckDB;
- the same count after `compact` (one file per partition), for both.

    python benchmarks/bench_query.py [--hosts 10,100,1000] [--days 30] [--processes 3]

Writes benchmarks/results/query.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import date, timedelta
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(PROJECT))

from benchmarks.bench_pglog import pyperf_command  # noqa: E402

COUNT_SQL = "SELECT host, count(*) AS n FROM syscalls GROUP BY host"


def seed_run(work: Path) -> Path:
    config = work / "config.toml"
    config.write_text('[collect]\nprobes = ["host", "syscalls", "tcp"]\nduration_s = 2\n')
    seed = work / "seed"
    subprocess.run([sys.executable, "-m", "agent.cli", "collect", "--config", str(config), "--dataset", str(seed)],
                   check=True, cwd=PROJECT, capture_output=True)
    return seed


def lay_out(seed: Path, root: Path, hosts: int, days: int, runs_per_day: int) -> int:
    first_day = date(2026, 10, 1)
    files = 0
    for source in seed.glob("table=*/date=*/host=*/*.parquet"):
        for day in range(days):
            for host in range(hosts):
                target = root / source.parts[-4] / f"date={first_day + timedelta(days=day)}" / f"host=h{host:04d}"
                target.mkdir(parents=True, exist_ok=True)
                for run in range(runs_per_day):
                    os.link(source, target / f"run-{day}-{host}-{run}.parquet")
                    files += 1
    return files


def direct_command(root: Path) -> list[str]:
    pattern = root / "table=syscalls" / "*" / "*" / "*.parquet"
    code = ("import duckdb; c = duckdb.connect(); c.execute('SET enable_progress_bar=false'); "
            f"print(len(c.execute(\"SELECT host, count(*) FROM read_parquet('{pattern}', "
            "hive_partitioning=true, union_by_name=true) GROUP BY host\").fetchall()))")
    return [sys.executable, "-c", code]


def ours_command(root: Path, sql: str) -> list[str]:
    return [sys.executable, "-m", "agent.cli", "query", "--dataset", str(root), "--format", "csv", sql]


def measure(root: Path, label: str, processes: int) -> dict:
    def timed(name, command):
        return pyperf_command(name, command, RESULTS / f"query.{label}.{name}.pyperf.json", processes)

    result = {"select_1": timed("select1", ours_command(root, "SELECT 1")),
              "count_ours": timed("count-ours", ours_command(root, COUNT_SQL)),
              "count_direct": timed("count-direct", direct_command(root))}
    result["count_ratio"] = result["count_ours"]["mean_s"] / result["count_direct"]["mean_s"]
    return result


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hosts", default="10,100,1000")
    parser.add_argument("--days", type=int, default=30)
    parser.add_argument("--runs-per-day", type=int, default=2, help="timer runs per host per day")
    parser.add_argument("--processes", type=int, default=3)
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    results = {"days": args.days, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="bench-query-") as temp:
        work = Path(temp)
        seed = seed_run(work)
        for hosts in (int(text) for text in args.hosts.split(",")):
            root = work / f"hosts{hosts}"
            files = lay_out(seed, root, hosts, args.days, args.runs_per_day)
            entry = {"files": files, "raw": measure(root, f"{hosts}.raw", args.processes)}
            started = time.monotonic()
            subprocess.run([sys.executable, "-m", "agent.cli", "compact", "--dataset", str(root), "--older-than", "0"],
                           check=True, cwd=PROJECT, capture_output=True)
            entry["compact_s"] = time.monotonic() - started
            entry["compacted"] = measure(root, f"{hosts}.compacted", args.processes)
            results["sizes"][hosts] = entry
            print(f"{hosts:>5} hosts × {args.days} days, {files:,} files: SELECT 1 "
                  f"{entry['raw']['select_1']['mean_s']:.2f} s; count per host ours "
                  f"{entry['raw']['count_ours']['mean_s']:.2f} s vs DuckDB direct "
                  f"{entry['raw']['count_direct']['mean_s']:.2f} s ({entry['raw']['count_ratio']:.2f}x); "
                  f"compacted: {entry['compacted']['count_ours']['mean_s']:.2f} s vs "
                  f"{entry['compacted']['count_direct']['mean_s']:.2f} s ({entry['compacted']['count_ratio']:.2f}x)",
                  flush=True)
            shutil.rmtree(root)
    (RESULTS / "query.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
