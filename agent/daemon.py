"""`guardian-agent daemon`: the cheap probes in rolling windows, under a CPU budget it enforces.

Each window is an ordinary audit (agent.runner.AuditRun) into the spool, laid out into the
dataset and published like a `collect` run, so daemon and timer data are one dataset.

CPU budget. After every window the daemon reads its own CPU time (getrusage: all threads, plus
reaped children) and compares it with wall time over a sliding horizon of recent cycles. When
the average would exceed `cpu_budget_pct` of one core it pauses before the next window, exactly
long enough to bring the average back to the budget: the budget holds by construction, and what
it costs (seconds not observed) is counted in the state file and the log instead of being
hidden. eBPF programs run in the context of the traced tasks, so their cost is not in our
rusage; it is reported separately by the probes that measure it.

Memory. Windows of non-rolling probes run in a forked child (see `_window_in_child`), so what
a window allocates is returned when it ends. Rolling probes (below) compile once in the daemon
itself; after that compile the heap is trimmed and LLVM's touched pages handed back
(HeapKeeper.after_compile). Past `rss_limit_mb` of anonymous RSS
after a window the daemon exits with status 1 so that systemd (Restart=on-failure) starts a
fresh process: a leak never grows without bound on a trading host. The limit is on anonymous
memory, not total RSS: the rest is clean, shared library text (LLVM alone is ~85 MB once BCC
has compiled in-process) that a restart would not shrink.

A probe class may declare `rolling = True` to say that one instance can be prepared once and
then collect window after window; the daemon then runs windows in-process and its probe source
(agent/runner.py: KeptProbes) keeps it attached between windows (no BPF recompilation per
window). Other probes get a fresh instance per window. The syscalls and tcp probes are rolling,
so the default daemon compiles once, at start.
"""

from __future__ import annotations

import collections
import json
import os
import resource
import signal
import threading
import time
from datetime import datetime, timezone
from typing import Callable

from agent.config import AgentConfig
from agent.fleet.collect import audit_into_spool, make_spool, make_store, probe_config, resolve_probes
from agent.fleet.spool import SpoolFull
from core.host import Host
from agent.runner import AuditRun, KeptProbes
from core.atomic import write_json_atomic

STATE_NAME = "daemon-state.json"
BUDGET_HORIZON_CYCLES = 30
UPLOAD_BACKOFF_MAX_S = 900.0


def process_cpu_s() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def rss_bytes() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def rss_anon_bytes(status_text: str) -> int:
    """RssAnon from /proc/self/status: the memory that is ours alone and cannot be reclaimed
    without swap. The rest of RSS is clean library text (LLVM alone is ~85 MB once BCC has
    compiled), shared with every BCC user and dropped by the kernel under pressure."""
    for line in status_text.splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class HeapKeeper:
    """Keeps a long-running process's RSS near what it uses.

    Each window's BPF compile (LLVM) allocates a few hundred MB in the preparing thread and frees
    it; glibc keeps that memory in per-thread arenas (64 MB each, a new thread per window), so
    without this the daemon sat at 420 MB RSS after four windows. Two arenas and a trim after
    each window bring it back; Arrow's pool is released the same way.
    """

    M_ARENA_MAX = -8  # glibc <malloc.h>

    def __init__(self):
        import ctypes

        try:
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt(self.M_ARENA_MAX, 2)
        except (OSError, AttributeError):
            self.libc = None  # not glibc: nothing to tune

    def trim(self) -> None:
        try:
            import pyarrow as pa

            pa.default_memory_pool().release_unused()
        except Exception:
            pass
        if self.libc is not None:
            self.libc.malloc_trim(0)

    MADV_PAGEOUT = 21  # Linux 5.4+
    COMPILER_LIBRARIES = ("/libLLVM", "/libclang")

    def release_compiler_text(self) -> None:
        """After the BPF compiles: ask the kernel to reclaim now the pages of LLVM and clang the
        compile touched (~80 MB here) instead of whenever memory runs short. They are file pages
        (text, read-only data) that nothing uses until the next compile, which reads them back
        from the page cache; MADV_PAGEOUT only reclaims, it never discards modified data, and
        older kernels refuse it (ignored)."""
        if self.libc is None:
            return
        try:
            with open("/proc/self/maps") as maps:
                lines = maps.read().splitlines()
            madvise = self.libc.madvise
            import ctypes

            madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            for line in lines:
                fields = line.split()
                if len(fields) > 5 and any(name in fields[5] for name in self.COMPILER_LIBRARIES):
                    low, high = (int(address, 16) for address in fields[0].split("-"))
                    madvise(low, high - low, self.MADV_PAGEOUT)
        except (OSError, AttributeError, ValueError):
            pass

    def after_compile(self) -> None:
        self.trim()
        self.release_compiler_text()


