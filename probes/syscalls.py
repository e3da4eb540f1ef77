"""syscalls probe: per process x syscall latency histograms from eBPF, aggregated in the kernel.

BCC on the raw_syscalls tracepoints plus sched:sched_switch (see syscalls.c for the method).
Only tracepoints are used: many hardened or custom kernels (this one included) have no kprobes.
Output (bundle format 2): `syscalls`, one row per pid x syscall (count, total_ns, max_ns, p50/p99),
and `syscall_buckets`, one row per pid x syscall x non-empty log2 latency bucket. Format 1 had a
single table repeating the totals on every bucket row, so `sum(count)` overcounted.

Windows are exact: the kernel double-buffers the histograms and user space flips buffers at each
window edge (see `wait_for_programs`), so a call is in exactly one window. Anything the maps
could not hold is counted in the kernel and the run is `partial`, with the count in its reason.
"""

from __future__ import annotations

import ctypes
import os
import platform
import time
from pathlib import Path
from typing import Callable, ClassVar, Iterable

import numpy as np
import pyarrow as pa

from core.errors import Unavailable
from probes.base import ProbeBase, ProbeConfig, Window, finding, findings_table, rows_to_table
from probes.bpf import LoadedProgram, bpf_prerequisites, compile_program, lookup_batch, possible_cpu_count

