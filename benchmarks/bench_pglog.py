"""Benchmark: `guardian-agent pg-log` vs pgBadger on the same PostgreSQL stderr log.

The log is made here, by this script: a throwaway PostgreSQL 15 server (tests/pg_server.py)
logs every statement (log_min_duration_statement = 0, prefix '%m [%p] %q%u@%d ') while pgbench
runs its default TPC-B-like script for a few seconds; that real log is then repeated, one day
later per copy, until the file is at least 115 MB (the size the issue quotes for pgBadger 12).
Nothing is committed: the file lives in a temp dir.

Then `python -m pyperf command` times both tools side by side in the same run, whole process
included (start-up, reading, writing the bundle / HTML report), and records their peak RSS.
Memory flatness: guardian-agent's peak RSS is also measured on half of the file.

    python benchmarks/bench_pglog.py [--quick] [--size-mb N] [--keep FILE]

Writes benchmarks/results/pglog.json (and pglog.*.pyperf.json).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
RESULTS = HERE / "results"
sys.path.insert(0, str(PROJECT))

from tests.pg_server import DEFAULT_PREFIX, PgServer, postgres_available  # noqa: E402

PGBADGER = shutil.which("pgbadger") or "/usr/bin/pgbadger"


def make_seed_log(seconds: int) -> bytes:
    with PgServer(statement_logging=True) as server:
        server.pgbench("-i", "-s", "2", "-q")
        server.pgbench("-c", "2", "-j", "2", "-T", str(seconds))
        server.mark_logs()
        return server.log_paths()["stderr"].read_bytes()


def synthesise(seed: bytes, path: Path, target_bytes: int) -> int:
    """Repeat the seed log, each copy moved one day later, until `target_bytes`."""
    dates = sorted(set(re.findall(rb"^(\d{4}-\d\d-\d\d) ", seed, re.M)))
    written, copy = 0, 0
    with open(path, "wb") as out:
        while written < target_bytes:
            block = seed
            for date in dates:
                day = dt.date.fromisoformat(date.decode()) + dt.timedelta(days=copy)
                block = block.replace(date + b" ", day.isoformat().encode() + b" ")
            out.write(block)
            written += len(block)
            copy += 1
    return written


def pyperf_command(name: str, command: list[str], output: Path, processes: int) -> dict:
    import pyperf

    output.unlink(missing_ok=True)
    subprocess.run([sys.executable, "-m", "pyperf", "command", "--quiet", "--name", name,
                    "-p", str(processes), "-n", "1", "-w", "0", "-l", "1", "-o", str(output), "--", *command],
                   check=True, cwd=PROJECT)
    benchmark = pyperf.Benchmark.load(str(output))
    values = benchmark.get_values()
    rss = benchmark.get_metadata().get("command_max_rss")
    return {"mean_s": benchmark.mean(), "values_s": list(values),
            "max_rss_bytes": int(rss) if rss else None}


def pgbadger_query_count(report: Path) -> int | None:
    match = re.search(r'class="figure">([\d,]+)</span> <span class="figure-label">Number of queries',
                      report.read_text(errors="replace"))
    return int(match.group(1).replace(",", "")) if match else None


def peak_rss_bytes(command: list[str]) -> int:
    process = subprocess.Popen(command, cwd=PROJECT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise RuntimeError(f"{command[:4]} failed with status {status}")
    return usage.ru_maxrss * 1024


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one run per tool instead of two")
    parser.add_argument("--size-mb", type=float, default=115.0, help="log size (default 115 MB)")
    parser.add_argument("--keep", type=Path, help="keep the generated log at this path")
    arguments = parser.parse_args()
    reason = postgres_available()
    if reason:
        print(f"bench_pglog: SKIPPED: {reason}", file=sys.stderr)
        return 1
    if not Path(PGBADGER).exists():
        print("bench_pglog: SKIPPED: pgbadger not installed (apt-get install pgbadger)", file=sys.stderr)
        return 1
    processes = 1 if arguments.quick else 2
    RESULTS.mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-pglog-"))
    try:
        started = time.monotonic()
        seed = make_seed_log(6 if arguments.quick else 10)
        log = work / "postgresql.log"
        size = synthesise(seed, log, int(arguments.size_mb * 1e6))
        half = work / "half.log"
        synthesise(seed, half, size // 2)
        entries = sum(1 for line in seed.split(b"\n") if line[:1].isdigit()) * (size // len(seed) + 1)
        print(f"log: {size / 1e6:.0f} MB (~{entries / 1e3:.0f}k entries) built in "
              f"{time.monotonic() - started:.0f} s from a {len(seed) / 1e6:.1f} MB pgbench log", flush=True)

        ours = [sys.executable, "-m", "agent.cli", "pg-log", str(log), "--out", str(work / "bundle")]
        # pyperf runs the command repeatedly: each run needs an empty --out, so wrap it.
        ours_wrapper = [sys.executable, "-c",
                        "import shutil, subprocess, sys; shutil.rmtree(sys.argv[1], ignore_errors=True); "
                        "sys.exit(subprocess.call(sys.argv[2:], stdout=subprocess.DEVNULL))",
                        str(work / "bundle"), *ours]
        badger = [PGBADGER, "--quiet", "--prefix", DEFAULT_PREFIX, "-o", str(work / "pgbadger.html"), str(log)]
        guardian = pyperf_command("pg-log", ours_wrapper, RESULTS / "pglog.guardian.pyperf.json", processes)
        pgbadger = pyperf_command("pgbadger", badger, RESULTS / "pglog.pgbadger.pyperf.json", processes)

        # Same answer as the peer tool? Executions counted by both on the same file.
        from reports.bundle import Bundle

        ours_counted = Bundle(work / "bundle").manifest["pg_log"]["durations_counted"]
        badger_counted = pgbadger_query_count(work / "pgbadger.html")
        print(f"executions counted: guardian-agent {ours_counted:,}, pgBadger {badger_counted:,}", flush=True)

        shutil.rmtree(work / "bundle", ignore_errors=True)
        rss_full = peak_rss_bytes(ours)
        shutil.rmtree(work / "bundle", ignore_errors=True)
        ours_half = [sys.executable, "-m", "agent.cli", "pg-log", str(half), "--out", str(work / "bundle")]
        rss_half = peak_rss_bytes(ours_half)
        bundle = Bundle(work / "bundle")
        counted_half = bundle.manifest["pg_log"]["durations_counted"]
        if arguments.keep:
            shutil.copyfile(log, arguments.keep)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    ratio = pgbadger["mean_s"] / guardian["mean_s"]
    summary = {
        "area": "pglog",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "kernel": platform.release(), "python": platform.python_version(),
                    "load_average": os.getloadavg()},
        "log_bytes": size,
        "log_entries_estimate": entries,
        "guardian_agent": {**guardian, "mb_per_s": size / 1e6 / guardian["mean_s"]},
        "pgbadger": {**pgbadger, "mb_per_s": size / 1e6 / pgbadger["mean_s"],
                     "version": subprocess.run([PGBADGER, "--version"], capture_output=True, text=True).stdout.strip()},
        "executions_counted": {"guardian_agent": ours_counted, "pgbadger": badger_counted,
                               "agree": ours_counted == badger_counted},
        "speedup_x": ratio,
        "target_speedup_x": 20.0,
        "memory": {"peak_rss_full_bytes": rss_full, "peak_rss_half_bytes": rss_half,
                   "growth_full_over_half": rss_full / rss_half, "durations_counted_half": counted_half},
        "runs_per_tool": processes,
    }
    (RESULTS / "pglog.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"guardian-agent pg-log: {guardian['mean_s']:.2f} s ({size / 1e6 / guardian['mean_s']:.0f} MB/s), "
          f"peak RSS {rss_full / 1e6:.0f} MB (half file: {rss_half / 1e6:.0f} MB)")
    print(f"pgBadger:              {pgbadger['mean_s']:.2f} s ({size / 1e6 / pgbadger['mean_s']:.1f} MB/s)")
    print(f"speed-up: {ratio:.1f}x (target >= 20x) -> {RESULTS / 'pglog.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
