"""syscalls probe: per process x syscall latency histograms from eBPF, aggregated in the kernel.

BCC on the raw_syscalls tracepoints plus sched:sched_switch (see syscalls.c for the method).
Only tracepoints are used: many hardened or custom kernels (this one included) have no kprobes.
Output table `syscalls`: one row per pid x syscall x non-empty log2 latency bucket, with the
pid x syscall totals repeated on each row so a single filter gives both views.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, ClassVar, Iterable

import pyarrow as pa

from agent.errors import Unavailable
from probes.base import ProbeBase, ProbeConfig, Window, finding, findings_table, rows_to_table
from probes.bpf import bpf_prerequisites, compile_program

NAME = "syscalls"
BPF_SOURCE = Path(__file__).with_name("syscalls.c")
BUCKETS = 36
HIST_MAX_ROWS = 16384
PARKED_MAX = 65536

SCHEMA = pa.schema(
    [
        pa.field("pid", pa.int32(), nullable=False),
        pa.field("comm", pa.string()),
        pa.field("syscall", pa.string(), nullable=False),
        pa.field("syscall_nr", pa.int32(), nullable=False),
        pa.field("count", pa.int64(), nullable=False),
        pa.field("total_ns", pa.int64(), nullable=False),
        pa.field("max_ns", pa.int64(), nullable=False),
        pa.field("p50_ns", pa.int64()),
        pa.field("p99_ns", pa.int64()),
        pa.field("bucket_lo_ns", pa.int64(), nullable=False),
        pa.field("bucket_hi_ns", pa.int64(), nullable=False),
        pa.field("bucket_count", pa.int64(), nullable=False),
    ]
)

# Calls whose job is to wait (for data, a timer, a lock, a child): a long max is their normal
# behaviour, so they do not get "fat tail" findings.
WAITING_SYSCALLS = frozenset(
    """accept accept4 clock_nanosleep epoll_pwait epoll_pwait2 epoll_wait futex futex_waitv
    io_getevents io_pgetevents io_uring_enter msgrcv nanosleep pause poll ppoll pselect6 read readv
    recvfrom recvmmsg recvmsg rt_sigsuspend rt_sigtimedwait select semop semtimedop sigsuspend
    wait4 waitid connect flock fsync fdatasync sync syncfs sync_file_range msync sendfile
    splice tee vmsplice pread64 preadv preadv2 copy_file_range execve execveat exit exit_group""".split()
)

FAT_TAIL_RATIO = 1000
FAT_TAIL_MIN_MAX_NS = 1_000_000
FAT_TAIL_MIN_CALLS = 100


def bucket_bounds(slot: int) -> tuple[int, int]:
    """BCC's log2 slot k (from bpf_log2l) holds values in [2^(k-1), 2^k); slot 0 and 1 hold 0..1."""
    if slot <= 0:
        return 0, 1
    return (1 << slot) >> 1, (1 << slot)


def histogram_quantile(slots: list[int], quantile: float) -> int | None:
    """Upper bound of the bucket that holds `quantile` of the calls (a conservative estimate)."""
    total = sum(slots)
    if total == 0:
        return None
    target = quantile * total
    running = 0
    for slot, count in enumerate(slots):
        running += count
        if running >= target and count:
            return bucket_bounds(slot)[1]
    return bucket_bounds(len(slots) - 1)[1]


def merge_cpu_values(per_cpu: Iterable[dict]) -> dict:
    """Sum a per-CPU histogram row (count/total/slots add; max is the max; comm: first seen)."""
    merged = {"count": 0, "total_ns": 0, "max_ns": 0, "slots": [0] * BUCKETS, "comm": ""}
    for value in per_cpu:
        merged["count"] += value["count"]
        merged["total_ns"] += value["total_ns"]
        merged["max_ns"] = max(merged["max_ns"], value["max_ns"])
        for index, count in enumerate(value["slots"]):
            merged["slots"][index] += count
        if not merged["comm"] and value.get("comm"):
            merged["comm"] = value["comm"]
    return merged


def syscalls_rows(histograms: dict[tuple[int, int], dict], name_of: Callable[[int], str]) -> list[dict]:
    """Turn {(pid, syscall_nr): merged histogram} into table rows (one per non-empty bucket)."""
    rows = []
    for (pid, number), hist in sorted(histograms.items()):
        if hist["count"] <= 0:
            continue
        # A bucket's upper bound can exceed the largest value seen: clamp to the max.
        p50 = min(histogram_quantile(hist["slots"], 0.50), hist["max_ns"])
        p99 = min(histogram_quantile(hist["slots"], 0.99), hist["max_ns"])
        for slot, count in enumerate(hist["slots"]):
            if not count:
                continue
            low, high = bucket_bounds(slot)
            rows.append(
                {
                    "pid": pid, "comm": hist["comm"], "syscall": name_of(number), "syscall_nr": number,
                    "count": hist["count"], "total_ns": hist["total_ns"], "max_ns": hist["max_ns"],
                    "p50_ns": p50, "p99_ns": p99, "bucket_lo_ns": low, "bucket_hi_ns": high,
                    "bucket_count": count,
                }
            )
    return rows