def budget_pause_s(history: collections.deque, cpu_budget_pct: float) -> float:
    """Seconds to idle so that CPU over the horizon is at most the budget (a fraction of a core).

    `history` holds (cpu_s, wall_s) per cycle. Pausing p seconds makes the average
    cpu / (wall + p); solving cpu / (wall + p) = budget gives p = cpu / budget - wall.
    """
    cpu_s = sum(cpu for cpu, _ in history)
    wall_s = sum(wall for _, wall in history)
    budget = cpu_budget_pct / 100.0
    return max(0.0, cpu_s / budget - wall_s)


class Daemon:
    def __init__(self, config: AgentConfig, registry: tuple, host: Host | None = None,
                 log: Callable[[str], None] | None = None, max_windows: int | None = None,
                 metrics=None):
        self.config = config
        self.metrics = metrics  # reports.metrics.TextfileExporter (--textfile/--listen) or None
        self.settings = config.daemon
        self.registry = registry
        self.host = host or Host.real()
        self.log = log or (lambda message: None)
        self.max_windows = max_windows
        self._stop = threading.Event()
        self._current: AuditRun | None = None
        self._child_pid = 0
        self._lock = threading.Lock()
        self.spool = make_spool(config)
        self.store = make_store(config)
        self.state_path = self.spool.path / STATE_NAME
        self.history: collections.deque = collections.deque(maxlen=BUDGET_HORIZON_CYCLES)
        self.heap = HeapKeeper()
        self.probes = KeptProbes(after_prepare=self.heap.after_compile)
        self.state = {
            "pid": os.getpid(),
            "started_at": datetime.now(timezone.utc).isoformat(),
            "windows": 0, "cpu_s_total": 0.0, "wall_s_total": 0.0, "cpu_pct_avg": 0.0,
            "cpu_pct_last_window": 0.0, "cpu_budget_pct": self.settings.cpu_budget_pct,
            "paused_s_total": 0.0, "rss_bytes": 0, "rss_peak_bytes": 0,
            "rss_limit_bytes": int(self.settings.rss_limit_mb * 1024 * 1024),
            "pending_runs": 0, "pending_bytes": 0, "uploaded_runs": 0, "dropped_runs": 0,
            "last_upload_error": "", "probes": {},
        }

    # -- control ---------------------------------------------------------------------------

    def stop(self) -> None:
        """SIGTERM/SIGINT: end the current window early; it is still written and published."""
        self._stop.set()
        with self._lock:
            if self._current is not None:
                self._current.stop()
            if self._child_pid:
                try:
                    os.kill(self._child_pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def _on_run(self, run: AuditRun) -> None:
        with self._lock:
            self._current = run
            if self._stop.is_set():
                run.stop()

    # -- main loop -------------------------------------------------------------------------

    def run(self) -> int:
        probe_classes = resolve_probes(self.settings.probes, self.registry)
        if self.metrics is not None:  # --listen: a port in use is refused before anything else
            self.metrics.start_server()
        self.spool.recover()
        self.log(f"daemon started: probes {', '.join(self.settings.probes)}, window {self.settings.window_s:g} s, "
                 f"budget {self.settings.cpu_budget_pct:g}% of a core, dataset {self.store.describe()}")
        next_upload = 0.0
        upload_backoff_s = self.settings.upload_interval_s
        exit_code = 0
        started_cpu, started_wall = process_cpu_s(), time.monotonic()
        cycle_cpu, cycle_wall = started_cpu, started_wall
        while not self.stopping:
            if any(cls.rolling for cls in probe_classes):
                run_id, outcomes = self._window_in_process(probe_classes)
            else:
                run_id, outcomes = self._window_in_child(probe_classes)
            try:
                dropped = self.spool.enforce_cap(run_id) if run_id else []
                for name in dropped:
                    self.log(f"spool over its cap: dropped run {name} (policy drop-oldest)")
            except SpoolFull as error:  # refuse-new: this window is lost, the backlog is kept
                self.log(str(error))
                dropped = [run_id]
            self.state["dropped_runs"] += len(dropped)
            self._record_outcomes(outcomes)
            self.state["windows"] += 1

            if not self.stopping and time.monotonic() >= next_upload:
                if self._upload(max(30.0, self.settings.window_s)):
                    upload_backoff_s = self.settings.upload_interval_s
                else:
                    upload_backoff_s = min(UPLOAD_BACKOFF_MAX_S, upload_backoff_s * 2)
                    self.log(f"retrying the upload in {upload_backoff_s:g} s")
                next_upload = time.monotonic() + upload_backoff_s

            cpu_s = process_cpu_s() - cycle_cpu
            wall_s = time.monotonic() - cycle_wall
            self.history.append((cpu_s, wall_s))
            pause_s = 0.0 if self.stopping else budget_pause_s(self.history, self.settings.cpu_budget_pct)
            if pause_s > 0:
                self.log(f"over the CPU budget ({100 * cpu_s / max(wall_s, 1e-9):.2f}% this window): "
                         f"pausing {pause_s:.1f} s")
                paused_from = time.monotonic()
                self._stop.wait(pause_s)
                self.history[-1] = (cpu_s, time.monotonic() - cycle_wall)
                self.state["paused_s_total"] += time.monotonic() - paused_from
            # The bookkeeping below is charged to the next cycle, so no CPU escapes the budget.
            cycle_cpu, cycle_wall = process_cpu_s(), time.monotonic()
            self.heap.trim()
            rss = rss_bytes()
            rss_anon = rss_anon_bytes(self.host.read_optional("/proc/self/status")) if self.host.is_real else rss
            total_cpu, total_wall = process_cpu_s() - started_cpu, time.monotonic() - started_wall
            self.state.update({
                "cpu_s_total": round(total_cpu, 4), "wall_s_total": round(total_wall, 3),
                "cpu_pct_avg": round(100 * total_cpu / max(total_wall, 1e-9), 4),
                "cpu_pct_last_window": round(100 * cpu_s / max(wall_s, 1e-9), 4),
                "rss_bytes": rss, "rss_peak_bytes": max(rss, self.state["rss_peak_bytes"]),
                "rss_anon_bytes": rss_anon,
                "rss_anon_peak_bytes": max(rss_anon, self.state.get("rss_anon_peak_bytes", 0)),
                "updated_at": datetime.now(timezone.utc).isoformat(),
            })
            self._write_state()
            if self.metrics is not None:
                self.metrics.agent_state(self.state)
            if rss_anon > self.state["rss_limit_bytes"]:
                self.log(f"anonymous RSS {rss_anon / 2**20:.0f} MB (RSS {rss / 2**20:.0f} MB) is over the "
                         f"{self.settings.rss_limit_mb:g} MB limit: exiting so systemd restarts a fresh process")
                exit_code = 1
                break
            if self.max_windows is not None and self.state["windows"] >= self.max_windows:
                break
        self.probes.close_all()
        # Last chance before exit; what does not make it stays in the spool for the next start.
        self._upload(10.0)
        self._write_state()
        if self.metrics is not None:
            self.metrics.close()
        self.log(f"daemon stopped after {self.state['windows']} window(s); "
                 f"average CPU {self.state['cpu_pct_avg']:.3f}% of a core")
        return exit_code

    def _window_in_process(self, probe_classes: list[type]) -> tuple[str, list]:
        run_id, result = audit_into_spool(
            self.spool, probe_classes, probe_config(self.config, self.host), self.settings.window_s,
            self.host, on_run=self._on_run, source=self.probes)
        with self._lock:
            self._current = None
        for outcome in result.outcomes:
            # A kept probe whose window failed (or timed out and was abandoned) starts afresh.
            if outcome.status not in ("ok", "partial", "interrupted"):
                self.probes.discard(outcome.name)
        if self.metrics is not None:
            try:
                self.metrics.window_done(self.spool.bundle_dir(run_id))
            except Exception as error:  # noqa: BLE001 - metrics must never cost a window
                self.log(f"metrics textfile not written: {type(error).__name__}: {error}")
        self.spool.stage(run_id)
        return run_id, [(o.name, o.status, o.reason) for o in result.outcomes]

    def _window_in_child(self, probe_classes: list[type]) -> tuple[str | None, list]:
        """One window in a forked child that exits afterwards.

        A BPF compile makes LLVM allocate a few hundred MB; in a child that memory goes back to
        the system when the window ends, so between compiles the daemon holds only its own
        ~100 MB, and a leak in a probe can never accumulate across windows. The child's CPU is
        in RUSAGE_CHILDREN, so the budget still sees all of it; its peak RSS is reported as
        `window_rss_peak_bytes`. Forking is safe here: between windows the daemon has no other
        threads.
        """
        read_end, write_end = os.pipe()
        daemon_pid = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: run the window, stage it, report statuses, exit
            from core.children import die_with_parent

            die_with_parent(daemon_pid)  # a SIGKILLed daemon takes its window (and probes) along
            os.close(read_end)
            code = 1
            try:
                self._stop.clear()
                signal.signal(signal.SIGTERM, lambda signum, frame: self.stop())
                signal.signal(signal.SIGINT, lambda signum, frame: self.stop())
                run_id, outcomes = self._window_in_process(probe_classes)
                with os.fdopen(write_end, "w") as pipe:
                    json.dump({"run_id": run_id, "outcomes": outcomes}, pipe)
                code = 0
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                os._exit(code)
        os.close(write_end)
        with self._lock:
            self._child_pid = pid
        if self.stopping:  # SIGTERM arrived between the loop check and the fork
            os.kill(pid, signal.SIGTERM)
        with os.fdopen(read_end) as pipe:
            report = pipe.read()
        while True:
            try:
                _, status, usage = os.wait4(pid, 0)
                break
            except InterruptedError:
                continue
        with self._lock:
            self._child_pid = 0
        self.state["window_rss_peak_bytes"] = max(usage.ru_maxrss * 1024, self.state.get("window_rss_peak_bytes", 0))
        if not report:
            self.log(f"window process failed (exit status {status}); its run, if complete, is recovered")
            self.spool.recover()
            return None, []
        report = json.loads(report)
        return report["run_id"], [tuple(item) for item in report["outcomes"]]

    def _upload(self, budget_s: float) -> bool:
        report = self.spool.drain(self.store, deadline_monotonic=time.monotonic() + budget_s)
        self.state["uploaded_runs"] += len(report.published_runs)
        self.state["pending_runs"], self.state["pending_bytes"] = report.pending_runs, report.pending_bytes
        self.state["last_upload_error"] = report.error
        if report.error:
            self.log(f"upload failed, {report.pending_runs} run(s) wait in the spool: {report.error}")
        return not report.error

    def _record_outcomes(self, outcomes: list[tuple[str, str, str]]) -> None:
        for name, status, reason in outcomes:
            entry = self.state["probes"].setdefault(name, {"ok": 0, "other": 0, "last_status": ""})
            entry["ok" if status in ("ok", "interrupted") else "other"] += 1
            if status != entry["last_status"] and status not in ("ok", "interrupted"):
                self.log(f"probe {name}: {status}: {reason}")
            entry["last_status"] = status

    def _write_state(self) -> None:
        try:
            write_json_atomic(self.state, self.state_path)
        except OSError as error:
            self.log(f"cannot write {self.state_path}: {error.strerror}")
