"""The jitter probe's second native meter: rt-tests' cyclictest (timer wakeup latency).

oslat measures how long a busy CPU is taken away; cyclictest measures how late a sleeping
real-time thread wakes up on a timer: the path a trading thread that blocks (epoll, futex,
clock_nanosleep) takes every time. One thread per measured CPU, pinned there, SCHED_FIFO, wakes
every CYCLICTEST_INTERVAL_US; each wakeup's lateness is one sample in 1 us buckets.

Choices, with rt-tests 2.x in mind:
- `--default-system`: cyclictest otherwise writes 0 to /dev/cpu_dma_latency for the run (no deep
  C-states), i.e. it measures a tuned host, not this one. The audit measures the host as it is
  (pm_qos is a tuning item of its own, `tune experiment` can measure its effect).
- `-h 1000` buckets of 1 us up to 1 ms; wakeups later than that are counted as overflows and land
  in the last bucket (1000), as oslat's last bucket holds its overflows; the max is exact.
- `-N` (ns output) is not used: cyclictest 2.40 drops the histogram with it. The histogram's
  1 us is the resolution; the row says so (resolution_ns).
- Overhead: one wakeup per interval per CPU (a few us of CPU each), not a busy CPU as with oslat.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from core import children
from core.host import format_cpu_list

CYCLICTEST_INTERVAL_US = 200
CYCLICTEST_PRIORITY = 80  # above ordinary RT services, below the kernel's own (watchdog, migration 99)
HISTOGRAM_US = 1000
RESOLUTION_NS = 1000


def cyclictest_command(cpus: list[int], duration_s: int, json_path: str) -> list[str]:
    return ["cyclictest", "--quiet", "--default-system", "--mlockall",
            "--affinity", format_cpu_list(cpus), "--threads", str(len(cpus)),
            "--priority", str(CYCLICTEST_PRIORITY), "--policy", "fifo",
            "--interval", str(CYCLICTEST_INTERVAL_US), "--distance", "0",
            "--histogram", str(HISTOGRAM_US), "--duration", str(max(1, int(duration_s))),
            f"--json={json_path}"]


def cyclictest_rows(report: dict, threshold_ns: int) -> tuple[list[dict], list[dict]]:
    """cyclictest's --json report -> (jitter rows, histogram rows), one row per measured CPU.

    The gap columns hold the wakeup latencies above the threshold (bucket k holds latencies in
    [k, k+1) us, so it counts when k us reaches the threshold; percentiles read the bucket's value,
    max is exact). lost_pct stays null: a late wakeup is not time taken from a busy loop."""
    from probes.jitter import histogram_gap_quantiles

    rows, buckets = [], []
    duration_s = _report_duration_s(report)
    for thread in report.get("thread", {}).values():
        histogram = sorted((int(us), int(n)) for us, n in thread.get("histogram", {}).items())
        cycles = int(thread.get("cycles", 0))
        overflows = cycles - sum(n for _, n in histogram)
        if overflows > 0:
            histogram.append((HISTOGRAM_US, overflows))
        gaps = [(us, n) for us, n in histogram if us * 1000 >= threshold_ns]
        gap_count = sum(n for _, n in gaps)
        row = {"cpu": int(thread["cpu"]), "meter": "cyclictest", "resolution_ns": RESOLUTION_NS,
               "duration_ns": int(duration_s * 1e9) if duration_s else None, "threshold_ns": threshold_ns,
               "iterations": cycles, "loop_ns_mean": None,
               "gap_count": gap_count, "gap_total_ns": sum(us * 1000 * n for us, n in gaps),
               "lost_pct": None, "gap_p50_ns": None, "gap_p99_ns": None, "gap_p999_ns": None,
               "gap_max_ns": int(thread.get("max", 0)) * 1000 if gap_count else None,
               "wakeup_avg_ns": float(thread["avg"]) * 1000 if thread.get("avg") is not None else None,
               "wakeup_min_ns": int(thread["min"]) * 1000 if thread.get("min") is not None else None}
        if gap_count:
            row.update(histogram_gap_quantiles(gaps))
        rows.append(row)
        buckets += [{"cpu": row["cpu"], "meter": "cyclictest", "bucket_us": us, "count": n} for us, n in histogram]
    return rows, buckets


def _report_duration_s(report: dict) -> float | None:
    """From the command line cyclictest echoes (its JSON has only second-resolution times)."""
    words = str(report.get("cmdline:", report.get("cmdline", ""))).split()
    for index, word in enumerate(words[:-1]):
        if word in ("--duration", "-D"):
            try:
                return float(words[index + 1])
            except ValueError:
                return None
    return None


def run_cyclictest(cpus: list[int], duration_s: int, threshold_ns: int, workdir: str) -> tuple[list[dict], list[dict]]:
    json_path = os.path.join(workdir, f"cyclictest-{os.getpid()}.json")
    try:
        done = children.run(cyclictest_command(cpus, duration_s, json_path), capture_output=True, text=True,
                            timeout=duration_s + 30)
        if done.returncode != 0 or not os.path.exists(json_path):
            raise RuntimeError(f"cyclictest failed: {(done.stderr or done.stdout).strip()[-300:]}")
        return cyclictest_rows(json.loads(Path(json_path).read_text()), threshold_ns)
    finally:
        Path(json_path).unlink(missing_ok=True)