def summarize(table: pa.Table) -> list[dict]:
    """One dict per pid x syscall (the bucket rows folded back)."""
    seen: dict[tuple[int, str], dict] = {}
    for row in table.select(["pid", "comm", "syscall", "count", "total_ns", "max_ns", "p50_ns", "p99_ns"]).to_pylist():
        seen.setdefault((row["pid"], row["syscall"]), row)
    return list(seen.values())


def syscall_findings(table: pa.Table, lost_rows: int = 0, lost_parked: int = 0,
                     duration_s: float = 1.0) -> list[dict]:
    out = []
    for row in summarize(table):
        if row["syscall"] in WAITING_SYSCALLS or row["count"] < FAT_TAIL_MIN_CALLS:
            continue
        median = max(row["p50_ns"] or 1, 1)
        if row["max_ns"] >= FAT_TAIL_MIN_MAX_NS and row["max_ns"] >= FAT_TAIL_RATIO * median:
            severity = "critical" if row["max_ns"] >= 10_000_000 else "warning"
            out.append(finding(
                NAME, severity, f"{row['comm']}[{row['pid']}] {row['syscall']}",
                f"max {format_ns(row['max_ns'])} is {row['max_ns'] // median}x its median "
                f"(≤{format_ns(median)}) over {row['count']} calls",
                "look for page faults, lock contention, memory reclaim or preemption on that CPU: "
                "pin the thread to an isolated core, pre-fault memory (mlockall) and check "
                "`guardian-agent audit --probes host,jitter`",
            ))
        rate = row["count"] / max(duration_s, 1e-9)
        if rate >= 200_000:
            out.append(finding(
                NAME, "info", f"{row['comm']}[{row['pid']}] {row['syscall']}",
                f"{rate:,.0f} calls/s", "batch the calls (sendmmsg/recvmmsg, io_uring) or busy-poll "
                "in user space to save the kernel entry cost",
            ))
    if lost_rows or lost_parked:
        out.append(finding(
            NAME, "warning", "probe capacity",
            f"{lost_rows} histogram updates and {lost_parked} in-flight syscalls were not recorded "
            "(BPF maps full)", "narrow the audit with --pid",
        ))
    return out


def format_ns(value: int | float | None) -> str:
    if value is None:
        return "-"
    value = float(value)
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f} ns"


RAW_TRACEPOINT_MACROS = {
    "SYSCALL_ENTER_PROBE": "RAW_TRACEPOINT_PROBE(sys_enter)",
    "SYSCALL_EXIT_PROBE": "RAW_TRACEPOINT_PROBE(sys_exit)",
    "SCHED_SWITCH_PROBE": "RAW_TRACEPOINT_PROBE(sched_switch)",
    "SYSCALL_ID": "ctx->args[1]",
}
CLASSIC_TRACEPOINT_MACROS = {
    "SYSCALL_ENTER_PROBE": "TRACEPOINT_PROBE(raw_syscalls, sys_enter)",
    "SYSCALL_EXIT_PROBE": "TRACEPOINT_PROBE(raw_syscalls, sys_exit)",
    "SCHED_SWITCH_PROBE": "TRACEPOINT_PROBE(sched, sched_switch)",
    "SYSCALL_ID": "args->id",
}


def build_source(pids: tuple[int, ...], self_tgid: int, raw_tracepoints: bool = True) -> str:
    source = BPF_SOURCE.read_text()
    if pids:
        condition = " && ".join(f"tgid != {int(pid)}" for pid in pids)
        pid_filter = f"if ({condition}) return 0;"
    else:
        pid_filter = ""
    for macro, text in (RAW_TRACEPOINT_MACROS if raw_tracepoints else CLASSIC_TRACEPOINT_MACROS).items():
        source = source.replace(macro, text)
    numbers = {name: number for number, name in _syscall_table().items()}
    source = (source.replace("SYS_EXIT_NR", str(numbers.get("exit", 0xFFFFFFFF)))
              .replace("SYS_EXIT_GROUP_NR", str(numbers.get("exit_group", 0xFFFFFFFF))))
    return (source.replace("PID_FILTER", pid_filter)
            .replace("SELF_TGID", str(int(self_tgid)))
            .replace("PARKED_MAX", str(PARKED_MAX))
            .replace("HIST_MAX", str(HIST_MAX_ROWS)))