NAME = "syscalls"
BPF_SOURCE = Path(__file__).with_name("syscalls.c")
BUCKETS = 36
# Default rows per CPU (probes/options.py syscalls_max_rows): a row is one pid x syscall seen on
# that CPU; 10,000 processes at ~6 distinct syscalls each fit. Memory: 2 buffers x 176 bytes per
# row per CPU (23 MB per CPU at 65,536).
HIST_MAX_ROWS = 65536
HIST_ROW_BYTES = 176
PARKED_MAX = 131072
# Rolling use: past this fraction of HIST_MAX_ROWS rows in use, the program is loaded afresh.
REARM_FRACTION = 0.75

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
    ]
)
BUCKETS_TABLE = "syscall_buckets"
BUCKETS_SCHEMA = pa.schema(
    [
        pa.field("pid", pa.int32(), nullable=False),
        pa.field("syscall", pa.string(), nullable=False),
        pa.field("syscall_nr", pa.int32(), nullable=False),
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


def window_histograms(current: dict[tuple[int, int, int], dict],
                      previous: dict[tuple[int, int, int], dict]) -> dict[tuple[int, int], dict]:
    """One window's {(pid, syscall_nr): merged histogram} from two cumulative snapshots of the
    kernel rows, each {(pid, syscall_nr, cpu): row} (an empty `previous` = since attach).

    The kernel rows are never cleared while attached (clearing per-CPU rows from user space
    races with the programs writing them), so a window is the difference of two reads: count,
    total_ns and every bucket count are exact. max_ns cannot be differenced: when the row's
    cumulative max grew during the window, the new max happened in it and is exact; otherwise
    the window's max is reported as min(cumulative max, upper bound of the highest non-empty
    bucket of the window), an upper bound at the bucket's resolution. Pairs with no call in the
    window are left out.
    """
    per_pair: dict[tuple[int, int], list[dict]] = {}
    for (pid, number, cpu), row in current.items():
        before = previous.get((pid, number, cpu))
        if before is None:
            delta = dict(row, slots=list(row["slots"]))
        else:
            count = row["count"] - before["count"]
            if count <= 0:
                continue
            slots = [now - then for now, then in zip(row["slots"], before["slots"])]
            if row["max_ns"] > before["max_ns"]:
                max_ns = row["max_ns"]
            else:
                highest = max((slot for slot, value in enumerate(slots) if value > 0), default=0)
                max_ns = min(row["max_ns"], bucket_bounds(highest)[1])
            delta = {"count": count, "total_ns": row["total_ns"] - before["total_ns"], "max_ns": max_ns,
                     "slots": slots, "comm": row["comm"]}
        if delta["count"] > 0:
            per_pair.setdefault((pid, number), []).append(delta)
    return {pair: merge_cpu_values(values) for pair, values in per_pair.items()}


def syscalls_rows(histograms: dict[tuple[int, int], dict],
                  name_of: Callable[[int], str]) -> tuple[list[dict], list[dict]]:
    """{(pid, syscall_nr): merged histogram} -> (syscalls rows, one per pid x syscall;
    syscall_buckets rows, one per pid x syscall x non-empty bucket)."""
    rows, bucket_rows = [], []
    for (pid, number), hist in sorted(histograms.items()):
        if hist["count"] <= 0:
            continue
        # A bucket's upper bound can exceed the largest value seen: clamp to the max.
        p50, p99 = (histogram_quantile(hist["slots"], quantile) for quantile in (0.50, 0.99))
        p50 = None if p50 is None else min(p50, hist["max_ns"])
        p99 = None if p99 is None else min(p99, hist["max_ns"])
        name = name_of(number)
        rows.append({"pid": pid, "comm": hist["comm"], "syscall": name, "syscall_nr": number,
                     "count": hist["count"], "total_ns": hist["total_ns"], "max_ns": hist["max_ns"],
                     "p50_ns": p50, "p99_ns": p99})
        for slot, count in enumerate(hist["slots"]):
            if count:
                low, high = bucket_bounds(slot)
                bucket_rows.append({"pid": pid, "syscall": name, "syscall_nr": number,
                                    "bucket_lo_ns": low, "bucket_hi_ns": high, "bucket_count": count})
    return rows, bucket_rows


def summarize(table: pa.Table) -> list[dict]:
    """One dict per pid x syscall: the format 2 table as is, or a format 1 table (totals repeated
    on every bucket row) folded back."""
    seen: dict[tuple[int, str], dict] = {}
    for row in table.select(["pid", "comm", "syscall", "count", "total_ns", "max_ns", "p50_ns", "p99_ns"]).to_pylist():
        seen.setdefault((row["pid"], row["syscall"]), row)
    return list(seen.values())


def dropped_reason(lost_calls: int, lost_in_flight: int) -> str:
    """The status reason of a window in which the maps dropped something ("" when nothing was)."""
    parts = []
    if lost_calls:
        parts.append(f"{lost_calls:,} calls not recorded (histogram rows full)")
    if lost_in_flight:
        parts.append(f"{lost_in_flight:,} blocking calls lost (in-flight map full)")
    return "; ".join(parts)


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
            f"partial: {dropped_reason(lost_rows, lost_parked)}",
            "raise --syscalls-max-rows (memory: 352 bytes per row per CPU) or narrow the audit with --pid",
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


def build_source(pids: tuple[int, ...], self_tgid: int, raw_tracepoints: bool = True,
                 max_rows: int = HIST_MAX_ROWS) -> str:
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
            .replace("HIST_BUFFER_ROWS", str(2 * int(max_rows)))
            .replace("HIST_MAX", str(int(max_rows))))


# membarrier(2) numbers: MEMBARRIER_CMD_GLOBAL runs synchronize_rcu() (kernel 4.3+; 4.20+ RCU
# also waits for preempt-disabled regions, where tracepoint BPF programs run).
MEMBARRIER_SYSCALL = {"x86_64": 324, "aarch64": 283}
MEMBARRIER_CMD_GLOBAL = 1
# Without membarrier (nohz_full refuses it with EINVAL), a program run takes microseconds.
PROGRAM_DRAIN_S = 0.02


def wait_for_programs() -> None:
    """Return once every BPF program that could have read the old epoch has finished."""
    number = MEMBARRIER_SYSCALL.get(platform.machine())
    if number is not None:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.syscall(number, MEMBARRIER_CMD_GLOBAL, 0) == 0:
            return
    time.sleep(PROGRAM_DRAIN_S)


HIST_DTYPE = np.dtype([("total_ns", "<u8"), ("max_ns", "<u8"), ("slots", "<u4", (BUCKETS,)), ("comm", "S16")])
ROW_KEY_DTYPE = np.dtype([("tgid", "<u4"), ("syscall_nr", "<u4")])


def snapshot_rows(keys: np.ndarray, rows_plus_one: np.ndarray, hists: np.ndarray) -> dict:
    """{(pid, syscall_nr, cpu): row} from the batch-read maps: `keys` (row_ids keys), their
    per-CPU row number + 1 (n x cpus, 0 = none on that CPU) and one buffer's rows (rows x cpus)."""
    snapshot: dict[tuple[int, int, int], dict] = {}
    key_index, cpus = np.nonzero((rows_plus_one > 0) & (rows_plus_one <= hists.shape[0]))
    if not len(key_index):
        return snapshot
    values = hists[rows_plus_one[key_index, cpus].astype(np.int64) - 1, cpus]
    counts = values["slots"].sum(axis=1, dtype=np.int64)  # the kernel keeps no separate count
    for index in np.nonzero(counts)[0]:
        value = values[index]
        key = keys[key_index[index]]
        snapshot[(int(key["tgid"]), int(key["syscall_nr"]), int(cpus[index]))] = {
            "count": int(counts[index]), "total_ns": int(value["total_ns"]), "max_ns": int(value["max_ns"]),
            "slots": value["slots"].tolist(),
            "comm": bytes(value["comm"]).split(b"\0", 1)[0].decode(errors="replace")}
    return snapshot


class SyscallsProbe(LoadedProgram, ProbeBase):
    name: ClassVar[str] = NAME
    schema: ClassVar[pa.Schema] = SCHEMA
    extra_schemas: ClassVar[dict[str, pa.Schema]] = {BUCKETS_TABLE: BUCKETS_SCHEMA}
    description: ClassVar[str] = "eBPF syscall latency histograms per process (raw_syscalls tracepoints)"
    finish_grace_s: ClassVar[float] = 30.0
    tracepoints = ("raw_syscalls/sys_enter", "raw_syscalls/sys_exit", "sched/sched_switch")
    # Prepared once, then collect() window after window (see window_histograms).
    rolling: ClassVar[bool] = True

    def __init__(self, config: ProbeConfig | None = None):
        super().__init__(config)
        self._bpf = None
        self._reset_windows()

    def _reset_windows(self) -> None:
        # Each buffer's contents when it last became the one written: a window is the written
        # buffer's growth (nothing writes a retired buffer, so these reads are consistent).
        self._baseline: dict[int, dict] = {0: {}, 1: {}}
        self._epoch = 0
        self._window_open = False
        self._previous_lost = (0, 0)

    @property
    def max_rows(self) -> int:
        return int(self.option("syscalls_max_rows"))

    def check(self) -> None:
        bpf_prerequisites(self.host, self.tracepoints)

    def prepare(self) -> None:
        # BCC is optional (Debian's python3-bpfcc, not PyPI): `probes` must list this probe without it.
        import bcc

        self._reset_windows()
        raw = bool(bcc.BPF.support_raw_tracepoint())
        self.attach_mode = "raw tracepoints" if raw else "tracepoints"
        source = build_source(tuple(self.config.pids), os.getpid(), raw_tracepoints=raw,
                              max_rows=self.max_rows)
        try:
            self._bpf = compile_program(source)
        except Exception as error:
            raise Unavailable(f"BPF program failed to load: {str(error).splitlines()[0]}") from None
        # The first window opens once attached, as the contract says prepare() ends right before
        # the window: what runs between the two is counted in the first window.
        self._open_window()

    def _flip(self, next_window: bool = True) -> int:
        """Point the programs at the other buffer; return the retired one, once quiescent. The
        buffer about to be written is read first (nothing writes it yet): its baseline."""
        retired, written = self._epoch, 1 - self._epoch
        if next_window:
            self._baseline[written] = self._read_maps(self._bpf, written)[0]
        self._epoch = written
        table = self._bpf["epoch"]
        table[table.Key(0)] = table.Leaf(written)
        wait_for_programs()
        return retired

    def _open_window(self) -> None:
        """Window start: calls from now on go to a buffer whose contents are the baseline."""
        self._flip()
        self._previous_lost = self._read_maps(self._bpf, self._epoch, lost_only=True)[1]
        self._window_open = True

    def collect(self, window: Window) -> dict[str, pa.Table]:
        if self._bpf is None:
            self.prepare()
        bpf = self._bpf
        try:
            if not self._window_open:
                self._open_window()
            window.wait()
            written = self._flip(next_window=self.keep_attached)
            snapshot, lost_now, rows_in_use = self._read_maps(bpf, written)
        finally:
            if not self.keep_attached:
                self.detach()
        # The flip that ends this window starts the next one (rolling use): nothing in between.
        histograms = window_histograms(snapshot, self._baseline[written])
        self._baseline[written] = snapshot
        lost_rows = lost_now[0] - self._previous_lost[0]
        lost_parked = lost_now[1] - self._previous_lost[1]
        self._previous_lost = lost_now
        self.status_reason = dropped_reason(lost_rows, lost_parked)
        self.partial = bool(self.status_reason)
        if self.keep_attached and rows_in_use > REARM_FRACTION * self.max_rows:
            # Rows are never freed in the kernel (exited pids keep theirs): start afresh before
            # the maps fill. Rare; the recompile (~1 s of CPU) is the only cost.
            self.detach()
            try:
                self.prepare()
            except Exception as error:  # the next collect() tries again
                self.status_reason = f"re-arming failed: {error}"
        process_names: dict[int, str | None] = {}
        for (pid, _number), hist in histograms.items():
            # The kernel side records the calling thread's name; the process name is what users
            # search for, so prefer it while the process is still alive (read once per pid).
            if pid not in process_names:
                process_names[pid] = self.host.read_optional(f"/proc/{pid}/comm")
            if process_names[pid]:
                hist["comm"] = process_names[pid]
        rows, bucket_rows = syscalls_rows(histograms, syscall_name)
        table = rows_to_table(rows, SCHEMA)
        findings = syscall_findings(table, lost_rows, lost_parked, window.elapsed())
        return {NAME: table, BUCKETS_TABLE: rows_to_table(bucket_rows, BUCKETS_SCHEMA),
                "findings": findings_table(findings)}

    def _read_maps(self, bpf, buffer: int, lost_only: bool = False) -> tuple[dict, tuple[int, int], int]:
        """One buffer's cumulative contents ({(pid, syscall_nr, cpu): row values}), the lost
        counters and the rows in use. Batch lookups (one bpf() call per map instead of one per
        row: 10,000 processes took ~4 s row by row). Only reads: the programs own the maps."""
        lost = bpf["lost"]
        lost_now = (int(sum(lost[lost.Key(0)])), int(sum(lost[lost.Key(1)])))
        if lost_only:
            return {}, lost_now, 0
        cpus = possible_cpu_count()
        max_rows = self.max_rows
        next_rows = [int(value) for value in bpf["next_row"][bpf["next_row"].Key(0)]]
        rows_in_use = min(max(next_rows, default=0), max_rows)
        key_bytes, value_bytes, keys_read = lookup_batch(bpf["row_ids"], max_rows, ROW_KEY_DTYPE.itemsize,
                                                         8 * cpus)
        keys = np.frombuffer(key_bytes, ROW_KEY_DTYPE, count=keys_read)
        rows_plus_one = np.frombuffer(value_bytes, "<u4", count=keys_read * cpus * 2).reshape(
            keys_read, cpus, 2)[:, :, 0]
        snapshot: dict = {}
        if rows_in_use and keys_read:
            _, hist_bytes, rows_read = lookup_batch(bpf["hists"], rows_in_use, 4, HIST_ROW_BYTES * cpus,
                                                    start=buffer * max_rows)
            hists = np.frombuffer(hist_bytes, HIST_DTYPE, count=rows_read * cpus).reshape(rows_read, cpus)
            snapshot = snapshot_rows(keys, rows_plus_one, hists)
        return snapshot, lost_now, max(keys_read, rows_in_use)

    @staticmethod
    def headlines(tables: dict[str, pa.Table]) -> list[str]:
        table = tables.get(NAME)
        if table is None:
            return []
        if table.num_rows == 0:
            return ["Syscalls: none completed in the window by the processes watched "
                    "(the agent's own calls are left out)."]
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
