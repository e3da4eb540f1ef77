"""The rollout driver: prepare -> validate -> canary stages -> promote, or roll back to blue.

Safety properties, in order of importance:
1. Traffic ends on blue unless the last stage passed the gate: on a gate fail, on Ctrl-C/SIGTERM,
   on any error, and — through a watchdog process in its own session — when the driver itself is
   killed with SIGKILL or crashes. The watchdog holds the read end of a pipe; the kernel closes the
   write end when the driver dies however it dies, and the watchdog then restores blue unless the
   journal shows the run finished.
2. Every phase is journaled (fsync'd) before it acts, so `rollout status` / `abort` work from the
   journal alone.
3. A rollback is one adapter call right after the decision; its latency is journaled.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from core.errors import BadInput, WorkFailed
from agent.gate.kpi import turns_metrics
from agent.gate.record import append_decision, decision_rows
from agent.gate.verdict import GateVerdict, judge
from agent.rollout.adapters import TrafficAdapter, make_adapter
from agent.rollout.collector import LoadCollector, Sample, make_collector, samples_table
from agent.rollout.journal import Journal, last_run, pid_alive
from agent.rollout.plan import Plan

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent


class Interrupted(Exception):
    pass


@dataclass
class Outcome:
    status: str  # promoted | rolled_back | failed
    reason: str
    run_id: str
    report_dir: Path | None = None
    stage: int | None = None
    decision_to_blue_ms: float | None = None

    @property
    def exit_code(self) -> int:
        return 0 if self.status == "promoted" else 1


@dataclass
class Evaluation:
    stage: int
    elapsed_s: float
    verdict: GateVerdict
    baseline_scope: str
    decided_at: float = field(default_factory=time.time)


def stage_samples(samples: list[Sample], stage: int, min_samples: int) -> tuple[list[Sample], list[Sample], str]:
    """(blue, green, baseline scope) for judging `stage`.

    Green: this stage only (its behaviour at this weight). Blue: this stage when it has enough
    samples, else every stage so far — at 100% green, blue serves nothing, so the baseline is blue
    as it was measured earlier in the same rollout.
    """
    green = [s for s in samples if s.stage == stage and s.version == "green"]
    blue = [s for s in samples if s.stage == stage and s.version == "blue"]
    if len(blue) >= max(min_samples, 1):
        return blue, green, "this stage"
    return [s for s in samples if 0 <= s.stage <= stage and s.version == "blue"], green, "all stages so far"


def samples_to_turns(samples: list[Sample]):
    return samples_table(samples) if samples else None


def judge_samples(blue: list[Sample], green: list[Sample], plan: Plan) -> GateVerdict:
    metrics = turns_metrics(samples_to_turns(blue), samples_to_turns(green))
    return judge(metrics, plan.gate)


def run_hook(command: str, timeout_s: float, stop: threading.Event) -> tuple[int, str]:
    """Run one hook (shell syntax allowed: these are the operator's own commands). Interruptible."""
    from core.children import spawn

    process = spawn(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    output = []
    reader = threading.Thread(target=lambda: output.append(process.stdout.read()), daemon=True)
    reader.start()
    while process.poll() is None:
        if stop.is_set() or time.monotonic() > deadline:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
            reader.join(timeout=1)
            if stop.is_set():
                raise Interrupted("interrupted during a hook")
            return -1, f"timed out after {timeout_s:g} s"
        time.sleep(0.05)
    reader.join(timeout=5)
    text = "".join(output)
    return process.returncode, text[-2000:]


class RolloutDriver:
    def __init__(self, plan: Plan, progress: Callable[[str], None] = lambda message: None,
                 adapter: TrafficAdapter | None = None):
        self.plan = plan
        self.progress = progress
        self.adapter = adapter or make_adapter(plan.traffic)
        self.journal = Journal(plan.journal_path)
        self.stop = threading.Event()
        self.stop_reason = ""
        self.evaluations: list[Evaluation] = []
        self.collector: LoadCollector | None = None
        self.watchdog: subprocess.Popen | None = None
        self.run_id = ""
        self.weights = {"blue": 100.0, "green": 0.0}

    # --- safety plumbing -------------------------------------------------------------------------
    def preflight(self) -> None:
        if self.plan.journal_path.exists():
            try:
                previous = last_run(self.plan.journal_path)
            except BadInput:
                previous = None
            if previous is not None and previous.status == "running":
                raise BadInput(f"rollout {self.plan.name!r} is already running (pid {previous.pid}); "
                               f"see `guardian-agent rollout status --plan {self.plan.path}`")
        try:
            self.plan.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise BadInput(f"plan.state_dir {self.plan.state_dir}: {error.strerror}") from None
        self.adapter.check()

    def start_watchdog(self) -> None:
        read_end, write_end = os.pipe()
        env = dict(os.environ)
        env["PYTHONPATH"] = str(PROJECT_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        # Own session: a Ctrl-C or a kill of the driver's process group does not reach it.
        self.watchdog = subprocess.Popen(
            [sys.executable, "-m", "agent.rollout.watchdog", str(self.plan.journal_path), self.run_id],
            stdin=read_end, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
            start_new_session=True, close_fds=True)
        os.close(read_end)
        self._watchdog_pipe = write_end  # kept open for the driver's whole life
        self.journal.append("watchdog", run_id=self.run_id, watchdog_pid=self.watchdog.pid)

    def release_watchdog(self) -> None:
        if self.watchdog is None:
            return
        os.close(self._watchdog_pipe)
        try:
            self.watchdog.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        self.watchdog = None

    def set_weights(self, blue: float, green: float, reason: str) -> None:
        self.adapter.set_weights(blue, green)
        self.weights = {"blue": blue, "green": green}
        self.journal.append("weights", run_id=self.run_id, weights=self.weights, reason=reason)

    def on_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal signature
        self.stop_reason = f"interrupted by {signal.Signals(signum).name}"
        self.stop.set()

    # --- phases ----------------------------------------------------------------------------------
    def run(self) -> Outcome:
        from reports.bundle import new_run_id

        self.preflight()
        self.run_id = new_run_id()
        self.journal.append("start", run_id=self.run_id, pid=os.getpid(), plan=str(self.plan.path),
                            name=self.plan.name, traffic=self.plan.traffic.as_dict(), plan_data=self.plan.raw,
                            stages=[stage.__dict__ for stage in self.plan.stages])
        self.start_watchdog()
        previous = {signum: signal.signal(signum, self.on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run_phases()
        finally:
            if self.collector is not None:
                self.collector.stop()
            self.release_watchdog()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _run_phases(self) -> Outcome:
        traffic_moved = False
        stage_index = None
        try:
            self._hooks("prepare", self.plan.prepare.commands, self.plan.prepare.timeout_s)
            self._hooks("validate", self.plan.validate.commands, self.plan.validate.timeout_s)
            if self.plan.shadow is not None:
                self._shadow()
            traffic_moved = True
            self.set_weights(100, 0, "start from blue")
            self.collector = make_collector(self.plan.kpi, self.plan.traffic.blue, self.plan.traffic.green)
            self.collector.start()
            for stage_index, stage in enumerate(self.plan.stages):
                decision, reason = self._stage(stage_index, stage)
                if decision == "rollback":
                    return self.rollback(reason, stage_index)
            self.journal.append("promoted", run_id=self.run_id, weights=self.weights)
            report = self.write_report("promoted", "every stage passed the gate")
            self.progress(f"promoted: green serves 100%; report {report}")
            return Outcome("promoted", "every stage passed the gate", self.run_id, report)
        except Interrupted as reason:
            return self.rollback(self.stop_reason or str(reason), stage_index, moved=traffic_moved)
        except HookFailed as failure:
            return self.rollback(str(failure), None, moved=traffic_moved, event="failed")
        except BaseException as error:  # noqa: BLE001 - any failure must still end on blue
            self.rollback(f"error: {type(error).__name__}: {error}", stage_index, moved=traffic_moved)
            raise

    def _hooks(self, phase: str, commands: list[str], timeout_s: float) -> None:
        for index, command in enumerate(commands):
            if self.stop.is_set():
                raise Interrupted(self.stop_reason)
            self.progress(f"{phase} [{index + 1}/{len(commands)}]: {command}")
            self.journal.append("hook_started", run_id=self.run_id, phase=phase, index=index, command=command)
            started = time.monotonic()
            code, output = run_hook(command, timeout_s, self.stop)
            self.journal.append("hook_finished", run_id=self.run_id, phase=phase, index=index, exit_code=code,
                                seconds=round(time.monotonic() - started, 3), output_tail=output[-500:])
            if code != 0:
                raise HookFailed(f"{phase} hook {index + 1} failed (exit {code}): {command}")

    def _shadow(self) -> None:
        from agent.rollout.shadow import shadow_compare

        shadow = self.plan.shadow
        self.progress(f"validate: shadow replay of {shadow.pcap}")
        self.journal.append("shadow_started", run_id=self.run_id, pcap=str(shadow.pcap))
        summary = shadow_compare(shadow, self.plan.gate.for_metric("turns.latency_ns").threshold_pct,
                                 self.plan.gate.confidence)
        self.journal.append("shadow_finished", run_id=self.run_id, **summary)
        if summary["requests"] == 0:
            raise HookFailed(f"validate.shadow: no HTTP requests found in {shadow.pcap}")
        if summary["mismatch_pct"] > shadow.max_mismatch_pct:
            raise HookFailed(f"validate.shadow: {summary['mismatch_pct']:.1f}% of replayed responses differ "
                             f"(max {shadow.max_mismatch_pct:g}%)")
        if summary["latency_verdict"] == "fail":
            raise HookFailed(f"validate.shadow: green is slower on paired requests ({summary['latency_reason']})")

    def _stage(self, index: int, stage) -> tuple[str, str]:
        final = index == len(self.plan.stages) - 1
        self.collector.set_stage(index)
        self.set_weights(100 - stage.weight_pct, stage.weight_pct, f"stage {index + 1}")
        self.journal.append("stage_started", run_id=self.run_id, stage=index, weight_pct=stage.weight_pct,
                            dwell_s=stage.dwell_s, max_dwell_s=stage.max_dwell_s, weights=self.weights)
        self.progress(f"stage {index + 1}/{len(self.plan.stages)}: green {stage.weight_pct:g}%")
        started = time.monotonic()
        while True:
            if self.stop.wait(self.plan.evaluate_every_s):
                raise Interrupted(self.stop_reason)
            elapsed = time.monotonic() - started
            evaluation = self._evaluate(index, elapsed)
            verdict = evaluation.verdict.verdict
            if verdict == "fail":
                return self._decide(evaluation, "rollback", f"stage {index + 1} ({stage.weight_pct:g}%): "
                                                            f"gate failed: {evaluation.verdict.reason}")
            if verdict == "pass" and elapsed >= stage.dwell_s:
                return self._decide(evaluation, "advance", f"stage {index + 1}: gate passed")
            if elapsed >= stage.max_dwell_s:
                if final or self.plan.on_inconclusive == "rollback":
                    return self._decide(evaluation, "rollback",
                                        f"stage {index + 1}: still {verdict} after {stage.max_dwell_s:g} s "
                                        f"({evaluation.verdict.reason})")
                return self._decide(evaluation, "advance",
                                    f"stage {index + 1}: {verdict} after {stage.max_dwell_s:g} s, "
                                    f"advancing (on_inconclusive = advance): {evaluation.verdict.reason}")

    def _evaluate(self, index: int, elapsed: float) -> Evaluation:
        samples = self.collector.snapshot()
        blue, green, scope = stage_samples(samples, index, self.plan.gate.min_samples)
        verdict = judge_samples(blue, green, self.plan)
        evaluation = Evaluation(index, elapsed, verdict, scope)
        self.evaluations.append(evaluation)
        return evaluation

    def _decide(self, evaluation: Evaluation, decision: str, reason: str) -> tuple[str, str]:
        verdict = evaluation.verdict
        self.journal.append("decision", run_id=self.run_id, stage=evaluation.stage, decision=decision,
                            verdict=verdict.verdict, score=None if math.isnan(verdict.score) else verdict.score,
                            reason=reason, baseline_scope=evaluation.baseline_scope,
                            metrics={m.metric: [m.classification, m.baseline_count, m.candidate_count,
                                                None if math.isnan(m.effect_pct) else round(m.effect_pct, 2)]
                                     for m in verdict.metrics})
        self.progress(reason)
        try:
            append_decision(self.plan.record_dir, decision_rows(
                verdict, self.plan.gate, context=f"rollout {self.plan.name} stage {evaluation.stage + 1}",
                baseline=f"{self.run_id}:blue", candidate=f"{self.run_id}:green",
                baseline_run_id=self.run_id, candidate_run_id=self.run_id))
        except (OSError, BadInput) as error:
            self.journal.append("warning", run_id=self.run_id, message=f"decision record: {error}")
        return decision, reason

    def rollback(self, reason: str, stage: int | None, moved: bool = True, event: str = "rolled_back") -> Outcome:
        decided = time.monotonic()
        self.journal.append("rollback_started", run_id=self.run_id, reason=reason, stage=stage)
        error_text = ""
        try:
            self.set_weights(100, 0, "rollback")
        except Exception as error:  # noqa: BLE001 - keep going: the watchdog retries from the journal
            error_text = f"{type(error).__name__}: {error}"
        to_blue_ms = (time.monotonic() - decided) * 1000.0
        if error_text:
            # Not terminal: the watchdog sees an unfinished run and keeps trying to restore blue.
            self.journal.append("rollback_error", run_id=self.run_id, error=error_text)
            raise WorkFailed(f"rollback to blue failed ({error_text}); the watchdog will retry")
        self.journal.append(event, run_id=self.run_id, reason=reason, stage=stage, weights=self.weights,
                            decision_to_blue_ms=round(to_blue_ms, 3), traffic_moved=moved)
        self.progress(f"rolled back to blue in {to_blue_ms:.0f} ms: {reason}")
        report = None
        if moved and self.collector is not None:
            self.collector.stop()
            report = self.write_report(event, reason)
            self.progress(f"post-mortem: {report}")
        return Outcome(event, reason, self.run_id, report, stage, to_blue_ms)

    # --- reports ---------------------------------------------------------------------------------
    def write_report(self, status: str, reason: str) -> Path | None:
        from agent.rollout.report import write_rollout_bundle

        try:
            return write_rollout_bundle(self, status, reason)
        except Exception as error:  # noqa: BLE001 - a report failure must not undo the rollback
            self.journal.append("warning", run_id=self.run_id, message=f"report not written: {error}")
            return None


class HookFailed(Exception):
    pass


def stage_summary_rows(samples: list[Sample], plan: Plan) -> list[dict]:
    rows = []
    for index, stage in enumerate(plan.stages):
        for version in ("blue", "green"):
            chosen = [s for s in samples if s.stage == index and s.version == version]
            if not chosen:
                continue
            latencies = np.array([s.latency_ns for s in chosen], dtype=np.float64)
            rows.append({"stage": index, "weight_pct": stage.weight_pct, "version": version,
                         "samples": len(chosen), "p50_ms": float(np.percentile(latencies, 50)) / 1e6,
                         "p99_ms": float(np.percentile(latencies, 99)) / 1e6,
                         "error_rate_pct": 100.0 * sum(s.error for s in chosen) / len(chosen)})
    return rows


def restore_blue_from_journal(journal_path: Path, reason: str, event: str) -> dict:
    """Used by `rollout abort` and the watchdog: put traffic on blue with only the journal."""
    from agent.rollout.adapters import adapter_from_dict

    state = last_run(journal_path)
    adapter = adapter_from_dict(state.start["traffic"])
    journal = Journal(journal_path)
    started = time.monotonic()
    adapter.all_to_blue()
    return journal.append(event, run_id=state.run_id, reason=reason, weights={"blue": 100, "green": 0},
                          decision_to_blue_ms=round((time.monotonic() - started) * 1000.0, 3),
                          driver_alive=pid_alive(state.pid))


def rollout_report_metrics(report, stage_number: int | None, min_samples: int):
    """(metrics, stage number 1-based) of a rollout report bundle, split as the driver split them."""
    from agent.rollout.collector import Sample

    if not report.has("turns") or "version" not in report.table("turns").column_names:
        raise BadInput(f"{report.path}: not a rollout report (no turns with a version column)")
    table = report.table("turns")
    samples = [Sample(row["version"], row["stage"], 0, row["latency_ns"], row["status"], row["error"], 0, 0)
               for row in table.select(["version", "stage", "latency_ns", "status", "error"]).to_pylist()]
    green_stages = sorted({s.stage for s in samples if s.version == "green"})
    if not green_stages:
        raise BadInput(f"{report.path}: green served no request in this rollout")
    stage = green_stages[-1] if stage_number is None else stage_number - 1
    if stage not in green_stages:
        raise BadInput(f"--stage {stage_number}: green served nothing then (stages with green samples: "
                       f"{', '.join(str(s + 1) for s in green_stages)})")
    blue, green, _ = stage_samples(samples, stage, min_samples)
    return turns_metrics(samples_to_turns(blue), samples_to_turns(green)), stage + 1
