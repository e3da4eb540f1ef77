"""jitter: prove CPU isolation works (the hiccups / sysjitter method).

One child process per chosen CPU, pinned there, reads the clock in a tight loop for the window
and records every gap between two consecutive reads above a threshold: time the CPU was taken
away (an interrupt, a softirq, a kernel thread, another task). Alongside, the per-CPU deltas of
/proc/interrupts (LOC, RES, TLB, CAL, NIC queues ...) and /proc/softirqs over the same window say
who took it.

The meter (--jitter-meter, default auto): rt-tests' oslat (C busy loop, ~40 ns per loop, 1 us
histogram buckets), else rt-tests' cyclictest (a SCHED_FIFO thread per CPU woken by a timer every
200 us: how late it wakes, in 1 us buckets; probes/jitter_cyclictest.py), else, only as the
fallback, a Python loop (no compiler on production hosts): one iteration costs ~0.1-0.3 us, well
under the 5 us default threshold. Each row names its meter and its resolution (loop_ns_mean for
the loops, resolution_ns for all), and the manifest's reason says which meter ran. A busy-loop burns a whole CPU, so the probe only ever runs on CPUs the
user chose (--jitter-cpus) or that the kernel isolated (isolcpus); it never picks CPUs itself.
"""

from __future__ import annotations

import json
import os
import signal
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import ClassVar

import pyarrow as pa
import pyarrow.compute as pc

from core.children import spawn
from core.errors import BadInput, Unavailable
from core.host import Host, format_cpu_list, parse_cpu_list
from probes.base import ProbeBase, finding, findings_table, rows_to_table

NAMED_INTERRUPTS = ("LOC", "RES", "CAL", "TLB", "NMI", "IWI", "PMI")
HICCUP_WARNING_NS = 100_000


def _isolated_cpus() -> list[int]:
    try:
        return Host.real().isolated_cpus()
    except (OSError, ValueError):
        return []


# ------------------------------------------------------------------ pure functions

def parse_interrupt_counts(text: str) -> dict[tuple[str, str], dict[int, int]]:
    """/proc/interrupts or /proc/softirqs -> {(name, description): {cpu: count}}.

    Columns follow the header (CPU0 CPU3 ... only online CPUs are listed); lines with fewer
    counts than CPUs (ERR, MIS: global counters) are skipped."""
    lines = text.splitlines()
    if not lines:
        return {}
    cpus = [int(word[3:]) for word in lines[0].split() if word.startswith("CPU")]
    counts: dict[tuple[str, str], dict[int, int]] = {}
    for line in lines[1:]:
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        fields = rest.split()
        if len(fields) < len(cpus) or not all(f.isdigit() for f in fields[:len(cpus)]):
            continue
        description = " ".join(fields[len(cpus):])
        counts[(name.strip(), description)] = {cpu: int(value) for cpu, value in zip(cpus, fields)}
    return counts


def interrupt_rows(before: str, after: str, cpus: list[int], source: str, duration_s: float) -> list[dict]:
    """Per-CPU deltas over the window, for the chosen CPUs. Zero rows are dropped except for the
    named per-CPU interrupts (a zero LOC count on a nohz_full CPU is the point)."""
    start, end = parse_interrupt_counts(before), parse_interrupt_counts(after)
    rows = []
    for key, by_cpu in end.items():
        name, description = key
        for cpu in cpus:
            if cpu not in by_cpu:
                continue
            delta = by_cpu[cpu] - start.get(key, {}).get(cpu, 0)
            if delta <= 0 and name not in NAMED_INTERRUPTS and source == "hardirq":
                continue
            if delta <= 0 and source == "softirq" and name not in ("TIMER", "SCHED", "RCU", "NET_RX"):
                continue
            rows.append({"source": source, "name": name, "description": description, "cpu": cpu,
                         "count": max(delta, 0),
                         "rate_hz": round(max(delta, 0) / duration_s, 3) if duration_s > 0 else None})
    return rows


