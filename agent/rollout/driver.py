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
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from core.errors import BadInput, WorkFailed
from agent.gate.kpi import MetricData, turns_metrics
from agent.gate.record import append_decision, decision_rows
from agent.gate.verdict import GateVerdict, judge
from agent.rollout.adapters import BalancerView, TrafficAdapter, adapter_from_dict, make_adapter
from agent.rollout.collector import BASELINE_STAGE, WARMUP_STAGE, LoadCollector, Sample, make_collector, samples_table
from agent.rollout.guard import AloneGuard
from agent.rollout.journal import Journal, current_roles, last_run, pid_alive
from agent.rollout.plan import Plan, Stage

PROJECT_ROOT = Path(__file__).resolve().parent.parent.parent


class Interrupted(Exception):
    pass


@dataclass
class Outcome:
    status: str  # promoted | rolled_back | failed | undone
    reason: str
    run_id: str
    report_dir: Path | None = None
    stage: int | None = None
    decision_to_blue_ms: float | None = None
    after_promotion: list[dict] = field(default_factory=list)  # chaos summaries, after a promotion

    @property
    def chaos_not_held(self) -> list[dict]:
        return [result for result in self.after_promotion if result.get("verdict") != "held"]

    @property
    def exit_code(self) -> int:
        # A refuted (or aborted, invalid) experiment after promotion: exit 1 as `chaos run` does,
        # while green keeps serving (the status stays "promoted").
        return 0 if self.status == "promoted" and not self.chaos_not_held else 1

    def as_dict(self) -> dict:
        return {"status": self.status, "reason": self.reason, "run_id": self.run_id,
                "report": None if self.report_dir is None else str(self.report_dir),
                "stage": None if self.stage is None else self.stage + 1,
                "decision_to_blue_ms": self.decision_to_blue_ms,
                "promotion_stands": self.status == "promoted",
                "after_promotion": self.after_promotion,
                "chaos_refuted": any(r.get("verdict") == "refuted" for r in self.after_promotion)}


@dataclass
class Evaluation:
    stage: int
    elapsed_s: float
    verdict: GateVerdict
    baseline_scope: str
    decided_at: float = field(default_factory=time.time)


def stage_samples(samples: list[Sample], stage: int, weight_pct: float, min_samples: int,
                  until_ns: int | None = None, crossover: bool = False) -> tuple[list[Sample], list[Sample], str]:
    """(blue, green, baseline scope) for judging `stage`, like with like.

    Green: this stage only (its behaviour at this weight). Blue, while it still serves: the same
    stage, so both were measured at the same time under the same conditions (Argo's baseline and
    canary run side by side for the same reason). At 100% the stage alternates full-load windows of
    blue and green (Crossover), so blue's samples are again of this stage. Without crossover, the
    reference is blue alone at 100% in the baseline window before the first stage: the same load,
    at another time.
    `until_ns` keeps only the samples taken up to a decision (re-judging a past rollout).
    `crossover`: the 100% stage alternated blue and green windows (the plan's crossover_s > 0).
    """
    if until_ns is not None:
        # A sample is known once its response is complete: start + latency.
        samples = [s for s in samples if s.ts_ns + s.latency_ns <= until_ns]
    green = [s for s in samples if s.stage == stage and s.version == "green"]
    blue = [s for s in samples if s.stage == stage and s.version == "blue"]
    if weight_pct >= 100 and crossover:
        # Never fall back to an earlier baseline here: until blue's first full-load window has
        # samples, the stage is simply undecided.
        return blue, green, "blue in this stage's crossover windows"
    if len(blue) >= max(min_samples, 1):
        return blue, green, "blue in this stage"
    baseline = [s for s in samples if s.stage == BASELINE_STAGE and s.version == "blue"]
    if len(baseline) >= max(min_samples, 1):
        return baseline, green, "blue alone at 100% before stage 1"
    return [s for s in samples if BASELINE_STAGE <= s.stage <= stage and s.version == "blue"], green, \
        "blue in every stage so far"


def samples_to_turns(samples: list[Sample]):
    return samples_table(samples) if samples else None


# A crossover window's p99 needs this many samples to mean anything; fewer are the stragglers of
# a flip (requests in flight when the weights changed).
MIN_WINDOW_SAMPLES = 20


def window_p99s(samples: list[Sample]) -> tuple[np.ndarray, np.ndarray]:
    """(blue, green) p99 of each crossover window: runs of consecutive samples of one version."""
    runs: dict[str, list[float]] = {"blue": [], "green": []}
    ordered = sorted(samples, key=lambda sample: sample.ts_ns)
    start = 0
    for index in range(1, len(ordered) + 1):
        if index == len(ordered) or ordered[index].version != ordered[start].version:
            run = ordered[start:index]
            if len(run) >= MIN_WINDOW_SAMPLES:
                runs[run[0].version].append(float(np.percentile([s.latency_ns for s in run], 99)))
            start = index
    return np.array(runs["blue"]), np.array(runs["green"])


def stage_metrics(blue: list[Sample], green: list[Sample], crossover: bool = False):
    """The gate's metrics for one stage.

    In a crossover stage the p99 is judged window by window (a shift test on the windows' p99s):
    a p99 of pooled samples is set by a handful of scheduler stalls of a shared host, each hitting
    whichever version served at that moment, and a bootstrap that treats samples as independent
    made an identical green fail on p99 (+30%, +113%) in 2 of 10 A/A rollouts. Counting windows,
    not samples, is what the data support.
    """
    metrics = turns_metrics(samples_to_turns(blue), samples_to_turns(green))
    if not crossover:
        return metrics
    blue_p99s, green_p99s = window_p99s(blue + green)
    for index, metric in enumerate(metrics):
        if metric.name == "turns.latency_ns.p99":
            metrics[index] = MetricData("turns.latency_ns.p99", "shift", "ns", blue_p99s, green_p99s,
                                        [f"p99 per crossover window ({len(blue_p99s)} blue, {len(green_p99s)} green)"])
    return metrics


