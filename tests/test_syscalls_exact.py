"""Live: the syscalls probe is exact under load and never drops silently.

Oracle for exactness: /proc/PID/io's syscr/syscw (the kernel's own read/write call counters),
read while the dd storms are stopped (SIGSTOP), so both ends of the measurement are quiescent.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from probes.base import ProbeConfig, Window
from probes.syscalls import SyscallsProbe, summarize

WINDOW_S = 2.5

SPAWNER = """
import subprocess, sys
for _ in range(int(sys.argv[1])):
    subprocess.run(["/bin/true"])
"""


def io_counters(pid: int) -> tuple[int, int]:
    fields = dict(line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return int(fields["syscr"]), int(fields["syscw"])


def stop_all(processes: list[subprocess.Popen]) -> None:
    """SIGSTOP and wait until each is really stopped (state T): no call in flight after this."""
    for process in processes:
        os.kill(process.pid, signal.SIGSTOP)
    for process in processes:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
            assert time.monotonic() < deadline, "dd did not stop"
            time.sleep(0.001)


def migrate_until(stop: threading.Event, pids: list[int]) -> int:
    """Flip each dd to a random CPU every ~2 ms (forced migration mid-storm); returns the flips."""
    cpus = sorted(os.sched_getaffinity(0))
    flips = 0
    while not stop.wait(0.002):
        for pid in pids:
            try:
                os.sched_setaffinity(pid, {random.choice(cpus)})
                flips += 1
            except OSError:
                pass
    return flips


def window_counts(tables: dict, pid: int) -> tuple[int, int]:
    counts = {row["syscall"]: row["count"] for row in summarize(tables["syscalls"]) if row["pid"] == pid}
    return counts.get("read", 0), counts.get("write", 0)


@pytest.mark.live
@pytest.mark.timeout(120)
def test_live_dd_storms_on_every_cpu_with_migration_are_counted_exactly():
    """One `dd bs=1` per CPU, started before the window and flipped between CPUs every ~2 ms, over
    two back-to-back windows of a probe watching the whole host: in each window a dd's read and
    write counts differ by at most one per window edge, and the two windows together hold
    exactly the calls /proc/PID/io counted."""
    storms = [subprocess.Popen(["dd", "if=/dev/zero", "of=/dev/null", "bs=1"], stderr=subprocess.DEVNULL)
              for _ in range(os.cpu_count() or 1)]
    probe = SyscallsProbe(ProbeConfig())
    stop = threading.Event()
    try:
        probe.check()
        time.sleep(0.2)  # the storms are running before the probe exists
        stop_all(storms)
        before = {process.pid: io_counters(process.pid) for process in storms}
        probe.prepare()  # opens the first window
        probe.keep_attached_between_windows()
        # A real host's map holds thousands of pid x syscall rows (1,269 in a 3 s audit of this
        # VM): short-lived children fill it the same way, so reading it takes as long as there.
        subprocess.run([sys.executable, "-c", SPAWNER, "400"], check=True, timeout=60)
        flips: list[int] = []
        mover = threading.Thread(target=lambda: flips.append(migrate_until(stop, [p.pid for p in storms])))
        for process in storms:
            os.kill(process.pid, signal.SIGCONT)
        mover.start()
        first = probe.collect(Window(WINDOW_S, Path("/tmp")))

        def stop_storms_then_end(window: Window) -> None:
            time.sleep(WINDOW_S)
            stop.set()
            mover.join(10)
            stop_all(storms)
            window.stop()

        second_window = Window(60, Path("/tmp"))
        ender = threading.Thread(target=stop_storms_then_end, args=(second_window,))
        ender.start()
        second = probe.collect(second_window)
        ender.join(30)
        after = {process.pid: io_counters(process.pid) for process in storms}
    finally:
        stop.set()
        probe.close()
        for process in storms:
            process.kill()
            os.kill(process.pid, signal.SIGCONT)
            process.wait(10)
    assert flips and flips[0] > 100, "the storms were not migrated"
    for process in storms:
        pid = process.pid
        reads = [window_counts(tables, pid)[0] for tables in (first, second)]
        writes = [window_counts(tables, pid)[1] for tables in (first, second)]
        assert min(reads) > 10_000, (reads, "the storm did not run in both windows")
        for read, write in zip(reads, writes):
            assert abs(read - write) <= 2, (pid, reads, writes)
        oracle_reads = after[pid][0] - before[pid][0]
        oracle_writes = after[pid][1] - before[pid][1]
        assert sum(reads) == oracle_reads and sum(writes) == oracle_writes, (
            pid, reads, writes, oracle_reads, oracle_writes)
    assert not probe.partial and probe.status_reason == ""


@pytest.mark.live
@pytest.mark.timeout(120)
def test_live_small_map_overflows_and_the_run_is_partial_never_ok(tmp_path):
    """A deliberately small histogram map (64 rows per CPU) and 1,500 short-lived children: the
    audit's status is `partial` with the dropped count in its reason, the summary and a finding."""
    out = tmp_path / "bundle"
    spawner = subprocess.Popen([sys.executable, "-c", SPAWNER, "1500"])
    try:
        result = subprocess.run(
            [sys.executable, "-m", "agent.cli", "audit", "--probes", "syscalls", "--duration", "3",
             "--syscalls-max-rows", "64", "--out", str(out)],
            capture_output=True, text=True, timeout=100, cwd=Path(__file__).resolve().parents[1])
    finally:
        spawner.kill()
        spawner.wait(10)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format"] == 2
    record = next(probe for probe in manifest["probes"] if probe["name"] == "syscalls")
    assert record["status"] == "partial", record
    dropped = int(record["reason"].split(" calls not recorded")[0].replace(",", ""))
    assert dropped > 1000, record["reason"]
    assert "syscalls  partial" in result.stdout and record["reason"] in result.stdout
    import pyarrow.parquet as pq

    findings = pq.read_table(out / "findings.parquet").to_pylist()
    capacity = [row for row in findings if row["probe"] == "syscalls" and row["subject"] == "probe capacity"]
    assert capacity and f"{dropped:,} calls not recorded" in capacity[0]["message"]
    # The rows it did keep fit the configured map: at most 64 pid x syscall rows per CPU.
    assert pq.read_table(out / "syscalls.parquet").num_rows <= 64 * os.cpu_count()