def jitter_rows(results: list[dict], threshold_ns: int) -> list[dict]:
    """One row per CPU from the loop children's results (gaps_ns: the gaps above threshold)."""
    rows = []
    for result in results:
        gaps = pa.array(result.get("gaps_ns", []), pa.int64())
        elapsed = int(result.get("elapsed_ns", 0))
        iterations = int(result.get("iterations", 0))
        count = int(result.get("gap_count", len(gaps)))
        total = int(result.get("gap_total_ns", pc.sum(gaps).as_py() or 0))
        row = {"cpu": result["cpu"], "meter": "python", "duration_ns": elapsed, "threshold_ns": threshold_ns,
               "iterations": iterations, "loop_ns_mean": (elapsed / iterations) if iterations else None,
               "gap_count": count, "gap_total_ns": total,
               "lost_pct": round(100.0 * total / elapsed, 4) if elapsed else None,
               "gap_p50_ns": None, "gap_p99_ns": None, "gap_p999_ns": None, "gap_max_ns": None}
        row["resolution_ns"] = row["loop_ns_mean"]
        if len(gaps):
            # Percentiles of the gaps themselves (the hiccups), as sysjitter/hiccups report them;
            # "higher": always an observed gap, never an interpolated value below the real tail.
            quantiles = pc.quantile(gaps, q=[0.5, 0.99, 0.999], interpolation="higher").to_pylist()
            row.update(gap_p50_ns=int(quantiles[0]), gap_p99_ns=int(quantiles[1]),
                       gap_p999_ns=int(quantiles[2]), gap_max_ns=int(pc.max(gaps).as_py()))
        if result.get("error"):
            row["error"] = result["error"]
        rows.append(row)
    return rows


def choose_cpus(requested: str | None, isolated: list[int], online: list[int]) -> list[int]:
    """The CPUs to busy-loop: the user's choice, else the isolated ones; never a guess."""
    if requested:
        try:
            cpus = parse_cpu_list(str(requested))
        except ValueError:
            raise BadInput(f"--jitter-cpus {requested!r}: not a CPU list (like 2-3)") from None
        offline = sorted(set(cpus) - set(online))
        if offline or not cpus:
            # The user named these CPUs: a typo is bad input, not a probe that cannot run here.
            raise BadInput(f"--jitter-cpus {requested}: CPUs {format_cpu_list(offline) or 'none'} "
                              f"are not online (online: {format_cpu_list(online)})")
        return cpus
    if isolated:
        return isolated
    raise Unavailable("no isolated CPUs here: name the CPUs to measure with --jitter-cpus "
                      "(each is kept 100% busy for the window, so choose spare ones)")


METERS = ("auto", "oslat", "cyclictest", "python")


def choose_meter(requested: str | None, duration_ns: int, which=shutil.which) -> tuple[str, str]:
    """(meter, why the Python fallback runs instead). auto: oslat, else cyclictest, else python.
    Both native meters run whole seconds: a shorter window falls back to the Python loop."""
    requested = requested or "auto"
    if requested == "python":
        return "python", "asked for with --jitter-meter python"
    if duration_ns < 1_000_000_000:
        return "python", "window under 1 s; oslat and cyclictest run whole seconds"
    if requested != "auto":
        return requested, ""
    for meter in ("oslat", "cyclictest"):
        if which(meter):
            return meter, ""
    return "python", "rt-tests (oslat, cyclictest) not installed: apt-get install rt-tests"


# ------------------------------------------------------------------ the probe

