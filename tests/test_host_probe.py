"""host probe: parsers on recorded /proc text, interval arithmetic and findings on crafted
snapshots, and a live run on this machine."""

from __future__ import annotations

import pyarrow as pa
import pytest

from core.host import Host, format_cpu_list, parse_cpu_list
from probes.base import ProbeConfig, Window
from probes.host import (
    SCHEMA, HostProbe, Snapshot, cpu_interval_rows, host_findings, parse_per_cpu_table,
    parse_proc_stat, parse_schedstat,
)

STAT_BEFORE = """cpu  1000 0 1000 8000 0 0 0 0 0 0
cpu0 500 0 500 4000 0 0 0 0 0 0
cpu1 500 0 500 4000 0 0 0 0 0 0
intr 5000 0
ctxt 10000
btime 1700000000
processes 500
procs_running 2
procs_blocked 0
softirq 3000 0 0
"""
# Over one second (100 ticks per CPU): cpu0 idles, cpu1 spends 60 ticks in softirq, 30 in system.
STAT_AFTER = """cpu  1010 0 1030 8090 0 0 60 10 0 0
cpu0 505 0 500 4095 0 0 0 0 0 0
cpu1 505 0 530 4000 0 0 60 5 0 0
intr 5900 0
ctxt 12500
btime 1700000000
processes 510
procs_running 3
procs_blocked 1
softirq 4000 0 0
"""
SOFTIRQS_BEFORE = """                    CPU0       CPU1
          HI:          0          0
       TIMER:        100        100
      NET_RX:         10         10
"""
SOFTIRQS_AFTER = """                    CPU0       CPU1
          HI:          0          0
       TIMER:        200        150
      NET_RX:         10        900
"""
INTERRUPTS_BEFORE = """           CPU0       CPU1
 24:          1          0  IO-APIC   5-edge      ACPI:Ged
LOC:       1000       2000   Local timer interrupts
ERR:          0
"""
INTERRUPTS_AFTER = """           CPU0       CPU1
 24:          3          0  IO-APIC   5-edge      ACPI:Ged
LOC:       1100       2700   Local timer interrupts
ERR:          0
"""
SCHEDSTAT_BEFORE = """version 15
timestamp 4295000000
cpu0 0 0 1000 400 600 300 5000000000 2000000000 700
domain0 00000003 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0
cpu1 0 0 2000 800 900 500 6000000000 3000000000 900
"""
SCHEDSTAT_AFTER = """version 15
timestamp 4295000250
cpu0 0 0 1500 400 600 300 5000000000 2000000000 700
cpu1 0 0 4000 800 900 500 6000000000 3250000000 900
"""


def snapshot(stat, schedstat, interrupts, softirqs, at):
    return Snapshot(at, 1_700_000_000 + at, parse_proc_stat(stat), parse_schedstat(schedstat),
                    parse_per_cpu_table(interrupts), parse_per_cpu_table(softirqs), 1.5,
                    {"total": 1000, "available": 50}, {"used": 4096, "sin": 0, "sout": 8192})


