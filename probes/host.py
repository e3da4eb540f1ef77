"""host probe: per-CPU and host-wide counters sampled through the window (psutil + /proc).

Per-CPU time split comes from /proc/stat, context switches and run-queue wait per CPU from
/proc/schedstat, interrupts and softirqs per CPU from /proc/interrupts and /proc/softirqs, all
read through the Host seam so tests can feed a fake tree. psutil supplies memory, NIC and
per-process counters, which it already parses well on every kernel.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import ClassVar

import pyarrow as pa

from core.host import Host, format_cpu_list
from probes.base import ProbeBase, Window, finding, findings_table, rows_to_table

NAME = "host"
CPU_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")
TOTAL_CPU = -1

SCHEMA = pa.schema(
    [
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("cpu", pa.int32(), nullable=False),  # -1: host totals
        pa.field("interval_s", pa.float64()),
        pa.field("user_pct", pa.float64()),
        pa.field("nice_pct", pa.float64()),
        pa.field("system_pct", pa.float64()),
        pa.field("irq_pct", pa.float64()),
        pa.field("softirq_pct", pa.float64()),
        pa.field("steal_pct", pa.float64()),
        pa.field("iowait_pct", pa.float64()),
        pa.field("idle_pct", pa.float64()),
        pa.field("busy_pct", pa.float64()),
        pa.field("context_switches", pa.int64()),
        pa.field("runqueue_wait_ns", pa.int64()),
        pa.field("interrupts", pa.int64()),
        pa.field("softirqs", pa.int64()),
        pa.field("softirqs_net_rx", pa.int64()),
        pa.field("softirqs_timer", pa.int64()),
        pa.field("load1", pa.float64()),
        pa.field("procs_running", pa.int64()),
        pa.field("procs_blocked", pa.int64()),
        pa.field("mem_total_bytes", pa.int64()),
        pa.field("mem_available_bytes", pa.int64()),
        pa.field("swap_used_bytes", pa.int64()),
        pa.field("swap_in_bytes", pa.int64()),
        pa.field("swap_out_bytes", pa.int64()),
    ]
)

NICS_SCHEMA = pa.schema(
    [
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("nic", pa.string(), nullable=False),
        pa.field("interval_s", pa.float64()),
        pa.field("rx_bytes", pa.int64()),
        pa.field("tx_bytes", pa.int64()),
        pa.field("rx_packets", pa.int64()),
        pa.field("tx_packets", pa.int64()),
        pa.field("rx_errors", pa.int64()),
        pa.field("tx_errors", pa.int64()),
        pa.field("rx_dropped", pa.int64()),
        pa.field("tx_dropped", pa.int64()),
    ]
)

PROCESSES_SCHEMA = pa.schema(
    [
        pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("pid", pa.int32(), nullable=False),
        pa.field("comm", pa.string()),
        pa.field("interval_s", pa.float64()),
        pa.field("threads", pa.int32()),
        pa.field("cpu_affinity", pa.string()),
        pa.field("cpu_pct", pa.float64()),
        pa.field("voluntary_switches", pa.int64()),
        pa.field("involuntary_switches", pa.int64()),
        pa.field("rss_bytes", pa.int64()),
        pa.field("last_cpu", pa.int32()),
    ]
)


# ---- pure parsers (fed recorded /proc text by the tests) ----------------------------------------

def parse_proc_stat(text: str) -> dict:
    """/proc/stat -> {"cpus": {cpu: {field: ticks}}, "total": {...}, "ctxt", "intr", ...}."""
    out: dict = {"cpus": {}, "total": {}}
    for line in text.splitlines():
        parts = line.split()
        if not parts:
            continue
        key = parts[0]
        if key.startswith("cpu"):
            ticks = {name: int(value) for name, value in zip(CPU_FIELDS, parts[1:9])}
            if key == "cpu":
                out["total"] = ticks
            else:
                out["cpus"][int(key[3:])] = ticks
        elif key in ("ctxt", "procs_running", "procs_blocked", "btime", "processes"):
            out[key] = int(parts[1])
        elif key == "intr":
            out["intr"] = int(parts[1])
        elif key == "softirq":
            out["softirq"] = int(parts[1])
    return out


def parse_schedstat(text: str) -> dict[int, dict]:
    """/proc/schedstat (version 15+): per CPU, schedule() calls and time tasks waited to run.

    cpuN fields: yld_count, legacy, sched_count, sched_goidle, ttwu_count, ttwu_local,
    rq_cpu_time (ns), rq_run_delay (ns), pcount.
    """
    out: dict[int, dict] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 10 and parts[0].startswith("cpu") and parts[0][3:].isdigit():
            out[int(parts[0][3:])] = {"sched_count": int(parts[3]), "run_delay_ns": int(parts[8])}
    return out


def parse_per_cpu_table(text: str) -> tuple[list[int], dict[str, list[int]]]:
    """/proc/interrupts or /proc/softirqs -> (cpu ids, {line label: per-CPU counts})."""
    lines = text.splitlines()
    if not lines:
        return [], {}
    cpus = [int(name[3:]) for name in lines[0].split() if name.startswith("CPU")]
    rows: dict[str, list[int]] = {}
    for line in lines[1:]:
        if ":" not in line:
            continue
        label, rest = line.split(":", 1)
        fields = rest.split()
        counts = []
        for value in fields[: len(cpus)]:
            if not value.isdigit():
                break
            counts.append(int(value))
        if len(counts) < len(cpus):
            continue  # ERR:/MIS: lines carry one total, not per-CPU counts
        rows[label.strip()] = counts
    return cpus, rows


@dataclass
class Snapshot:
    monotonic: float
    wall: float
    stat: dict
    schedstat: dict[int, dict]
    interrupts: tuple[list[int], dict[str, list[int]]]
    softirqs: tuple[list[int], dict[str, list[int]]]
    load1: float = 0.0
    memory: dict | None = None
    swap: dict | None = None
    # Per-CPU context switches from perf software events, when /proc/schedstat is missing.
    switches: dict[int, int] | None = None


def _pct(delta: dict, field: str, total: int) -> float:
    return 100.0 * delta.get(field, 0) / total if total > 0 else 0.0


def cpu_interval_rows(before: Snapshot, after: Snapshot) -> list[dict]:
    """Rows for one sampling interval: each CPU plus the host totals (cpu = -1)."""
    interval = after.monotonic - before.monotonic
    ts = int(after.wall * 1_000_000)
    rows = []
    irq_cpus, irq_before = before.interrupts
    _, irq_after = after.interrupts
    soft_cpus, soft_before = before.softirqs
    _, soft_after = after.softirqs

    def per_cpu_delta(cpus, old, new, cpu, labels=None):
        if cpu not in cpus:
            return None
        index = cpus.index(cpu)
        total = 0
        for label, counts in new.items():
            if labels is not None and label not in labels:
                continue
            previous = old.get(label)
            if previous is not None and index < len(counts) and index < len(previous):
                total += max(0, counts[index] - previous[index])
        return total

    cpu_ids = sorted(after.stat["cpus"])
    for cpu in [TOTAL_CPU, *cpu_ids]:
        new = after.stat["total"] if cpu == TOTAL_CPU else after.stat["cpus"].get(cpu)
        old = before.stat["total"] if cpu == TOTAL_CPU else before.stat["cpus"].get(cpu)
        if new is None or old is None:
            continue
        delta = {field: max(0, new[field] - old.get(field, 0)) for field in new}
        total_ticks = sum(delta.values())
        row = {"ts": ts, "cpu": cpu, "interval_s": interval}
        for field in CPU_FIELDS:
            row[f"{field}_pct"] = _pct(delta, field, total_ticks)
        # From integer ticks: 100 - idle% - iowait% in floats gave -1.4e-14 on an idle CPU (1 idle
        # + 2 iowait ticks), outside 0..100 for anyone who checks the range.
        busy_ticks = max(0, total_ticks - delta.get("idle", 0) - delta.get("iowait", 0))
        row["busy_pct"] = _pct({"busy": busy_ticks}, "busy", total_ticks)
        if cpu == TOTAL_CPU:
            row["context_switches"] = max(0, after.stat.get("ctxt", 0) - before.stat.get("ctxt", 0))
            row["interrupts"] = max(0, after.stat.get("intr", 0) - before.stat.get("intr", 0))
            row["softirqs"] = max(0, after.stat.get("softirq", 0) - before.stat.get("softirq", 0))
            sched_old = before.schedstat
            row["runqueue_wait_ns"] = sum(
                max(0, values["run_delay_ns"] - sched_old.get(c, values)["run_delay_ns"])
                for c, values in after.schedstat.items()) if after.schedstat else None
            row["softirqs_net_rx"] = sum(per_cpu_delta(soft_cpus, soft_before, soft_after, c, {"NET_RX"}) or 0
                                         for c in cpu_ids)
            row["softirqs_timer"] = sum(per_cpu_delta(soft_cpus, soft_before, soft_after, c, {"TIMER", "HRTIMER"}) or 0
                                        for c in cpu_ids)
            row["load1"] = after.load1
            row["procs_running"] = after.stat.get("procs_running")
            row["procs_blocked"] = after.stat.get("procs_blocked")
            if after.memory:
                row["mem_total_bytes"] = after.memory.get("total")
                row["mem_available_bytes"] = after.memory.get("available")
            if after.swap:
                row["swap_used_bytes"] = after.swap.get("used")
                if before.swap:
                    row["swap_in_bytes"] = max(0, after.swap.get("sin", 0) - before.swap.get("sin", 0))
                    row["swap_out_bytes"] = max(0, after.swap.get("sout", 0) - before.swap.get("sout", 0))
        else:
            sched_new, sched_old = after.schedstat.get(cpu), before.schedstat.get(cpu)
            if sched_new and sched_old:
                row["context_switches"] = max(0, sched_new["sched_count"] - sched_old["sched_count"])
                row["runqueue_wait_ns"] = max(0, sched_new["run_delay_ns"] - sched_old["run_delay_ns"])
            elif after.switches and before.switches and cpu in after.switches and cpu in before.switches:
                row["context_switches"] = max(0, after.switches[cpu] - before.switches[cpu])
            row["interrupts"] = per_cpu_delta(irq_cpus, irq_before, irq_after, cpu)
            row["softirqs"] = per_cpu_delta(soft_cpus, soft_before, soft_after, cpu)
            row["softirqs_net_rx"] = per_cpu_delta(soft_cpus, soft_before, soft_after, cpu, {"NET_RX"})
            row["softirqs_timer"] = per_cpu_delta(soft_cpus, soft_before, soft_after, cpu, {"TIMER", "HRTIMER"})
        rows.append(row)
    return rows


def nic_interval_rows(before: dict, after: dict, interval_s: float, wall: float) -> list[dict]:
    """psutil.net_io_counters(pernic=True) dicts (as plain dicts) -> per-NIC deltas."""
    ts = int(wall * 1_000_000)
    rows = []
    names = {"bytes_recv": "rx_bytes", "bytes_sent": "tx_bytes", "packets_recv": "rx_packets",
             "packets_sent": "tx_packets", "errin": "rx_errors", "errout": "tx_errors",
             "dropin": "rx_dropped", "dropout": "tx_dropped"}
    for nic, new in sorted(after.items()):
        old = before.get(nic)
        if old is None:
            continue
        row = {"ts": ts, "nic": nic, "interval_s": interval_s}
        for source, column in names.items():
            row[column] = max(0, new[source] - old[source])
        rows.append(row)
    return rows


def host_findings(host_rows: list[dict], isolated: list[int], process_rows: list[dict]) -> list[dict]:
    """Turn the sampled rows into findings (means over the window per CPU)."""
    out: list[dict] = []
    per_cpu: dict[int, list[dict]] = {}
    for row in host_rows:
        per_cpu.setdefault(row["cpu"], []).append(row)

    def mean(rows, column):
        values = [r[column] for r in rows if r.get(column) is not None]
        return sum(values) / len(values) if values else 0.0

    for cpu, rows in sorted(per_cpu.items()):
        if cpu == TOTAL_CPU:
            continue
        softirq = mean(rows, "softirq_pct") + mean(rows, "irq_pct")
        busy = mean(rows, "busy_pct")
        steal = mean(rows, "steal_pct")
        if softirq >= 20:
            out.append(finding(
                NAME, "critical" if softirq >= 50 else "warning", f"cpu{cpu}",
                f"{softirq:.0f}% of CPU {cpu} spent in interrupt and softirq handling",
                "spread NIC queues (RSS/RPS) and IRQ affinity away from latency-critical cores; "
                "consider busy polling (net.core.busy_poll) to move work out of softirq",
            ))
        if busy >= 90 and cpu not in isolated:
            out.append(finding(
                NAME, "warning", f"cpu{cpu}", f"CPU {cpu} saturated: {busy:.0f}% busy on average",
                "find the consumer (syscalls/stacks probes) or move it off shared cores",
            ))
        if steal >= 5:
            out.append(finding(
                NAME, "warning", f"cpu{cpu}", f"{steal:.1f}% steal time on CPU {cpu}",
                "the hypervisor is running other guests on this core: use dedicated/pinned vCPUs",
            ))
        interval = sum(r.get("interval_s") or 0 for r in rows)
        wait_ns = sum(r.get("runqueue_wait_ns") or 0 for r in rows)
        if interval > 0 and wait_ns / interval >= 100_000_000:
            out.append(finding(
                NAME, "warning", f"cpu{cpu}",
                f"runnable tasks waited {wait_ns / interval / 1e6:.0f} ms per second for CPU {cpu}",
                "too many runnable threads for this core: reduce thread count or pin hot threads",
            ))
        if cpu in isolated and interval > 0:
            interrupts = sum(r.get("interrupts") or 0 for r in rows) / interval
            if interrupts >= 100:
                out.append(finding(
                    NAME, "warning", f"cpu{cpu}",
                    f"isolated CPU {cpu} takes {interrupts:.0f} interrupts/s",
                    "move IRQ affinity off isolated cores and boot with nohz_full "
                    "(`guardian-agent tune plan --profile cpu-isolation`)",
                ))
    totals = per_cpu.get(TOTAL_CPU, [])
    if totals:
        last = totals[-1]
        if (last.get("swap_used_bytes") or 0) > 0:
            swapped = sum((r.get("swap_in_bytes") or 0) + (r.get("swap_out_bytes") or 0) for r in totals)
            out.append(finding(
                NAME, "warning" if swapped else "info", "memory",
                f"{last['swap_used_bytes'] / 2**20:.0f} MiB of swap in use"
                + (f", {swapped / 2**20:.1f} MiB moved during the window" if swapped else ""),
                "latency-critical processes should never page: mlockall() them, lower vm.swappiness",
            ))
        total = last.get("mem_total_bytes") or 0
        available = last.get("mem_available_bytes") or 0
        if total and available / total < 0.10:
            out.append(finding(
                NAME, "warning", "memory", f"only {100 * available / total:.0f}% of memory available",
                "memory pressure triggers reclaim stalls: free memory or add RAM",
            ))
    by_pid: dict[int, list[dict]] = {}
    for row in process_rows:
        by_pid.setdefault(row["pid"], []).append(row)
    for pid, rows in by_pid.items():
        interval = sum(r.get("interval_s") or 0 for r in rows)
        involuntary = sum(r.get("involuntary_switches") or 0 for r in rows)
        if interval > 0 and involuntary / interval >= 100:
            out.append(finding(
                NAME, "warning", f"{rows[-1]['comm']}[{pid}]",
                f"preempted {involuntary / interval:.0f} times/s (involuntary context switches)",
                "pin the process to isolated cores (taskset/cpuset) so other tasks cannot preempt it",
            ))
    return out


# ---- the I/O shell --------------------------------------------------------------------------------

def take_snapshot(host: Host, switch_counter=None) -> Snapshot:
    import psutil

    stat = parse_proc_stat(host.read_text("/proc/stat"))
    schedstat = parse_schedstat(host.read_optional("/proc/schedstat"))
    interrupts = parse_per_cpu_table(host.read_optional("/proc/interrupts"))
    softirqs = parse_per_cpu_table(host.read_optional("/proc/softirqs"))
    loadavg = host.read_optional("/proc/loadavg", "0 0 0").split()
    memory = psutil.virtual_memory()._asdict() if host.is_real else None
    swap = psutil.swap_memory()._asdict() if host.is_real else None
    switches = switch_counter.read() if switch_counter is not None else None
    return Snapshot(time.monotonic(), time.time(), stat, schedstat, interrupts, softirqs,
                    float(loadavg[0]) if loadavg else 0.0, memory, swap, switches)


def nic_counters(host: Host) -> dict:
    if not host.is_real:
        return {}
    import psutil

    return {nic: counters._asdict() for nic, counters in psutil.net_io_counters(pernic=True).items()}


class ProcessSampler:
    def __init__(self, pids: tuple[int, ...]):
        import psutil

        self.processes = {}
        for pid in pids:
            try:
                process = psutil.Process(pid)
                process.cpu_percent(None)  # prime the counter
                self.processes[pid] = process
            except psutil.Error:
                continue
        self.previous: dict[int, tuple[int, int]] = {}

    def sample(self, interval_s: float, wall: float) -> list[dict]:
        import psutil

        rows = []
        for pid, process in list(self.processes.items()):
            try:
                with process.oneshot():
                    switches = process.num_ctx_switches()
                    previous = self.previous.get(pid)
                    self.previous[pid] = (switches.voluntary, switches.involuntary)
                    if previous is None:
                        continue
                    rows.append({
                        "ts": int(wall * 1_000_000), "pid": pid, "comm": process.name(),
                        "interval_s": interval_s, "threads": process.num_threads(),
                        "cpu_affinity": format_cpu_list(process.cpu_affinity()),
                        "cpu_pct": process.cpu_percent(None),
                        "voluntary_switches": switches.voluntary - previous[0],
                        "involuntary_switches": switches.involuntary - previous[1],
                        "rss_bytes": process.memory_info().rss, "last_cpu": process.cpu_num(),
                    })
            except psutil.Error:
                self.processes.pop(pid, None)  # exited mid-window: keep what we have
        return rows


class HostProbe(ProbeBase):
    name: ClassVar[str] = NAME
    schema: ClassVar[pa.Schema] = SCHEMA
    extra_schemas: ClassVar[dict[str, pa.Schema]] = {"host_nics": NICS_SCHEMA, "host_processes": PROCESSES_SCHEMA}
    description: ClassVar[str] = "per-CPU time split, context switches, IRQs/softirqs, memory, NICs (psutil + /proc)"
    finish_grace_s: ClassVar[float] = 10.0

    def check(self) -> None:
        from core.errors import Unavailable

        if not self.host.exists("/proc/stat"):
            raise Unavailable(f"{self.host.path('/proc/stat')} not readable: is /proc mounted?")

    def collect(self, window: Window) -> dict[str, pa.Table]:
        interval = float(self.option("interval_s"))
        # Never fewer than two samples: a short window still yields one interval.
        interval = min(interval, max(window.duration_s / 2, 0.05))
        processes = ProcessSampler(self.config.pids) if self.config.pids and self.host.is_real else None
        switch_counter = None
        if self.host.is_real and not self.host.exists("/proc/schedstat"):
            from probes.perf_counters import PerCpuCounter

            try:
                switch_counter = PerCpuCounter(self.host.online_cpus())
            except OSError as error:
                self.status_reason = f"no per-CPU context switches: no /proc/schedstat and {error}"
        try:
            return self._sample(window, interval, processes, switch_counter)
        finally:
            if switch_counter is not None:
                switch_counter.close()

    def _sample(self, window, interval, processes, switch_counter) -> dict[str, pa.Table]:
        host_rows: list[dict] = []
        nic_rows: list[dict] = []
        process_rows: list[dict] = []
        before = take_snapshot(self.host, switch_counter)
        nics_before = nic_counters(self.host)
        if processes:
            processes.sample(0.0, before.wall)
        while True:
            over = window.wait(interval)
            after = take_snapshot(self.host, switch_counter)
            elapsed = after.monotonic - before.monotonic
            if elapsed >= 0.01:
                host_rows.extend(cpu_interval_rows(before, after))
                nics_after = nic_counters(self.host)
                nic_rows.extend(nic_interval_rows(nics_before, nics_after, elapsed, after.wall))
                nics_before = nics_after
                if processes:
                    process_rows.extend(processes.sample(elapsed, after.wall))
                before = after
            if over:
                break
        findings = host_findings(host_rows, self.host.isolated_cpus(), process_rows)
        tables = {
            NAME: rows_to_table(host_rows, SCHEMA),
            "host_nics": rows_to_table(nic_rows, NICS_SCHEMA),
            "findings": findings_table(findings),
        }
        if self.config.pids:
            tables["host_processes"] = rows_to_table(process_rows, PROCESSES_SCHEMA)
        return tables

    @staticmethod
    def headlines(tables: dict[str, pa.Table]) -> list[str]:
        table = tables.get(NAME)
        if table is None or table.num_rows == 0:
            return []
        per_cpu: dict[int, list[dict]] = {}
        for row in table.to_pylist():
            per_cpu.setdefault(row["cpu"], []).append(row)

        def mean(rows, column):
            values = [r[column] for r in rows if r.get(column) is not None]
            return sum(values) / len(values) if values else 0.0

        def rate(rows, column):
            seconds = sum(r["interval_s"] or 0 for r in rows)
            return sum(r.get(column) or 0 for r in rows) / seconds if seconds else 0.0

        cpus = {cpu: rows for cpu, rows in per_cpu.items() if cpu != TOTAL_CPU}
        lines = ["Busiest CPUs (mean over the window):"]
        for cpu, rows in sorted(cpus.items(), key=lambda item: mean(item[1], "busy_pct"), reverse=True)[:3]:
            lines.append(f"  cpu{cpu}: {mean(rows, 'busy_pct'):.1f}% busy (user {mean(rows, 'user_pct'):.1f}%, "
                         f"system {mean(rows, 'system_pct'):.1f}%, irq+softirq "
                         f"{mean(rows, 'irq_pct') + mean(rows, 'softirq_pct'):.1f}%, steal {mean(rows, 'steal_pct'):.1f}%)")
        totals = per_cpu.get(TOTAL_CPU, [])
        parts = []
        if any(r.get("context_switches") is not None for rows in cpus.values() for r in rows):
            cpu, rows = max(cpus.items(), key=lambda item: rate(item[1], "context_switches"))
            parts.append(f"most context switches: cpu{cpu} {rate(rows, 'context_switches'):,.0f}/s")
        elif totals:
            parts.append(f"context switches: {rate(totals, 'context_switches'):,.0f}/s host-wide "
                         "(no per-CPU split: kernel without /proc/schedstat)")
        if any(r.get("interrupts") is not None for rows in cpus.values() for r in rows):
            parts.append("most interrupts: " + ", ".join(
                f"cpu{cpu} {rate(rows, 'interrupts'):,.0f}/s" for cpu, rows in
                sorted(cpus.items(), key=lambda item: rate(item[1], "interrupts"), reverse=True)[:2]))
        if parts:
            lines.append("  " + "; ".join(parts))
        return lines