class JitterProbe(ProbeBase):
    name = "jitter"
    description = "Busy-loop gaps and per-CPU interrupt deltas on chosen/isolated CPUs (isolation proof)"
    schema: ClassVar[pa.Schema] = pa.schema([
        pa.field("cpu", pa.int32(), nullable=False),
        pa.field("duration_ns", pa.int64()),
        pa.field("threshold_ns", pa.int64()),
        pa.field("iterations", pa.int64()),
        pa.field("loop_ns_mean", pa.float64()),
        pa.field("gap_count", pa.int64()),
        pa.field("gap_total_ns", pa.int64()),
        pa.field("lost_pct", pa.float64()),
        pa.field("gap_p50_ns", pa.int64()),
        pa.field("gap_p99_ns", pa.int64()),
        pa.field("gap_p999_ns", pa.int64()),
        pa.field("gap_max_ns", pa.int64()),
        pa.field("meter", pa.string()),  # oslat | cyclictest | python (the fallback)
        pa.field("resolution_ns", pa.float64()),  # the loop's cost, or cyclictest's 1 us buckets
        pa.field("wakeup_avg_ns", pa.float64()),  # cyclictest: mean/min timer wakeup latency
        pa.field("wakeup_min_ns", pa.int64()),
    ])
    extra_schemas: ClassVar[dict[str, pa.Schema]] = {"interrupts": pa.schema([
        pa.field("source", pa.string(), nullable=False),  # hardirq | softirq
        pa.field("name", pa.string(), nullable=False),  # LOC, RES, 24, NET_RX ...
        pa.field("description", pa.string()),
        pa.field("cpu", pa.int32(), nullable=False),
        pa.field("count", pa.int64()),
        pa.field("rate_hz", pa.float64()),
    ]), "jitter_histogram": pa.schema([
        pa.field("cpu", pa.int32(), nullable=False),
        pa.field("bucket_us", pa.int64(), nullable=False),  # 1 us buckets; the last includes overflows
        pa.field("count", pa.int64()),
        pa.field("meter", pa.string()),  # oslat: loop gaps; cyclictest: timer wakeup latencies
    ])}
    finish_grace_s = 10.0
    # Never busy-loop a CPU nobody chose: on by default only where the kernel isolated CPUs.
    default_enabled = bool(_isolated_cpus())

    def __init__(self, config=None):
        super().__init__(config)
        self.cpus: list[int] = []
        self.threshold_ns = int(self.option("jitter_threshold_ns"))

    def check(self) -> None:
        self.cpus = choose_cpus(self.option("jitter_cpus"), self.host.isolated_cpus(),
                                self.host.online_cpus())
        meter = self.option("jitter_meter")
        if meter in ("oslat", "cyclictest") and not shutil.which(meter):
            raise Unavailable(f"--jitter-meter {meter}: {meter} not installed (apt-get install rt-tests, "
                              "or `make setup`)")
        if not self.host.exists("/proc/interrupts"):
            raise Unavailable("/proc/interrupts missing: is /proc mounted?")

    def collect(self, window) -> dict[str, pa.Table]:
        if not self.cpus:
            self.check()
        duration_ns = int(window.remaining() * 1e9)
        interrupts_before = self.host.read_optional("/proc/interrupts")
        softirqs_before = self.host.read_optional("/proc/softirqs")
        meter, why = choose_meter(self.option("jitter_meter"), duration_ns)
        if meter != "python":
            jitter, histogram = self._native(meter, duration_ns // 1_000_000_000)
            elapsed_s = max((r["duration_ns"] or 0 for r in jitter), default=0) / 1e9 or window.elapsed()
            return self._tables(jitter, histogram, interrupts_before, softirqs_before, elapsed_s)
        self.status_reason = f"meter: python loop, the fallback ({why})"
        root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
        children = [spawn(
            [sys.executable, "-m", "probes.jitter_loop", "--cpu", str(cpu), "--duration-ns", str(duration_ns),
             "--threshold-ns", str(self.threshold_ns)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env) for cpu in self.cpus]
        try:
            while not window.wait(0.2):
                if all(child.poll() is not None for child in children):
                    break
            if window.interrupted:
                for child in children:
                    if child.poll() is None:
                        child.send_signal(signal.SIGTERM)
            results = []
            for cpu, child in zip(self.cpus, children):
                stdout, stderr = child.communicate(timeout=self.finish_grace_s)
                try:
                    results.append(json.loads(stdout))
                except ValueError:
                    results.append({"cpu": cpu, "error": stderr.decode(errors="replace").strip()[-300:]})
        finally:
            for child in children:
                if child.poll() is None:
                    child.kill()
                    child.wait()
        elapsed_s = max((r.get("elapsed_ns", 0) for r in results), default=0) / 1e9 or window.elapsed()
        failed = [r for r in results if r.get("error")]
        if failed and len(failed) == len(results):
            raise RuntimeError(f"busy-loop failed on cpu {failed[0]['cpu']}: {failed[0]['error']}")
        jitter = jitter_rows([r for r in results if not r.get("error")], self.threshold_ns)
        return self._tables(jitter, [], interrupts_before, softirqs_before, elapsed_s)

    def _native(self, meter: str, duration_s: int) -> tuple[list[dict], list[dict]]:
        """oslat or cyclictest over the window (whole seconds: both take -D in seconds)."""
        if meter == "oslat":
            # The C meter first: its loop costs ~1 ns, not the Python loop's ~100-300 ns.
            jitter, histogram = run_oslat(self.cpus, duration_s, self.threshold_ns, tempfile.gettempdir())
            loop = max((r["loop_ns_mean"] or 0 for r in jitter), default=0)
            self.status_reason = (f"meter: oslat (C busy loop, {loop:.0f} ns per loop, 1 us buckets; the Python "
                                  "loop is only the fallback)")
            return jitter, histogram
        from probes.jitter_cyclictest import CYCLICTEST_INTERVAL_US, CYCLICTEST_PRIORITY, run_cyclictest

        jitter, histogram = run_cyclictest(self.cpus, duration_s, self.threshold_ns, tempfile.gettempdir())
        self.status_reason = (f"meter: cyclictest (timer wakeup latency, SCHED_FIFO {CYCLICTEST_PRIORITY} every "
                              f"{CYCLICTEST_INTERVAL_US} us, 1 us buckets; the Python loop is only the fallback)")
        return jitter, histogram

    def _tables(self, jitter, histogram, interrupts_before, softirqs_before, elapsed_s) -> dict[str, pa.Table]:
        interrupts = interrupt_rows(interrupts_before, self.host.read_optional("/proc/interrupts"),
                                    self.cpus, "hardirq", elapsed_s)
        interrupts += interrupt_rows(softirqs_before, self.host.read_optional("/proc/softirqs"),
                                     self.cpus, "softirq", elapsed_s)
        return {"jitter": rows_to_table(jitter, self.schema),
                "interrupts": rows_to_table(interrupts, self.extra_schemas["interrupts"]),
                "jitter_histogram": rows_to_table(histogram, self.extra_schemas["jitter_histogram"]),
                "findings": findings_table(jitter_findings(jitter, interrupts, self.host.isolated_cpus()))}

    @staticmethod
    def headlines(tables) -> list[str]:
        table = tables.get("jitter")
        if table is None:
            return []
        lines = []
        for row in table.to_pylist():
            what = "late wakeups" if row.get("meter") == "cyclictest" else "gaps"
            if row["gap_count"]:
                lines.append(f"jitter ({row.get('meter') or 'python'}): cpu {row['cpu']}: {row['gap_count']} {what} "
                             f"> {row['threshold_ns'] / 1000:g} us, "
                             f"p99 {row['gap_p99_ns'] / 1000:.1f} us, max {row['gap_max_ns'] / 1000:.1f} us"
                             + (f", {row['lost_pct']:.3f}% of the time lost" if row["lost_pct"] is not None else ""))
            else:
                lines.append(f"jitter ({row.get('meter') or 'python'}): cpu {row['cpu']}: no {what[:-1]} above "
                             f"{row['threshold_ns'] / 1000:g} us")
        return lines


def what_was_measured(row: dict) -> str:
    return "timer wakeup latency" if row.get("meter") == "cyclictest" else "busy-loop gap"


def jitter_findings(jitter: list[dict], interrupts: list[dict], isolated: list[int]) -> list[dict]:
    rows = []
    for row in jitter:
        if row["gap_max_ns"] and row["gap_max_ns"] >= HICCUP_WARNING_NS:
            culprits = sorted((r for r in interrupts if r["cpu"] == row["cpu"] and r["count"]),
                              key=lambda r: -r["count"])[:3]
            named = ", ".join(f"{r['name']} {r['count']}" for r in culprits) or "no interrupts: a task or kthread"
            rows.append(finding(
                "jitter", "critical" if row["cpu"] in isolated else "warning", f"cpu {row['cpu']}",
                f"max {what_was_measured(row)} {row['gap_max_ns'] / 1000:.0f} us, p99 {row['gap_p99_ns'] / 1000:.1f} us "
                f"over {row['gap_count']} {'late wakeups' if row.get('meter') == 'cyclictest' else 'gaps'} "
                f"(top interrupts: {named}; meter {row.get('meter') or 'python'})",
                "isolate the CPU (tune plan --profile cpu-isolation) and move IRQs and tasks off it"))
    return rows




# ------------------------------------------------------------------ native meter (rt-tests oslat)

def oslat_command(cpus: list[int], duration_s: int, json_path: str) -> list[str]:
    """oslat (rt-tests >= 2.x) busy-loops in C on each CPU and histograms every loop gap in 1 us
    buckets (-b 1024: gaps up to ~1 ms land in their own bucket; the last one includes overflows,
    and "max" is always exact)."""
    return ["oslat", "--cpu-list", format_cpu_list(cpus), "-D", str(max(1, int(duration_s))),
            "-q", "-z", "-b", "1024", f"--json={json_path}"]


def histogram_quantile_us(histogram: list[tuple[int, int]], fraction: float) -> int | None:
    total = sum(count for _, count in histogram)
    if not total:
        return None
    target, seen = fraction * total, 0
    for bucket_us, count in histogram:
        seen += count
        if seen >= target:
            return bucket_us
    return histogram[-1][0]


def histogram_gap_quantiles(gaps: list[tuple[int, int]]) -> dict[str, int]:
    """gap_p50_ns/p99/p999 from 1 us buckets (bucket_us, count) of the samples above the threshold."""
    return {name: histogram_quantile_us(gaps, q) * 1000
            for name, q in (("gap_p50_ns", 0.5), ("gap_p99_ns", 0.99), ("gap_p999_ns", 0.999))}


def oslat_rows(report: dict, threshold_ns: int) -> tuple[list[dict], list[dict]]:
    """oslat's --json report -> (jitter rows, histogram rows). Percentiles are of the gaps above
    the threshold (as the Python loop reports them), read off the 1 us buckets ("higher": the
    bucket's upper edge in us, never under the real tail); max comes exact from oslat."""
    rows, buckets = [], []
    for thread in report.get("thread", {}).values():
        histogram = sorted((int(us), int(n)) for us, n in thread.get("histogram", {}).items())
        elapsed_ns = int(float(thread.get("duration", 0)) * 1e9)
        iterations = sum(n for _, n in histogram)
        # oslat rounds a gap up into its bucket (a 40 ns loop lands in "1"): bucket k holds gaps
        # in (k-1, k] us, so it is above the threshold when its lower edge is.
        gaps = [(us, n) for us, n in histogram if (us - 1) * 1000 >= threshold_ns]
        gap_count = sum(n for _, n in gaps)
        gap_total_ns = sum(us * 1000 * n for us, n in gaps)
        max_ns = int(thread.get("max", 0)) * 1000
        row = {"cpu": int(thread["cpu"]), "duration_ns": elapsed_ns, "threshold_ns": threshold_ns,
               "iterations": iterations, # oslat's own "avg" is in whole-us buckets; the loop's cost is the window over the samples.
               "loop_ns_mean": elapsed_ns / iterations if iterations else None,
               "gap_count": gap_count, "gap_total_ns": gap_total_ns,
               "lost_pct": round(100.0 * gap_total_ns / elapsed_ns, 4) if elapsed_ns else None,
               "gap_p50_ns": None, "gap_p99_ns": None, "gap_p999_ns": None,
               "gap_max_ns": max_ns if gap_count else None, "meter": "oslat"}
        row["resolution_ns"] = row["loop_ns_mean"]
        if gap_count:
            row.update(histogram_gap_quantiles(gaps))
        rows.append(row)
        buckets += [{"cpu": row["cpu"], "meter": "oslat", "bucket_us": us, "count": n} for us, n in histogram]
    return rows, buckets


def run_oslat(cpus: list[int], duration_s: int, threshold_ns: int, workdir: str) -> tuple[list[dict], list[dict]]:
    json_path = os.path.join(workdir, f"oslat-{os.getpid()}.json")
    done = subprocess.run(oslat_command(cpus, duration_s, json_path), capture_output=True, text=True,
                          timeout=duration_s + 30)
    if done.returncode != 0 or not os.path.exists(json_path):
        raise RuntimeError(f"oslat failed: {(done.stderr or done.stdout).strip()[-300:]}")
    try:
        return oslat_rows(json.loads(Path(json_path).read_text()), threshold_ns)
    finally:
        os.unlink(json_path)