def judge_samples(blue: list[Sample], green: list[Sample], plan: Plan, crossover: bool = False) -> GateVerdict:
    return judge(stage_metrics(blue, green, crossover), plan.gate)


def run_hook(command: str, timeout_s: float, stop: threading.Event, env: dict | None = None) -> tuple[int, str]:
    """Run one hook (shell syntax allowed: these are the operator's own commands). Interruptible."""
    from core.children import spawn

    process = spawn(command, shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                    text=True, start_new_session=True, env={**os.environ, **(env or {})})
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


class HookFailed(Exception):
    pass


class RollbackFailed(WorkFailed):
    """The rollback's own write failed: journaled, post-mortem written, the watchdog retries.
    Never rolled back again (a second attempt would journal twice and lose the post-mortem)."""


class StageRefused(Exception):
    """The balancer says traffic must not move (green DOWN, weights not what was set, a restart)."""


@dataclass
class Looks:
    """Evaluations of one stage, counted against the plan's limits (Flagger's failure threshold)."""
    failed: int = 0
    undecided: int = 0


SETTLE_S = 0.3  # after each weight change, before a stage's samples count


class Crossover:
    """The 100% stage, like with like: full-load windows of green and blue in turn.

    At 100% blue serves nothing, and blue's samples from earlier stages were taken at another time
    and at a fraction of the load, which on a shared host moved an identical green's p99 by +9%.
    Alternating windows of `window_s` give both versions the same load, and interleave them in
    time so drift hits both: a crossover design (Argo runs baseline and canary side by side for
    the same reason). Short windows (0.25 s by default), so that a burst from another job on a
    shared host, about a second, falls on both versions. Both versions passed every split stage,
    so a blue window is no risk.
    """

    def __init__(self, window_s: float):
        self.window_s = window_s
        self.green_pct = 100.0
        self.flips = 0
        self.next_at = time.monotonic() + window_s

    def due(self) -> float | None:
        """The green weight to set now, or None."""
        now = time.monotonic()
        if self.window_s <= 0 or now < self.next_at:
            return None
        self.next_at = now + self.window_s
        self.flips += 1
        self.green_pct = 0.0 if self.green_pct else 100.0
        return self.green_pct

    # Whole windows of each version before the first look. With two each, a one-second burst
    # from another job could still fall mostly on one version, and an identical green failed on
    # p99 in 2 of 10 A/A rollouts; the windows must outnumber the bursts.
    MIN_WINDOWS = 6

    @property
    def ready(self) -> bool:
        """Off, or MIN_WINDOWS whole windows of blue and of green to judge."""
        return self.window_s <= 0 or self.flips >= 2 * self.MIN_WINDOWS + 1


@dataclass
class Control:
    action: str
    reason: str


