"""Benchmark: pg-log's peak memory as the log grows and as its shapes multiply, before
and after, with pgBadger on the same files.

Logs are generated here (benchmarks/pglog_generate.py: Debian's default prefix, Zipf-like shape
frequencies, log-normal durations, 200 entries/s) into a temp dir and deleted at the end: one
1.6 GB log of 2,000 shapes whose first 400 MB and 100 MB (cut at a line end) are the smaller
sizes, and 100 MB logs of 20 and 200,000 shapes. Each run is a whole `guardian-agent pg-log`
process (start-up, reading, the bundle; --no-html) whose peak RSS comes from wait4(); pgBadger
12 (`--prefix '%m [%p] %q%u@%d '`, one job) runs on the three 100 MB files only (at 2-3 MB/s the
1.6 GB log alone would take ~10 minutes).

    python benchmarks/bench_pglog_memory.py [--baseline CHECKOUT] [--quick] [--part sizes|shapes]

--baseline runs the same files through another checkout (e.g. main before this change) so the
"before" column is measured in the same run. Writes benchmarks/results/pglog_memory.json (or
pglog_memory.<part>.json), after every row, so a run stopped early keeps what it measured.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
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

from benchmarks.pglog_generate import PREFIX_FORMAT, write_log  # noqa: E402

PGBADGER = shutil.which("pgbadger")
SIZES_MB = (100, 400, 1600)
SHAPES = (20, 2000, 200_000)


# Linux carries the parent's peak RSS into a forked (or vforked) child's ru_maxrss across exec,
# so a child started from this process (which held log data) would report at least that. A
# small launcher (a fresh Python, ~10 MB) starts the command and reports its children's peak.
_LAUNCHER = ("import resource, subprocess, sys; "
             "code = subprocess.call(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL); "
             "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def timed_peak_rss(command: list[str], env: dict | None = None, cwd: Path = PROJECT) -> tuple[float, int]:
    """(wall seconds, peak RSS bytes) of one whole process."""
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-c", _LAUNCHER, *command], cwd=cwd, env=env,
                            capture_output=True, text=True, check=True)
    seconds = time.monotonic() - started
    status, maxrss_kib = (int(field) for field in result.stdout.split())
    if status != 0:
        raise RuntimeError(f"{' '.join(command[:5])} ... failed with status {status}")
    return seconds, maxrss_kib * 1024


def pg_log_run(checkout: Path, log: Path, work: Path) -> dict:
    out = work / "bundle"
    shutil.rmtree(out, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(checkout))
    seconds, rss = timed_peak_rss([sys.executable, "-m", "agent.cli", "pg-log", str(log), "--out", str(out),
                                   "--no-html"], env=env, cwd=checkout)
    manifest = json.loads((out / "manifest.json").read_text())["pg_log"]
    shutil.rmtree(out, ignore_errors=True)
    return {"seconds": seconds, "peak_rss_bytes": rss, "mb_per_s": log.stat().st_size / 1e6 / seconds,
            "durations_counted": manifest["durations_counted"], "fingerprints": manifest["fingerprints"],
            "folded_shapes": manifest.get("folded_shapes"), "minute_bucket_s": manifest.get("minute_bucket_s")}


def pgbadger_run(log: Path, work: Path) -> dict:
    # Its own pid directory: pgBadger refuses to start while another run's /tmp/pgbadger.pid exists.
    seconds, rss = timed_peak_rss([PGBADGER, "--quiet", "--pid-dir", str(work), "--prefix", PREFIX_FORMAT,
                                   "-o", str(work / "pgbadger.html"), str(log)])
    return {"seconds": seconds, "peak_rss_bytes": rss, "mb_per_s": log.stat().st_size / 1e6 / seconds}


def cut_prefix(source: Path, target: Path, size_bytes: int) -> None:
    """The first size_bytes of source, ending at a line end (copied in 8 MB pieces)."""
    with open(source, "rb") as reader, open(target, "wb") as writer:
        left = size_bytes
        while left > 0:
            piece = reader.read(min(left, 8 << 20))
            if not piece:
                break
            left -= len(piece)
            if left <= 0:
                piece = piece[: piece.rfind(b"\n") + 1]
            writer.write(piece)


def measure(name: str, log: Path, work: Path, baseline: Path | None, with_pgbadger: bool) -> dict:
    row = {"log": name, "log_bytes": log.stat().st_size, "after": pg_log_run(PROJECT, log, work)}
    if baseline:
        row["before"] = pg_log_run(baseline, log, work)
    if with_pgbadger and PGBADGER:
        row["pgbadger"] = pgbadger_run(log, work)
        row["rss_vs_pgbadger_x"] = row["after"]["peak_rss_bytes"] / row["pgbadger"]["peak_rss_bytes"]
        row["speed_vs_pgbadger_x"] = row["pgbadger"]["seconds"] / row["after"]["seconds"]
    cells = [f"{name:>22}", f"{row['after']['peak_rss_bytes'] / 1e6:7.0f} MB", f"{row['after']['mb_per_s']:6.1f} MB/s"]
    if baseline:
        cells.append(f"before {row['before']['peak_rss_bytes'] / 1e6:5.0f} MB {row['before']['mb_per_s']:5.1f} MB/s")
    if "pgbadger" in row:
        cells.append(f"pgBadger {row['pgbadger']['peak_rss_bytes'] / 1e6:4.0f} MB {row['pgbadger']['mb_per_s']:4.1f} MB/s")
    print("  ".join(cells), flush=True)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="another checkout to measure on the same files (before)")
    parser.add_argument("--quick", action="store_true", help="sizes 100 and 400 MB only, no pgBadger")
    parser.add_argument("--part", choices=("sizes", "shapes"), help="only the size curve or the shape curve")
    parser.add_argument("--no-pgbadger", action="store_true", help="leave pgBadger out (it takes ~45 s per 100 MB)")
    arguments = parser.parse_args()
    if not PGBADGER:
        print("bench_pglog_memory: pgbadger not installed (apt-get install pgbadger): its column is left out",
              file=sys.stderr)
    sizes = SIZES_MB[:2] if arguments.quick else SIZES_MB
    RESULTS.mkdir(exist_ok=True)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="bench-pglog-memory-"))
    rows = []
    output = RESULTS / (f"pglog_memory.{arguments.part}.json" if arguments.part else "pglog_memory.json")

    def record(row: dict) -> None:
        rows.append(row)
        write_summary(output, arguments, rows, started)

    try:
        largest = work / f"shapes2000_{sizes[-1]}mb.log"
        if arguments.part == "shapes":
            sizes = ()
        generated = None if not sizes else write_log(largest, sizes[-1] * 1_000_000, 2000)
        if generated:
            print(f"generated {generated['bytes'] / 1e6:.0f} MB ({generated['entries']:,} entries, "
                  f"{generated['minutes']:,} minutes) in {time.monotonic() - started:.0f} s", flush=True)
        for size in sizes:
            log = largest if size == sizes[-1] else work / f"shapes2000_{size}mb.log"
            if log != largest:
                cut_prefix(largest, log, size * 1_000_000)
            record(measure(f"{size} MB, 2,000 shapes", log, work, arguments.baseline,
                           with_pgbadger=size == 100 and not (arguments.quick or arguments.no_pgbadger)))
            if log != largest:
                log.unlink()
        largest.unlink(missing_ok=True)
        for shapes in SHAPES if arguments.part != "sizes" else ():
            if shapes == 2000:  # the 100 MB row of the size curve
                continue
            log = work / f"shapes{shapes}_100mb.log"
            write_log(log, 100_000_000, shapes)
            record(measure(f"100 MB, {shapes:,} shapes", log, work, arguments.baseline,
                           with_pgbadger=not (arguments.quick or arguments.no_pgbadger)))
            log.unlink()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"-> {output} ({time.monotonic() - started:.0f} s)")
    return 0


def write_summary(output: Path, arguments, rows: list[dict], started: float) -> None:
    summary = {
        "area": "pglog_memory",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "kernel": platform.release(), "python": platform.python_version(),
                    "load_average": os.getloadavg()},
        "baseline": str(arguments.baseline) if arguments.baseline else None,
        "pgbadger": subprocess.run([PGBADGER, "--version"], capture_output=True, text=True).stdout.strip()
        if PGBADGER else None,
        "rows": rows,
        "seconds": time.monotonic() - started,
    }
    output.write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