def test_cpu_list_round_trip():
    assert parse_cpu_list("0-3,8,10-11") == [0, 1, 2, 3, 8, 10, 11]
    assert parse_cpu_list("0-6:2") == [0, 2, 4, 6]
    assert parse_cpu_list("") == []
    assert format_cpu_list([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


def test_parsers_on_recorded_proc_files(fixtures_dir):
    root = Host(fixtures_dir / "proc" / "recorded")
    stat = parse_proc_stat(root.read_text("/proc/stat"))
    assert sorted(stat["cpus"]) == [0, 1]
    assert stat["ctxt"] > 0 and stat["intr"] > 0
    assert set(stat["total"]) == {"user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"}
    cpus, interrupts = parse_per_cpu_table(root.read_text("/proc/interrupts"))
    assert cpus == [0, 1]
    assert "LOC" in interrupts and len(interrupts["LOC"]) == 2
    assert "ERR" not in interrupts  # a single total, not per-CPU counts
    cpus, softirqs = parse_per_cpu_table(root.read_text("/proc/softirqs"))
    assert {"TIMER", "NET_RX", "SCHED"} <= set(softirqs)


@pytest.mark.parametrize("idle_ticks,iowait_ticks", [(1, 2), (7, 3), (0, 5), (5, 0), (0, 0)])
def test_busy_share_stays_in_range_on_idle_cpus(idle_ticks, iowait_ticks):
    """An interval with only idle and iowait ticks is exactly 0% busy (float sums left -1.4e-14)."""
    line = "cpu  {u} 0 0 {i} {w} 0 0 0 0 0\ncpu0 {u} 0 0 {i} {w} 0 0 0 0 0\nctxt 1\nintr 1\n"
    before = snapshot(line.format(u=10, i=100, w=100), SCHEDSTAT_BEFORE, INTERRUPTS_BEFORE, SOFTIRQS_BEFORE, 10.0)
    after = snapshot(line.format(u=10, i=100 + idle_ticks, w=100 + iowait_ticks), SCHEDSTAT_AFTER,
                     INTERRUPTS_AFTER, SOFTIRQS_AFTER, 10.25)
    for row in cpu_interval_rows(before, after):
        assert row["busy_pct"] == 0.0, row


def test_interval_rows_split_time_per_cpu():
    before = snapshot(STAT_BEFORE, SCHEDSTAT_BEFORE, INTERRUPTS_BEFORE, SOFTIRQS_BEFORE, 10.0)
    after = snapshot(STAT_AFTER, SCHEDSTAT_AFTER, INTERRUPTS_AFTER, SOFTIRQS_AFTER, 11.0)
    after.swap = {"used": 4096, "sin": 0, "sout": 16384}
    rows = {row["cpu"]: row for row in cpu_interval_rows(before, after)}
    assert set(rows) == {-1, 0, 1}
    assert rows[1]["softirq_pct"] == pytest.approx(60.0)
    assert rows[1]["system_pct"] == pytest.approx(30.0)
    assert rows[1]["busy_pct"] == pytest.approx(100.0)
    assert rows[1]["steal_pct"] == pytest.approx(5.0)
    assert rows[0]["idle_pct"] == pytest.approx(95.0)
    assert rows[0]["context_switches"] == 500 and rows[1]["context_switches"] == 2000
    assert rows[1]["runqueue_wait_ns"] == 250_000_000
    assert rows[0]["interrupts"] == 102 and rows[1]["interrupts"] == 700
    assert rows[1]["softirqs_net_rx"] == 890 and rows[0]["softirqs_timer"] == 100
    assert rows[-1]["context_switches"] == 2500 and rows[-1]["interrupts"] == 900
    assert rows[-1]["procs_running"] == 3 and rows[-1]["swap_out_bytes"] == 8192
    table = pa.Table.from_pylist(list(rows.values()), schema=SCHEMA)
    assert table.num_rows == 3


def test_findings_name_the_softirq_cpu_and_memory():
    before = snapshot(STAT_BEFORE, SCHEDSTAT_BEFORE, INTERRUPTS_BEFORE, SOFTIRQS_BEFORE, 10.0)
    after = snapshot(STAT_AFTER, SCHEDSTAT_AFTER, INTERRUPTS_AFTER, SOFTIRQS_AFTER, 11.0)
    findings = host_findings(cpu_interval_rows(before, after), isolated=[1], process_rows=[])
    subjects = {(f["subject"], f["severity"]) for f in findings}
    assert ("cpu1", "critical") in subjects  # 60% softirq
    assert not any(f["subject"] == "cpu0" for f in findings)
    messages = " ".join(f["message"] for f in findings)
    assert "isolated CPU 1 takes 700 interrupts/s" in messages
    assert "waited 250 ms per second" in messages
    assert any(f["subject"] == "memory" and "swap" in f["message"] for f in findings)
    assert any(f["subject"] == "memory" and "5% of memory available" in f["message"] for f in findings)


def test_preempted_process_finding():
    rows = [{"pid": 42, "comm": "engine", "interval_s": 1.0, "involuntary_switches": 500}]
    findings = host_findings([], isolated=[], process_rows=rows)
    assert findings and findings[0]["subject"] == "engine[42]"


@pytest.mark.live
def test_live_host_probe_samples_every_cpu(tmp_path):
    import os

    probe = HostProbe(ProbeConfig(pids=(os.getpid(),), options={"interval_s": 0.25}))
    probe.check()
    tables = probe.collect(Window(1.0, tmp_path))
    host = tables["host"]
    assert host.schema.equals(SCHEMA)
    cpus = set(host.column("cpu").to_pylist())
    assert cpus == {-1, *range(os.cpu_count())}
    samples = host.num_rows // len(cpus)
    assert 3 <= samples <= 5
    totals = [r for r in host.to_pylist() if r["cpu"] == -1]
    assert all(r["mem_total_bytes"] > 0 for r in totals)
    assert all(0.0 <= r["busy_pct"] <= 100.0 for r in host.to_pylist())
    # Per-CPU context switches come from /proc/schedstat or, without it, perf software events.
    per_cpu = [r for r in host.to_pylist() if r["cpu"] >= 0]
    assert all(r["context_switches"] is not None for r in per_cpu), probe.status_reason
    assert sum(r["context_switches"] for r in per_cpu) > 0
    assert tables["host_nics"].num_rows >= samples  # at least loopback
    processes = tables["host_processes"].to_pylist()
    assert processes and processes[0]["pid"] == os.getpid() and processes[0]["rss_bytes"] > 0