class SyscallsProbe(ProbeBase):
    name: ClassVar[str] = NAME
    schema: ClassVar[pa.Schema] = SCHEMA
    description: ClassVar[str] = "eBPF syscall latency histograms per process (raw_syscalls tracepoints)"
    finish_grace_s: ClassVar[float] = 30.0
    tracepoints = ("raw_syscalls/sys_enter", "raw_syscalls/sys_exit", "sched/sched_switch")

    def __init__(self, config: ProbeConfig | None = None):
        super().__init__(config)
        self._bpf = None
        self.status_reason = ""

    def check(self) -> None:
        bpf_prerequisites(self.host, self.tracepoints)

    def prepare(self) -> None:
        import bcc

        raw = bool(bcc.BPF.support_raw_tracepoint())
        self.attach_mode = "raw tracepoints" if raw else "tracepoints"
        source = build_source(tuple(self.config.pids), os.getpid(), raw_tracepoints=raw)
        try:
            self._bpf = compile_program(source)
        except Exception as error:
            raise Unavailable(f"BPF program failed to load: {str(error).splitlines()[0]}") from None

    def collect(self, window: Window) -> dict[str, pa.Table]:
        if self._bpf is None:
            self.prepare()
        bpf = self._bpf
        try:
            window.wait()
            histograms, lost_rows, lost_parked = self._read_maps(bpf)
        finally:
            self.detach()
        for (pid, _number), hist in histograms.items():
            # The kernel side records the calling thread's name; the process name is what users
            # search for, so prefer it while the process is still alive.
            process_name = self.host.read_optional(f"/proc/{pid}/comm")
            if process_name:
                hist["comm"] = process_name
        rows = syscalls_rows(histograms, syscall_name)
        table = rows_to_table(rows, SCHEMA)
        findings = syscall_findings(table, lost_rows, lost_parked, window.elapsed())
        return {NAME: table, "findings": findings_table(findings)}

    def _read_maps(self, bpf) -> tuple[dict, int, int]:
        row_ids = bpf["row_ids"]
        hists = bpf["hists"]
        histograms: dict[tuple[int, int], dict] = {}
        for key, rows_per_cpu in row_ids.items():
            values = []
            for cpu, row_plus_one in enumerate(rows_per_cpu):
                if not row_plus_one:
                    continue  # this pid x syscall never ran on that CPU
                value = hists[hists.Key(row_plus_one - 1)][cpu]
                values.append({"count": value.count, "total_ns": value.total_ns, "max_ns": value.max_ns,
                               "slots": list(value.slots),
                               "comm": bytes(value.comm).split(b"\0", 1)[0].decode(errors="replace")})
            if values:
                histograms[(int(key.tgid), int(key.syscall_nr))] = merge_cpu_values(values)
        lost = bpf["lost"]
        lost_rows = sum(lost[lost.Key(0)])
        lost_parked = sum(lost[lost.Key(1)])
        return histograms, int(lost_rows), int(lost_parked)

    def detach(self) -> None:
        if self._bpf is not None:
            try:
                self._bpf.cleanup()
            finally:
                self._bpf = None

    abandon = detach

    @staticmethod
    def headlines(tables: dict[str, pa.Table]) -> list[str]:
        table = tables.get(NAME)
        if table is None or table.num_rows == 0:
            return []
        rows = summarize(table)
        lines = ["Top syscalls by total time:"]
        for row in sorted(rows, key=lambda r: r["total_ns"], reverse=True)[:5]:
            lines.append(f"  {row['comm']}[{row['pid']}] {row['syscall']}: {format_ns(row['total_ns'])} "
                         f"in {row['count']:,} calls (p50 ≤{format_ns(row['p50_ns'])}, max {format_ns(row['max_ns'])})")
        lines.append("Top syscalls by max latency (excluding calls that wait by design):")
        busy = [r for r in rows if r["syscall"] not in WAITING_SYSCALLS]
        for row in sorted(busy, key=lambda r: r["max_ns"], reverse=True)[:5]:
            lines.append(f"  {row['comm']}[{row['pid']}] {row['syscall']}: max {format_ns(row['max_ns'])} "
                         f"(p99 ≤{format_ns(row['p99_ns'])}, {row['count']:,} calls)")
        return lines


_syscall_names: dict[int, str] = {}


def _syscall_table() -> dict[int, str]:
    """This architecture's syscall numbers -> names (BCC ships the table per architecture)."""
    if not _syscall_names:
        try:
            from bcc.syscall import syscalls

            _syscall_names.update({int(k): v.decode() for k, v in syscalls.items()})
        except Exception:
            pass
    return _syscall_names


def syscall_name(number: int) -> str:
    return _syscall_table().get(number, f"syscall_{number}")
