"""One chaos experiment end to end (PICT): validate -> steady state -> faults -> recovery -> verdict.

Safety, in order of importance:
1. Nothing outlives the agent. Before apply() the fault's exact undo is fsync'd to the journal;
   a watchdog in its own session (agent/chaos/watchdog.py) holds the read end of a pipe and undoes
   the run's faults from the journal as soon as the agent is gone (SIGKILL included); kernel-owned
   faults (nft owner tables, PDEATHSIG children) die with the agent by themselves anyway.
2. Abort at once: safeguards evaluated every second, the kill-switch file and SIGTERM/SIGINT are
   polled every 20 ms while faults are active; the faults are removed right there.
3. Nothing is injected unless everything validated, the host carries the experiment's
   environment marker, and the steady state held before.
"""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

from core.errors import BadInput, Unavailable, WorkFailed
from core.host import Host
from agent.chaos import journal
from agent.chaos.checks import (Check, gate_check, proof_check, recovery_check, tolerance_check, verdict_of)
from agent.chaos.experiment import Experiment, Expectation
from agent.chaos.sampler import GroupCollector, phase_samples, trailing, window_stats
from agent.tuning.engine import _kill_point

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent
TICK_S = 0.02
SAFEGUARD_EVERY_S = 1.0
WARMUP_S = 0.3
WATCHDOG_READY_S = 15.0
EXPECT_POLL_S = 0.2


def prepare_injectors(experiment: Experiment, host: Host) -> list:
    """Instantiate every fault and run its check(): targets resolve, backends exist. Any problem is
    bad input naming the fault's key (exit 2), before anything is touched."""
    from agent.chaos.faults import injector_for

    source = str(experiment.path)
    injectors = []
    try:
        for fault in experiment.faults:
            injector = injector_for(fault.kind)(fault.spec, host)
            try:
                injector.check()
            except Unavailable as error:
                raise BadInput(f"{source}: {fault.where}.kind: {fault.kind} is unavailable on this host: {error}") from None
            except BadInput as error:
                message = str(error)
                raise BadInput(message if message.startswith(source) else f"{source}: {fault.where}: {message}") from None
            injectors.append(injector)
    except BaseException:
        for injector in injectors:  # their standby children: nothing is left of a refused run
            injector.discard()
        raise
    return injectors


@dataclass
class FaultRecord:
    index: int
    kind: str
    plan: dict
    applying_ns: int | None = None
    applied_ns: int | None = None
    removed_ns: int | None = None
    apply_ms: float | None = None
    remove_ms: float | None = None
    clean_ms: float | None = None
    removed_by: str = ""
    proof: dict | None = None
    proof_error: str = ""


@dataclass
class ExpectResult:
    expectation: Expectation
    seen_after_s: float | None = None
    polls: int = 0
    last_status: int | None = None
    last_error: str = ""


@dataclass
class Outcome:
    run_id: str
    title: str
    verdict: str
    reason: str
    checks: list[Check]
    recovery_s: float | None
    faults: list[FaultRecord]
    samples: list
    phases: dict[str, tuple[int, int | None]]
    aborted_by: str = ""
    bundle_dir: Path | None = None
    published: str = ""
    findings: list[dict] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        return 0 if self.verdict == "held" else 1


def http_get(url: str, timeout_s: float) -> tuple[int, str]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout_s)
    try:
        connection.request("GET", (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))
        response = connection.getresponse()
        return response.status, response.read(65536).decode(errors="replace")
    finally:
        connection.close()