class RolloutDriver:
    def __init__(self, plan: Plan, progress: Callable[[str], None] = lambda message: None,
                 adapter: TrafficAdapter | None = None, retry_of: str = "", skip_prepare: bool = False):
        self.plan = plan
        self.progress = progress
        # Roles swap with every finalized promotion: the next rollout starts from the new blue.
        blue, green = current_roles(plan.journal_path, plan.traffic.blue, plan.traffic.green)
        if (blue, green) != (plan.traffic.blue, plan.traffic.green):
            plan.traffic = replace(plan.traffic, blue=blue, green=green)
        self.adapter = adapter or make_adapter(plan.traffic)
        self.journal = Journal(plan.journal_path)
        self.stop = threading.Event()
        self.stop_reason = ""
        self.evaluations: list[Evaluation] = []
        self.collector: LoadCollector | None = None
        self.watchdog: subprocess.Popen | None = None
        self.run_id = ""
        self.retry_of = retry_of
        self.skip_prepare = skip_prepare
        self.weights = {"blue": 100.0, "green": 0.0}
        self.balancer_view: BalancerView | None = None
        self.paused = False
        self.controls_seen = 0
        self.notifier = Notifier(plan.notify, self.journal)
        # Callbacks run after a promotion, before the decommission grace period (e.g. chaos
        # experiments against the new blue). Each gets the driver; an exception is journaled.
        self.after_promotion: list[Callable[["RolloutDriver"], None]] = []
        # One summary per [after_promotion] experiment (agent.chaos.session.run_after_promotion).
        self.chaos_results: list[dict] = []

    # --- safety plumbing -------------------------------------------------------------------------
    def preflight(self) -> list[str]:
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
        return self.adapter.check()

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

    def shift(self, blue: float, green: float, reason: str) -> None:
        """Move traffic, then read the balancer back: what it says is what counts."""
        self.set_weights(blue, green, reason)
        view, restart = self.read_back()
        if view is None:
            return
        # A restart since the last read-back is caught here too: the crossover rewrites the
        # weights every window, so a restart between two looks would otherwise be papered over by
        # the next flip (weights match again, new instance taken as the reference).
        problem = restart or weights_mismatch(view, self.weights)
        if problem:
            raise StageRefused(f"after setting blue {blue:g} / green {green:g}: {problem}")
        self.journal.append("balancer", run_id=self.run_id, view=view.as_dict(), reason=reason)

    def read_back(self) -> tuple[BalancerView | None, str]:
        """The balancer's own view now, and why it restarted since the last read-back ('' if not)."""
        view = self.adapter.observe()
        if view is None:
            return None, ""
        restart = restart_problem(self.balancer_view, view, self.weights)
        self.balancer_view = view
        return view, restart

    def on_signal(self, signum, frame) -> None:  # noqa: ARG002 - signal signature
        self.stop_reason = f"interrupted by {signal.Signals(signum).name}"
        self.stop.set()

    def notify(self, event: str, **fields) -> None:
        self.notifier.send({"event": event, "rollout": self.plan.name, "run_id": self.run_id, **fields})

    # --- phases ----------------------------------------------------------------------------------
    def run(self) -> Outcome:
        from reports.bundle import new_run_id

        notes = self.preflight()
        self.run_id = new_run_id()
        self.journal.append("start", run_id=self.run_id, pid=os.getpid(), plan=str(self.plan.path),
                            name=self.plan.name, traffic=self.plan.traffic.as_dict(), plan_data=self.plan.raw,
                            stages=[stage.__dict__ for stage in self.plan.stages], retry_of=self.retry_of,
                            undo_hooks=self.plan.undo.__dict__, notes=notes)
        for note in notes:
            self.progress(f"warning: {note}")
        self.start_watchdog()
        previous = {signum: signal.signal(signum, self.on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            return self._run_phases()
        finally:
            if self.collector is not None:
                self.collector.stop()
            self.release_watchdog()
            self.notifier.wait()
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _run_phases(self) -> Outcome:
        traffic_moved = False
        stage_index = None
        try:
            if not self.skip_prepare:
                self._hooks("prepare", self.plan.prepare.commands, self.plan.prepare.timeout_s)
            self._hooks("validate", self.plan.validate.commands, self.plan.validate.timeout_s)
            if self.plan.shadow is not None:
                self._shadow()
            self.wait_green_up("before any traffic moves")
            traffic_moved = True
            self.shift(100, 0, "start from blue")
            self.collector = make_collector(self.plan.kpi, self.plan.traffic.blue, self.plan.traffic.green)
            self.collector.start()
            self._baseline()
            for stage_index, stage in enumerate(self.plan.stages):
                decision, reason = self._stage(stage_index, stage)
                if decision == "rollback":
                    return self.rollback(reason, stage_index)
                if decision == "promote":
                    break
            return self.promote(stage_index)
        except Interrupted as reason:
            return self.rollback(self.stop_reason or str(reason), stage_index, moved=traffic_moved)
        except HookFailed as failure:
            return self.rollback(str(failure), None, moved=traffic_moved, event="failed")
        except StageRefused as refusal:
            return self.rollback(str(refusal), stage_index, moved=traffic_moved,
                                 event="rolled_back" if traffic_moved else "failed")
        except RollbackFailed:
            raise
        except BaseException as error:  # noqa: BLE001 - any failure must still end on blue
            self.rollback(f"error: {type(error).__name__}: {error}", stage_index, moved=traffic_moved)
            raise

    def _hooks(self, phase: str, commands: list[str], timeout_s: float) -> None:
        env = {"GUARDIAN_ROLLOUT": self.plan.name, "GUARDIAN_RUN_ID": self.run_id,
               "GUARDIAN_BLUE_SERVER": self.plan.traffic.blue, "GUARDIAN_GREEN_SERVER": self.plan.traffic.green}
        for index, command in enumerate(commands):
            if self.stop.is_set():
                raise Interrupted(self.stop_reason)
            self.progress(f"{phase} [{index + 1}/{len(commands)}]: {command}")
            self.journal.append("hook_started", run_id=self.run_id, phase=phase, index=index, command=command)
            started = time.monotonic()
            code, output = run_hook(command, timeout_s, self.stop, env)
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

    def wait_green_up(self, when: str) -> None:
        """Green must be UP in the balancer's own health checks before it is given any share."""
        deadline = time.monotonic() + self.plan.traffic.wait_up_s
        while True:
            view, restart = self.read_back()
            if restart:
                raise StageRefused(f"{when}: {restart}")
            if view is None or view.green.routable:
                return
            if time.monotonic() >= deadline:
                raise StageRefused(f"green ({self.plan.traffic.green}) is {view.green.state} in the balancer "
                                   f"{when}: it was never given traffic (waited {self.plan.traffic.wait_up_s:g} s)")
            if self.stop.wait(0.2):
                raise Interrupted(self.stop_reason)

    def refuse_unless_green_up(self, when: str) -> None:
        """No waiting: green is UP in the balancer now, or the stage ends (StageRefused)."""
        try:
            view, restart = self.read_back()
        except WorkFailed as error:
            raise StageRefused(f"{when}: balancer unreadable: {error}") from None
        if restart:
            raise StageRefused(f"{when}: {restart}")
        if view is not None and not view.green.routable:
            raise StageRefused(f"{when}: green ({self.plan.traffic.green}) is {view.green.state} in the balancer")

    def _baseline(self) -> None:
        """Blue alone at 100%: a short warm-up, then the reference window of the 100% stage."""
        warmup_s = min(1.0, self.plan.kpi.baseline_s / 5)
        if self.stop.wait(warmup_s):
            raise Interrupted(self.stop_reason)
        self.collector.set_stage(BASELINE_STAGE)
        self.journal.append("baseline_started", run_id=self.run_id, seconds=self.plan.kpi.baseline_s)
        self.progress(f"baseline: blue alone at 100% for {self.plan.kpi.baseline_s:g} s")
        deadline = time.monotonic() + self.plan.kpi.baseline_s
        while not self.stop.wait(min(self.plan.evaluate_every_s, max(deadline - time.monotonic(), 0))):
            # Polled at the last tick too: a pause sent before the first stage holds it from its start.
            self.poll_controls()
            if time.monotonic() >= deadline:
                return
        raise Interrupted(self.stop_reason)

    def _stage(self, index: int, stage) -> tuple[str, str]:
        final = index == len(self.plan.stages) - 1
        self.wait_green_up(f"before stage {index + 1}")
        # The first requests after a weight change open new server connections (HAProxy had none
        # to green at weight 0; the service starts a thread per connection): a transient of the
        # step, not of green, and at 1% it is a large part of green's few samples. Not judged.
        self.collector.set_stage(WARMUP_STAGE)
        self.shift(100 - stage.weight_pct, stage.weight_pct, f"stage {index + 1}")
        # Journalled as soon as the weights moved: `status` must never show split traffic with
        # the previous stage's number (the settle below can take a while).
        self.journal.append("stage_started", run_id=self.run_id, stage=index, weight_pct=stage.weight_pct,
                            dwell_s=stage.dwell_s, max_dwell_s=stage.max_dwell_s, weights=self.weights)
        # While green serves alone (100%), a guard thread puts blue back the moment green is not UP.
        with AloneGuard(self.adapter, self.plan.traffic.green, active=stage.weight_pct >= 100) as guard:
            decision = self._stage_loop(index, stage, final, guard)
        if guard.problem and decision[0] != "rollback":
            raise StageRefused(f"stage {index + 1}: green serving alone: {guard.problem}")
        return decision

    def _stage_loop(self, index: int, stage, final: bool, guard: AloneGuard) -> tuple[str, str]:
        def refuse_if_guarded() -> None:
            if guard.problem:
                raise StageRefused(f"stage {index + 1}: green serving alone: {guard.problem}")

        if self.stop.wait(min(SETTLE_S, stage.dwell_s / 4)):
            raise Interrupted(self.stop_reason)
        self.collector.set_stage(index)
        self.progress(f"stage {index + 1}/{len(self.plan.stages)}: green {stage.weight_pct:g}%")
        started = time.monotonic()
        looks = Looks()
        crossover = Crossover(self.plan.crossover_s if stage.weight_pct >= 100 else 0.0)
        if crossover.window_s > 0:
            self.collector.set_stage(WARMUP_STAGE)
        tick_s = min(self.plan.evaluate_every_s, crossover.window_s or math.inf)
        next_look = time.monotonic() + self.plan.evaluate_every_s
        while True:
            if self.stop.wait(max(min(tick_s, next_look - time.monotonic()), 0.01)):
                raise Interrupted(self.stop_reason)
            refuse_if_guarded()
            flip = crossover.due()
            if flip is not None:
                with guard.lock:  # a flip and the guard's rollback write never interleave
                    refuse_if_guarded()
                    if flip:
                        self.refuse_unless_green_up(f"stage {index + 1}: before green's next full-load window")
                    self.shift(100 - flip, flip,
                               f"stage {index + 1} crossover: {'green' if flip else 'blue'} at 100%")
                # Green's first full-load window follows the step up from the last split stage (new
                # connections, threads): a transient blue never has. Every later window follows a
                # flip, for both versions alike, so judging starts at the first flip.
                self.collector.set_stage(index)
            if time.monotonic() < next_look:
                continue
            next_look = time.monotonic() + self.plan.evaluate_every_s
            control = self.poll_controls()
            if control is not None and control.action == "promote":
                return self._promote_now(index, control.reason)
            if control is not None and control.action == "resume":
                started, looks = time.monotonic(), Looks()
            # In a crossover the share moves every window and lags the flips: the weights read back
            # say where traffic goes, and only the unattributed share is checked.
            problem = self.balancer_problem(index, None if crossover.window_s > 0 else stage.weight_pct)
            refuse_if_guarded()  # the guard's own write is not "someone else's" weight change
            if not problem and not crossover.ready:
                continue  # not one whole window of each version yet: nothing to judge
            elapsed = time.monotonic() - started
            evaluation = self._evaluate(index, stage, elapsed)
            if problem:
                return self._decide(evaluation, "rollback", f"stage {index + 1} ({stage.weight_pct:g}%): {problem}")
            decision = self._judge_look(evaluation, stage, looks, final)
            if decision is not None:
                if decision[0] == "advance" and self.weights["green"] != stage.weight_pct:
                    with guard.lock:
                        refuse_if_guarded()
                        self.shift(100 - stage.weight_pct, stage.weight_pct,
                                   f"stage {index + 1} passed: crossover ends")
                return decision

    def _judge_look(self, evaluation: "Evaluation", stage, looks: Looks, final: bool) -> tuple[str, str] | None:
        verdict, index, elapsed = evaluation.verdict, evaluation.stage, evaluation.elapsed_s
        label = f"stage {index + 1} ({stage.weight_pct:g}%)"
        if verdict.verdict == "fail":
            looks.failed += 1
            if looks.failed >= self.plan.max_failed_looks:
                return self._decide(evaluation, "rollback", f"{label}: gate failed ({looks.failed} failed "
                                                            f"look(s)): {verdict.reason}")
            return None
        if verdict.verdict == "pass":
            if elapsed >= stage.dwell_s and not self.paused:
                return self._decide(evaluation, "advance", f"stage {index + 1}: gate passed")
            return None
        looks.undecided += 1
        limit = self.plan.max_inconclusive_looks
        if elapsed < stage.max_dwell_s and not (limit and looks.undecided >= limit):
            return None
        if self.paused:
            return None
        why = (f"still {verdict.verdict} after {elapsed:.0f} s ({looks.undecided} undecided looks): "
               f"{verdict.reason}")
        failing = [m.metric for m in verdict.metrics if m.classification == "fail"]
        green_samples = max((m.candidate_count for m in verdict.metrics), default=0)
        if green_samples == 0:
            return self._decide(evaluation, "rollback", f"{label}: no green samples at all: no evidence is "
                                                        f"not a pass ({verdict.reason})")
        if failing:
            return self._decide(evaluation, "rollback", f"{label}: {', '.join(failing)} failed while the "
                                                        f"gate stayed {verdict.verdict}")
        policy = self.plan.on_inconclusive
        if policy == "pause":
            self.pause(f"{label}: {why}; waiting for `rollout resume`, `promote` or `abort`")
            return None
        if final or policy == "rollback":
            return self._decide(evaluation, "rollback", f"{label}: {why}")
        return self._decide(evaluation, "advance", f"{label}: {why}; advancing (on_inconclusive = advance)")

    def balancer_problem(self, index: int, share_pct: float | None) -> str:
        """Why the balancer's own view says this stage cannot be judged or continued, or ''."""
        try:
            view, restart = self.read_back()
        except WorkFailed as error:
            return f"balancer unreadable: {error}"
        if view is not None:
            problem = restart or weights_mismatch(view, self.weights)
            if problem:
                return problem
        attributed = self.collector.snapshot()
        return traffic_share_problem(attributed, self.collector.unattributed.by_stage.get(index, 0), index,
                                     share_pct, self.plan.max_unattributed_pct)

    def _evaluate(self, index: int, stage, elapsed: float) -> "Evaluation":
        seen_until = time.time()
        samples = self.collector.snapshot()
        crossover = self.plan.crossover_s > 0 and stage.weight_pct >= 100
        blue, green, scope = stage_samples(samples, index, stage.weight_pct, self.plan.gate.min_samples,
                                           crossover=crossover)
        verdict = judge_samples(blue, green, self.plan, crossover)
        evaluation = Evaluation(index, elapsed, verdict, scope, seen_until)
        self.evaluations.append(evaluation)
        return evaluation

    def _decide(self, evaluation: "Evaluation", decision: str, reason: str) -> tuple[str, str]:
        verdict = evaluation.verdict
        record = self.journal.append(
            "decision", run_id=self.run_id, stage=evaluation.stage, decision=decision, verdict=verdict.verdict,
            score=None if math.isnan(verdict.score) else verdict.score, reason=reason,
            baseline_scope=evaluation.baseline_scope, decided_at_ns=int(evaluation.decided_at * 1e9),
            metrics={m.metric: [m.classification, m.baseline_count, m.candidate_count,
                                None if math.isnan(m.effect_pct) else round(m.effect_pct, 2)]
                     for m in verdict.metrics})
        self.progress(reason)
        self.notify("decision", stage=evaluation.stage + 1, decision=decision, verdict=verdict.verdict,
                    reason=reason, ts=record["ts"])
        try:
            append_decision(self.plan.record_dir, decision_rows(
                verdict, self.plan.gate, context=f"rollout {self.plan.name} stage {evaluation.stage + 1}",
                baseline=f"{self.run_id}:blue", candidate=f"{self.run_id}:green",
                baseline_run_id=self.run_id, candidate_run_id=self.run_id))
        except (OSError, BadInput) as error:
            self.journal.append("warning", run_id=self.run_id, message=f"decision record: {error}")
        return decision, reason

    # --- controls --------------------------------------------------------------------------------
    def poll_controls(self) -> Control | None:
        """The newest unseen `control` record of this run (pause and resume act here)."""
        controls = last_run(self.plan.journal_path).controls
        fresh, self.controls_seen = controls[self.controls_seen:], len(controls)
        chosen = None
        for record in fresh:
            control = Control(record.get("action", ""), record.get("reason", ""))
            if control.action == "pause" and not self.paused:
                self.pause(f"paused by operator: {control.reason}")
            elif control.action == "resume" and self.paused:
                self.paused = False
                self.journal.append("resumed", run_id=self.run_id, reason=control.reason)
                self.notify("resumed", reason=control.reason)
                self.progress(f"resumed: {control.reason}")
                chosen = control
            elif control.action in ("promote", "undo"):
                chosen = control
        return chosen

    def pause(self, reason: str) -> None:
        self.paused = True
        self.journal.append("paused", run_id=self.run_id, reason=reason, weights=self.weights)
        self.notify("paused", reason=reason, weights=self.weights)
        self.progress(reason)

    def _promote_now(self, index: int, reason: str) -> tuple[str, str]:
        """`rollout promote`: skip the remaining stages, recorded with the operator's reason."""
        self.wait_green_up("before a manual promotion")
        self.journal.append("decision", run_id=self.run_id, stage=index, decision="promote", verdict="manual",
                            reason=f"promoted by operator: {reason}", decided_at_ns=time.time_ns())
        self.notify("decision", stage=index + 1, decision="promote", verdict="manual", reason=reason)
        self.progress(f"promoted by operator at stage {index + 1}: {reason}")
        self.shift(0, 100, "manual promotion")
        return "promote", reason

    # --- endings ---------------------------------------------------------------------------------
    def promote(self, stage: int | None) -> Outcome:
        reason = "every stage passed the gate"
        manual = self.journal_decision("manual")
        if manual is not None:
            reason = manual["reason"]
        self.journal.append("promoted", run_id=self.run_id, weights=self.weights, reason=reason, stage=stage)
        self.notify("promoted", reason=reason, weights=self.weights)
        if self.collector is not None:
            self.collector.stop()
        hooks_done = self._promote_hooks()
        if hooks_done:
            self._after_promotion()
        # Written after the experiments, so the bundle holds their verdicts; "promoted" is
        # journaled above, so a driver dying meanwhile leaves green serving, as decided.
        report = self.write_report("promoted", reason)
        self.progress(f"promoted: green serves 100%; report {report}")
        undone = self.complete_promotion() if hooks_done else None
        if undone is not None:
            return Outcome("undone", undone, self.run_id, report, stage, after_promotion=self.chaos_results)
        return Outcome("promoted", reason, self.run_id, report, stage, after_promotion=self.chaos_results)

    def journal_decision(self, verdict: str) -> dict | None:
        for record in reversed(last_run(self.plan.journal_path).records):
            if record["event"] == "decision" and record.get("verdict") == verdict:
                return record
        return None

    def _promote_hooks(self) -> bool:
        try:
            self._hooks("promote", self.plan.promote.commands, self.plan.promote.timeout_s)
        except (HookFailed, Interrupted) as error:
            # Green serves and passed: a failed config hook is loud, not a reason to flip back.
            self.journal.append("warning", run_id=self.run_id, message=f"promote hooks: {error}")
            self.notify("warning", message=f"promote hooks: {error}")
            self.progress(f"warning: {error}; blue is not decommissioned")
            return False
        return True

    def _after_promotion(self) -> None:
        """The plan's chaos experiments against the new blue, then the callbacks. A refuted
        hypothesis is reported (bundle, journal, exit code), never a reason to flip back: the
        gate promoted green, and blue may already be unfit to serve (`rollout undo` decides)."""
        settings = self.plan.after_promotion
        if settings is not None:
            from agent.chaos.session import run_after_promotion

            self.journal.append("after_promotion_started", run_id=self.run_id,
                                experiments=[str(p) for p in settings.experiments])
            self.chaos_results = run_after_promotion(
                settings.experiments, state_dir=settings.state_dir, config_path=settings.config,
                environment=settings.environment, progress=self.progress)
            verdicts = [{"experiment": r["experiment"], "verdict": r["verdict"], "reason": r.get("reason", ""),
                         "bundle": r.get("bundle")} for r in self.chaos_results]
            self.journal.append("after_promotion", run_id=self.run_id, results=verdicts)
            for result in verdicts:
                self.progress(f"after promotion: {result['experiment']}: {result['verdict']}")
                if result["verdict"] != "held":
                    self.notify("warning", message=f"after promotion, chaos experiment {result['experiment']} "
                                                   f"{result['verdict']}: {result['reason']}")
        for callback in self.after_promotion:
            try:
                callback(self)
            except Exception as error:  # noqa: BLE001 - a callback never undoes a promotion
                self.journal.append("warning", run_id=self.run_id, message=f"after-promotion callback: {error}")

    def complete_promotion(self) -> str | None:
        """After the [promote] hooks and the experiments: the grace period (undo), [decommission]."""
        grace_s = self.plan.decommission_grace_s if self.plan.decommission.commands or self.plan.undo.commands else 0
        if grace_s:
            self.journal.append("decommission_pending", run_id=self.run_id, grace_s=grace_s,
                                deadline=time.time() + grace_s)
            self.progress(f"blue kept for {grace_s:g} s: `rollout undo` brings it back")
            deadline = time.monotonic() + grace_s
            while not self.stop.wait(min(self.plan.evaluate_every_s, max(deadline - time.monotonic(), 0.01))):
                control = self.poll_controls()
                if control is not None and control.action == "undo":
                    undo_promotion(self.plan.journal_path, control.reason, self.adapter)
                    return control.reason
                if time.monotonic() >= deadline:
                    break
            if self.stop.is_set():
                self.journal.append("warning", run_id=self.run_id,
                                    message=f"{self.stop_reason} during the grace period: blue not decommissioned")
                return None
        try:
            self._hooks("decommission", self.plan.decommission.commands, self.plan.decommission.timeout_s)
        except (HookFailed, Interrupted) as error:
            self.journal.append("warning", run_id=self.run_id, message=f"decommission hooks: {error}")
            self.notify("warning", message=f"decommission hooks: {error}")
            return None
        if self.plan.decommission.commands:
            self.journal.append("decommissioned", run_id=self.run_id, server=self.plan.traffic.blue)
        self.journal.append("roles", run_id=self.run_id, blue=self.plan.traffic.green, green=self.plan.traffic.blue)
        self.notify("decommissioned", server=self.plan.traffic.blue, new_blue=self.plan.traffic.green)
        return None

    def rollback(self, reason: str, stage: int | None, moved: bool = True, event: str = "rolled_back") -> Outcome:
        decided = time.monotonic()
        self.journal.append("rollback_started", run_id=self.run_id, reason=reason, stage=stage)
        error_text = ""
        to_blue_ms = None
        try:
            self.set_weights(100, 0, "rollback")
            to_blue_ms = (time.monotonic() - decided) * 1000.0
            self.confirm_blue()
        except Exception as error:  # noqa: BLE001 - keep going: the watchdog retries from the journal
            error_text = f"{type(error).__name__}: {error}"
        to_blue_ms = (time.monotonic() - decided) * 1000.0 if to_blue_ms is None else to_blue_ms
        if self.collector is not None:
            self.collector.stop()
        if error_text:
            # Not terminal: the watchdog sees an unfinished run and keeps trying to restore blue.
            # The post-mortem is written all the same: it is most needed exactly now.
            self.journal.append("rollback_error", run_id=self.run_id, error=error_text, reason=reason)
            report = self.write_report("rollback_failed", f"{reason}; then the rollback failed: {error_text}") \
                if moved and self.collector is not None else None
            self.notify("rollback_error", reason=reason, error=error_text, report=str(report or ""))
            raise RollbackFailed(f"rollback to blue failed ({error_text}); the watchdog will retry"
                             + (f"; post-mortem {report}" if report else ""))
        self.journal.append(event, run_id=self.run_id, reason=reason, stage=stage, weights=self.weights,
                            decision_to_blue_ms=round(to_blue_ms, 3), traffic_moved=moved)
        self.notify(event, reason=reason, stage=None if stage is None else stage + 1,
                    decision_to_blue_ms=round(to_blue_ms, 3))
        self.progress(f"rolled back to blue in {to_blue_ms:.0f} ms: {reason}")
        report = None
        if moved and self.collector is not None:
            report = self.write_report(event, reason)
            self.progress(f"post-mortem: {report}")
        return Outcome(event, reason, self.run_id, report, stage, to_blue_ms)

    def confirm_blue(self) -> None:
        """A rollback is read back too: weights only (a DOWN blue is no reason to stop trying)."""
        view = self.adapter.observe()
        if view is None:
            return
        if any(seen is not None and seen != wanted for seen, wanted in ((view.blue.weight, 100), (view.green.weight, 0))):
            raise WorkFailed(f"after the rollback the balancer says blue {weight_text(view.blue.weight)} / "
                             f"green {weight_text(view.green.weight)}")
        self.journal.append("balancer", run_id=self.run_id, view=view.as_dict(), reason="rollback")

    # --- reports ---------------------------------------------------------------------------------
    def write_report(self, status: str, reason: str) -> Path | None:
        from agent.rollout.report import write_rollout_bundle

        try:
            return write_rollout_bundle(self, status, reason)
        except Exception as error:  # noqa: BLE001 - a report failure must not undo the rollback
            self.journal.append("warning", run_id=self.run_id, message=f"report not written: {error}")
            return None


def restart_problem(earlier: BalancerView | None, view: BalancerView, weights: dict) -> str:
    """Why `view` is of another balancer instance than `earlier` (a restart or reload), or ''."""
    if not view.restarted_since(earlier):
        return ""

    def uptime(seen: BalancerView) -> str:
        return "" if seen.uptime_s is None else f" up {seen.uptime_s:g} s"

    # Said even when the weights read back match (the crossover has just written them again):
    # between the restart and that write, the balancer served its config file's weights.
    return (f"the balancer restarted ({earlier.instance}{uptime(earlier)} -> {view.instance}{uptime(view)}); "
            f"weights read back: blue {weight_text(view.blue.weight)} / green {weight_text(view.green.weight)}, "
            f"the driver set blue {weights['blue']:g} / green {weights['green']:g}")


def weight_text(weight: float | None) -> str:
    return "?" if weight is None else f"{weight:g}"


def weights_mismatch(view: BalancerView, expected: dict) -> str:
    for role in ("blue", "green"):
        actual = getattr(view, role).weight
        if actual is not None and abs(actual - expected[role]) > 1e-9:
            return (f"the balancer says blue {weight_text(view.blue.weight)} / green {weight_text(view.green.weight)} "
                    f"but the driver set "
                    f"blue {expected['blue']:g} / green {expected['green']:g} (a restart, or someone else)")
    if expected["green"] > 0 and not view.green.routable:
        return f"green is {view.green.state} in the balancer while it should take {expected['green']:g}%"
    if expected["blue"] > 0 and not view.blue.routable:
        return f"blue is {view.blue.state} in the balancer while it should take {expected['blue']:g}%"
    return ""


# A share this many binomial standard deviations away from the weight is not chance; and since
# HAProxy's weighted round robin over keep-alive connections is bursty rather than binomial (a 50%
# stage measured 62% green here), only a share below half of what a version was given counts.
SHARE_SIGMAS = 5.0
MIN_SHARE_REQUESTS = 200


def traffic_share_problem(samples: list[Sample], unattributed: int, stage: int, weight_pct: float | None,
                          max_unattributed_pct: float) -> str:
    """Whether this stage's requests went where the weights say (the balancer may not say)."""
    in_stage = [s for s in samples if s.stage == stage]
    total = len(in_stage) + unattributed
    if total < MIN_SHARE_REQUESTS:
        return ""
    if 100.0 * unattributed / total > max_unattributed_pct:
        return (f"{unattributed} of {total} requests ({100.0 * unattributed / total:.1f}%) could not be "
                f"attributed to blue or green (max_unattributed_pct = {max_unattributed_pct:g})")
    if weight_pct is None:
        return ""
    green = sum(s.version == "green" for s in in_stage)
    for version, given_pct, taken in (("green", weight_pct, green), ("blue", 100.0 - weight_pct, len(in_stage) - green)):
        expected = given_pct / 100.0
        spread = math.sqrt(len(in_stage) * expected * (1 - expected))
        if taken < len(in_stage) * expected / 2 and len(in_stage) * expected - taken > SHARE_SIGMAS * spread + 1:
            return (f"{version} took {100.0 * taken / len(in_stage):.1f}% of this stage's {len(in_stage)} requests "
                    f"but was given {given_pct:g}%")
    return ""


class Notifier:
    """Every decision goes to the journal (done by the caller) and to the plan's [notify] command,
    JSON on stdin, in a thread so a slow webhook never delays a rollback."""

    def __init__(self, settings, journal: Journal):
        self.settings = settings
        self.journal = journal
        self.threads: list[threading.Thread] = []

    def send(self, payload: dict) -> None:
        if self.settings is None:
            return
        thread = threading.Thread(target=self._run, args=(payload,), daemon=True)
        thread.start()
        self.threads.append(thread)

    def _run(self, payload: dict) -> None:
        import json

        try:
            # One JSON line: `cat >> decisions.jsonl` as the hook gives one line per decision, and
            # hooks run side by side append whole lines (one small O_APPEND write each).
            result = subprocess.run(self.settings.command, shell=True, input=json.dumps(payload, default=str) + "\n",
                                    capture_output=True, text=True, timeout=self.settings.timeout_s)
            failure = f"exit {result.returncode}" if result.returncode else ""
        except (OSError, subprocess.TimeoutExpired) as error:
            failure = str(error)
        if failure:
            self.journal.append("warning", run_id=payload.get("run_id", ""),
                                message=f"notify command ({payload['event']}): {failure}")

    def wait(self) -> None:
        for thread in self.threads:
            thread.join(timeout=self.settings.timeout_s + 1 if self.settings else 1)




def stage_summary_rows(samples: list[Sample], plan: Plan) -> list[dict]:
    rows = []
    for index, stage in [(BASELINE_STAGE, Stage(0.0, 0, 0))] + list(enumerate(plan.stages)):
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


def restore_blue_from_journal(journal_path: Path, reason: str, event: str, driver_alive: bool | None = None) -> dict:
    """Used by `rollout abort` and the watchdog: put traffic on blue with only the journal.

    The watchdog passes driver_alive=False: its pipe closed, so the driver is gone even while its
    pid still exists for a moment (exiting, not yet reaped).
    """

    state = last_run(journal_path)
    adapter = adapter_from_dict(state.start["traffic"])
    journal = Journal(journal_path)
    started = time.monotonic()
    adapter.all_to_blue()
    return journal.append(event, run_id=state.run_id, reason=reason, weights={"blue": 100, "green": 0},
                          decision_to_blue_ms=round((time.monotonic() - started) * 1000.0, 3),
                          driver_alive=pid_alive(state.pid) if driver_alive is None else driver_alive)


def undo_promotion(journal_path: Path, reason: str, adapter: TrafficAdapter | None = None) -> dict:
    """`rollout undo`: after a promotion, before blue is decommissioned, blue serves again."""

    state = last_run(journal_path)
    if state.status != "promoted":
        raise BadInput(f"rollout {state.start.get('name')} run {state.run_id} is {state.status}, not promoted: "
                       "nothing to undo")
    if state.last_of("decommissioned") is not None:
        raise BadInput(f"run {state.run_id}: blue was decommissioned after the grace period; undo is no longer "
                       "possible (start a new rollout to go back)")
    adapter = adapter or adapter_from_dict(state.start["traffic"])
    view = adapter.observe()
    if view is not None and not view.blue.routable:
        raise WorkFailed(f"blue is {view.blue.state} in the balancer: undo would send every request to it")
    journal = Journal(journal_path)
    started = time.monotonic()
    adapter.all_to_blue()
    to_blue_ms = (time.monotonic() - started) * 1000.0
    hooks = state.start.get("undo_hooks") or {"commands": [], "timeout_s": 600}
    failures = []
    for index, command in enumerate(hooks["commands"]):
        code, output = run_hook(command, hooks["timeout_s"], threading.Event(), {})
        journal.append("hook_finished", run_id=state.run_id, phase="undo", index=index, exit_code=code,
                       output_tail=output[-500:])
        if code != 0:
            failures.append(f"undo hook {index + 1} failed (exit {code}): {command}")
    if state.last_of("roles") is not None:  # swap back: blue is blue again for the next run
        journal.append("roles", run_id=state.run_id, blue=state.start["traffic"]["blue"],
                       green=state.start["traffic"]["green"])
    return journal.append("undone", run_id=state.run_id, reason=reason, weights={"blue": 100, "green": 0},
                          decision_to_blue_ms=round(to_blue_ms, 3), hook_failures=failures)


def report_samples(report) -> list[Sample]:
    if not report.has("turns") or "version" not in report.table("turns").column_names:
        raise BadInput(f"{report.path}: not a rollout report (no turns with a version column)")
    table = report.table("turns").select(["version", "stage", "ts", "latency_ns", "status", "error"])
    ts_ns = table.column("ts").cast("int64").to_pylist()
    return [Sample(row["version"], row["stage"], ts, row["latency_ns"], row["status"], row["error"], 0, 0)
            for row, ts in zip(table.drop(["ts"]).to_pylist(), ts_ns, strict=True)]


def rollout_report_metrics(report, stage_number: int | None, min_samples: int):
    """(metrics, stage number 1-based, scope) of a rollout report, split as the driver split them.

    Only the samples taken up to the stage's last decision count, so a re-judge sees what the
    driver saw when it decided (a post-mortem also holds samples taken after the decision).
    """
    samples = report_samples(report)
    green_stages = sorted({s.stage for s in samples if s.version == "green" and s.stage >= 0})
    if not green_stages:
        raise BadInput(f"{report.path}: green served no request in this rollout")
    stage = green_stages[-1] if stage_number is None else stage_number - 1
    if stage not in green_stages:
        raise BadInput(f"--stage {stage_number}: green served nothing then (stages with green samples: "
                       f"{', '.join(str(s + 1) for s in green_stages)})")
    rollout = report.manifest.get("rollout", {})
    stages = rollout.get("stages", [])
    weight_pct = stages[stage]["weight_pct"] if stage < len(stages) else 100.0
    decided = [d["decided_at_ns"] for d in rollout.get("decisions", []) if d.get("stage") == stage
               and d.get("decided_at_ns")]
    until_ns = decided[-1] if decided else None
    crossover = rollout.get("crossover_s", 0) > 0 and weight_pct >= 100
    blue, green, scope = stage_samples(samples, stage, weight_pct, min_samples, until_ns, crossover=crossover)
    return stage_metrics(blue, green, crossover), stage + 1, scope