class ChaosRun:
    def __init__(self, experiment: Experiment, injectors: list, directory: Path, run_id: str,
                 progress: Callable[[str], None] = lambda message: None, host: Host | None = None):
        self.experiment = experiment
        self.injectors = injectors
        self.directory = directory
        self.run_id = run_id
        self.progress = progress
        self.host = host or Host.real()
        self.abort_reason = ""
        self.aborted_by = ""
        self._abort = threading.Event()
        self._lock = threading.Lock()
        self.faults = [FaultRecord(f.index, f.kind, {}) for f in experiment.faults]
        self.collectors: dict[str, GroupCollector] = {}
        self.phases: dict[str, tuple[int, int | None]] = {}
        self.watchdog: subprocess.Popen | None = None
        self.expects = [ExpectResult(e) for e in experiment.expects]
        self._threads: list[threading.Thread] = []

    # --- control -------------------------------------------------------------------------------
    def request_abort(self, reason: str, by: str) -> None:
        if not self._abort.is_set():
            self.abort_reason, self.aborted_by = reason, by
            self._abort.set()

    def _kill_switch(self) -> bool:
        if journal.kill_switch_path(self.directory).exists():
            self.request_abort(f"kill switch {journal.kill_switch_path(self.directory)} present", "kill-switch")
        return self._abort.is_set()

    def _wait(self, seconds: float) -> bool:
        """Sleep up to `seconds`, watching the kill switch; True when aborted."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._kill_switch():
                return True
            self._abort.wait(min(TICK_S * 5, max(0.0, deadline - time.monotonic())))
        return self._kill_switch()

    def _phase(self, name: str) -> None:
        now = time.time_ns()
        for previous, (start, end) in list(self.phases.items()):
            if end is None:
                self.phases[previous] = (start, now)
        self.phases[name] = (now, None)
        for collector in self.collectors.values():
            collector.set_phase(name)
        journal.append(self.directory, "phase", run_id=self.run_id, phase=name)
        _kill_point(f"chaos:{name}")

    # --- the watchdog --------------------------------------------------------------------------
    def start_watchdog(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env.pop("GUARDIAN_AGENT_TEST_KILL_AT", None)
        self.watchdog = subprocess.Popen(
            [sys.executable, "-m", "agent.chaos.watchdog", str(self.directory), self.run_id],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
            start_new_session=True, env=env, cwd=str(PROJECT_ROOT))
        ready: list[bytes] = []
        reader = threading.Thread(target=lambda: ready.append(self.watchdog.stdout.readline()), daemon=True)
        reader.start()
        reader.join(WATCHDOG_READY_S)
        if not ready or ready[0].strip() != b"ready":
            self.watchdog.kill()
            raise WorkFailed("the chaos watchdog did not start (nothing was injected)")
        journal.append(self.directory, "watchdog_started", run_id=self.run_id, pid=self.watchdog.pid)

    def stop_watchdog(self) -> None:
        if self.watchdog is None:
            return
        try:
            self.watchdog.stdin.close()
            self.watchdog.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self.watchdog.kill()
        self.watchdog = None

    # --- faults ---------------------------------------------------------------------------------
    def _apply(self, position: int) -> None:
        injector, record = self.injectors[position], self.faults[position]
        record.plan = injector.plan()
        undo = injector.undo_record()
        record.applying_ns = time.time_ns()
        journal.append(self.directory, "fault_applying", run_id=self.run_id, index=record.index,
                       kind=record.kind, undo=undo, plan=record.plan)
        _kill_point(f"chaos:applying:{record.index}")
        started = time.monotonic()
        injector.apply()
        record.apply_ms = (time.monotonic() - started) * 1000.0
        record.applied_ns = time.time_ns()
        journal.append(self.directory, "fault_applied", run_id=self.run_id, index=record.index,
                       apply_ms=round(record.apply_ms, 3))
        _kill_point(f"chaos:applied:{record.index}")
        self.progress(f"fault[{record.index}] {record.kind} active ({record.apply_ms:.0f} ms): "
                      f"{record.plan.get('target', '')}")

    def _remove(self, position: int, by: str) -> None:
        with self._lock:
            record = self.faults[position]
            if record.applying_ns is None or record.removed_ns is not None:
                return
            injector = self.injectors[position]
            started, started_ns = time.monotonic(), time.time_ns()
            injector.gone_ns = None
            injector.remove()
            record.removed_ns = injector.gone_ns or time.time_ns()
            # remove_ms: decision to remove -> the fault stopped acting; clean_ms: remove() in all
            record.remove_ms = (record.removed_ns - started_ns) / 1e6
            record.clean_ms = (time.monotonic() - started) * 1000.0
            record.removed_by = by
            journal.append(self.directory, "fault_removed", run_id=self.run_id, index=record.index,
                           kind=record.kind, by=by, remove_ms=round(record.remove_ms, 3),
                           clean_ms=round(record.clean_ms, 3), gone_at=record.removed_ns / 1e9)
            _kill_point(f"chaos:removed:{record.index}")

    def remove_all(self, by: str) -> None:
        errors = []
        for position in reversed(range(len(self.faults))):
            try:
                self._remove(position, by)
            except Exception as error:  # noqa: BLE001 - try every fault; the watchdog/sweep retries
                errors.append(f"fault[{position}]: {error}")
        if errors:
            raise WorkFailed("could not remove " + "; ".join(errors) + " (the next chaos command sweeps it)")

    def _prove(self) -> None:
        for position, injector in enumerate(self.injectors):
            record = self.faults[position]
            if self._abort.is_set() or record.removed_ns is not None:
                record.proof_error = "removed before the proof ran"
                continue
            try:
                record.proof = injector.proof()
            except Exception as error:  # noqa: BLE001 - a failed proof makes the run invalid, not a crash
                record.proof_error = f"{type(error).__name__}: {error}"

    def _watch_expectation(self, result: ExpectResult, applied_monotonic: float) -> None:
        expectation = result.expectation
        deadline = applied_monotonic + expectation.within_s
        while not self._abort.is_set() and time.monotonic() <= deadline:
            result.polls += 1
            try:
                status, body = http_get(expectation.url, expectation.timeout_s)
                result.last_status = status
                if expectation.contains in body:
                    result.seen_after_s = time.monotonic() - applied_monotonic
                    return
            except (OSError, http.client.HTTPException) as error:
                result.last_error = str(error) or type(error).__name__
            self._abort.wait(EXPECT_POLL_S)

    def _background(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        thread.start()
        self._threads.append(thread)

    # --- safeguards -----------------------------------------------------------------------------
    def safeguard_value(self, metric: str, window_s: float) -> float | None:
        group, name = ("control", metric[len("control_"):]) if metric.startswith("control_") else ("experiment", metric)
        collector = self.collectors.get(group)
        if collector is None:
            return None
        since = time.time_ns() - int(window_s * 1e9)
        fault_started = self.phases.get("fault", (time.time_ns(), None))[0]
        samples = trailing(phase_samples(collector.snapshot(), "fault"), max(since, fault_started))
        return window_stats(samples)[name]

    def evaluate_safeguards(self) -> list[dict]:
        results = []
        for safeguard in self.experiment.safeguards:
            value = self.safeguard_value(safeguard.metric, safeguard.window_s)
            tripped = safeguard.tripped(value)
            results.append({"safeguard": safeguard.describe(), "value": value, "tripped": tripped})
            if tripped:
                self.request_abort(f"safeguard {safeguard.describe()} tripped (measured {value:.2f})", "safeguard")
        return results

    # --- the run --------------------------------------------------------------------------------
    def _fault_phase(self) -> None:
        self._phase("fault")
        for position in range(len(self.injectors)):
            if self._kill_switch():
                break
            self._apply(position)
        applied_at = time.monotonic()
        for result in self.expects:
            self._background(self._watch_expectation, result, applied_at)
        prover = threading.Thread(target=self._prove, daemon=True)
        prover.start()
        next_safeguard = applied_at + SAFEGUARD_EVERY_S
        while True:
            now = time.monotonic()
            for position, fault in enumerate(self.experiment.faults):
                if now - applied_at >= fault.duration_s:
                    self._remove(position, "runner")
            if all(record.removed_ns is not None or record.applying_ns is None for record in self.faults):
                break
            if now >= next_safeguard:
                self.evaluate_safeguards()
                next_safeguard += SAFEGUARD_EVERY_S
            if self._kill_switch():
                self.progress(f"aborting: {self.abort_reason}")
                self.remove_all(self.aborted_by)
                break
            self._abort.wait(TICK_S)
        # An aborted run is judged without the proof: do not keep the operator waiting for it.
        wait_s = 0.5 if self._abort.is_set() else 10.0
        prover.join(timeout=wait_s)
        if prover.is_alive():
            for record in self.faults:
                if record.proof is None and not record.proof_error:
                    record.proof_error = f"the proof did not finish within {wait_s:g} s of the removal"

    def run(self) -> Outcome:
        steady = self.experiment.steady_state
        journal.append(self.directory, "run_started", run_id=self.run_id, pid=os.getpid(),
                       start_ticks=journal.process_start_ticks(os.getpid()), title=self.experiment.title,
                       experiment=self.experiment.as_dict(), planned_s=self.experiment.planned_s)
        try:
            self.start_watchdog()
            self.collectors["experiment"] = GroupCollector("experiment", steady.url, steady)
            if steady.control_url:
                self.collectors["control"] = GroupCollector("control", steady.control_url, steady)
            for collector in self.collectors.values():
                collector.start()
            self._wait(WARMUP_S)
            self._phase("before")
            self.progress(f"steady state: {steady.before_s:g} s before the fault")
            checks: list[Check] = []
            if not self._wait(steady.before_s):
                checks += self._before_checks()
            if not self._abort.is_set() and all(c.classification == "pass" for c in checks):
                self._fault_phase()
                self._phase("after")
                operator_abort = self.aborted_by in ("kill-switch", "signal", "abort")
                if not operator_abort:
                    self.progress(f"recovery: {steady.after_s:g} s after the fault")
                    self._wait(steady.after_s)
            self._phase("done")
        except BaseException:
            self._emergency_stop()
            raise
        finally:
            for collector in self.collectors.values():
                collector.stop()
            self._discard_unapplied()
        for thread in self._threads:
            thread.join(timeout=2)
        return self._outcome(checks)

    def _discard_unapplied(self) -> None:
        """A run refused (not steady) or aborted before a fault's apply(): end its standby."""
        for position, injector in enumerate(self.injectors):
            if self.faults[position].applying_ns is None:
                try:
                    injector.discard()
                except Exception as error:  # noqa: BLE001 - PDEATHSIG still ends it with the agent
                    self.progress(f"fault[{position}]: standby not ended: {error}")

    def _emergency_stop(self) -> None:
        try:
            self.remove_all("runner-error")
        finally:
            journal.append(self.directory, "run_finished", run_id=self.run_id, verdict="invalid",
                           reason="the runner failed; faults removed")
            self.stop_watchdog()

    def samples(self) -> list:
        return [sample for collector in self.collectors.values() for sample in collector.snapshot()]

    def group_phase(self, group: str, phase: str) -> list:
        collector = self.collectors.get(group)
        return phase_samples(collector.snapshot(), phase) if collector else []

    def _before_checks(self) -> list[Check]:
        steady = self.experiment.steady_state
        checks = [tolerance_check("steady_state.before", self.group_phase("experiment", "before"), steady)]
        if "control" in self.collectors:
            checks.append(tolerance_check("control_steady_state.before", self.group_phase("control", "before"), steady))
        return checks

    def _fault_checks(self) -> tuple[list[Check], float | None]:
        experiment, steady = self.experiment, self.experiment.steady_state
        checks = [proof_check(r.index, r.kind, r.proof, r.proof_error) for r in self.faults]
        checks.append(tolerance_check("steady_state.during", self.group_phase("experiment", "fault"), steady))
        if "control" in self.collectors:
            checks.append(gate_check("control_unaffected", self.group_phase("control", "before"),
                                     self.group_phase("control", "fault"), experiment,
                                     "control during the fault vs control before"))
            checks.append(gate_check("experiment_vs_control", self.group_phase("control", "fault"),
                                     self.group_phase("experiment", "fault"), experiment,
                                     "experiment vs control, both during the fault"))
        for index, result in enumerate(self.expects):
            expectation = result.expectation
            name = f"expect[{index}]"
            if result.seen_after_s is not None:
                checks.append(Check(name, "pass", f"{expectation.url} contained {expectation.contains!r} "
                                                  f"{result.seen_after_s:.2f} s after the fault "
                                                  f"(within_s = {expectation.within_s:g})",
                                    {"seen_after_s": result.seen_after_s, "polls": result.polls}))
            else:
                last = f"last status {result.last_status}" if result.last_status else (result.last_error or "no answer")
                checks.append(Check(name, "fail", f"{expectation.url} never contained {expectation.contains!r} "
                                                  f"within {expectation.within_s:g} s ({result.polls} polls, {last})",
                                    {"polls": result.polls}))
        removed = [r.removed_ns for r in self.faults if r.removed_ns is not None]
        recovery, recovery_s = recovery_check(self.group_phase("experiment", "after"),
                                              max(removed) if removed else None, steady)
        if self.aborted_by not in ("kill-switch", "signal", "abort"):
            checks.append(recovery)
        return checks, recovery_s

    def _outcome(self, checks: list[Check]) -> Outcome:
        recovery_s = None
        injected = any(record.applying_ns is not None for record in self.faults)
        if injected:
            more, recovery_s = self._fault_checks()
            checks = checks + more
        verdict, reason = verdict_of(checks, self.abort_reason)
        if not checks and self.abort_reason:
            verdict, reason = "aborted", self.abort_reason
        return Outcome(self.run_id, self.experiment.title, verdict, reason, checks, recovery_s, self.faults, self.samples(),
                       dict(self.phases), self.aborted_by)

    def finish(self, outcome: Outcome) -> None:
        journal.append(self.directory, "run_finished", run_id=self.run_id, verdict=outcome.verdict,
                       reason=outcome.reason, recovery_s=outcome.recovery_s,
                       bundle=str(outcome.bundle_dir) if outcome.bundle_dir else None)
        self.stop_watchdog()
