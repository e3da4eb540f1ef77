"""Judging a chaos run: each check gets a classification in the gate's vocabulary
(pass | marginal | fail | inconclusive | skipped), and the checks together give the verdict.

- steady_state.before / .during / .after: the experiment's own tolerances (max_error_rate_pct,
  max_p99_ms) on the experiment group — what "the order API keeps answering" means;
- control_unaffected: agent/gate on control before vs control during the fault; the gate's pass is
  non-inferiority (the interval's worse end stays within the threshold), so "no evidence of harm"
  is not enough: an interval too wide to tell is inconclusive, and the run is invalid;
- experiment_vs_control: agent/gate on control vs experiment during the fault (measured at the
  same time, so host noise hits both sides);
- expect[i]: the expectation became true within within_s of the fault;
- fault_bit[i]: the injector's own proof through the faulted path; a fault that did not bite
  makes the run invalid (whatever the KPIs say, nothing was tested);
- recovery: the steady state holds again within after_s of the removal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from agent.chaos.experiment import Experiment, SteadyState
from agent.chaos.sampler import window_stats
from agent.gate.kpi import turns_metrics
from agent.gate.verdict import GateVerdict, judge
from agent.rollout.collector import Sample, samples_table

VERDICTS = ("held", "refuted", "aborted", "not-steady", "invalid")
GATE_METRICS = ("turns.latency_ns", "turns.error_rate")
# The recovery point must be followed by at least this much steady time to count.
RECOVERY_HOLD_S = 1.0


@dataclass
class Check:
    name: str
    classification: str
    reason: str
    details: dict[str, Any] = field(default_factory=dict)
    gate: GateVerdict | None = None

    def as_dict(self) -> dict[str, Any]:
        data = {"name": self.name, "classification": self.classification, "reason": self.reason,
                "details": self.details}
        if self.gate is not None:
            data["gate"] = {"verdict": self.gate.verdict, "reason": self.gate.reason,
                            "metrics": {m.metric: m.classification for m in self.gate.metrics}}
        return data


def tolerance_check(name: str, samples: list[Sample], steady: SteadyState, min_samples: int = 10) -> Check:
    stats = window_stats(samples)
    if stats["count"] < min_samples:
        return Check(name, "inconclusive", f"{stats['count']} samples, need at least {min_samples}", stats)
    problems = []
    if stats["error_rate_pct"] > steady.max_error_rate_pct:
        problems.append(f"error rate {stats['error_rate_pct']:.2f}% > {steady.max_error_rate_pct:g}%")
    if stats["p99_ms"] > steady.max_p99_ms:
        problems.append(f"p99 {stats['p99_ms']:.1f} ms > {steady.max_p99_ms:g} ms")
    if problems:
        return Check(name, "fail", "; ".join(problems) + f" ({stats['count']} requests)", stats)
    return Check(name, "pass", f"error rate {stats['error_rate_pct']:.2f}% <= {steady.max_error_rate_pct:g}%, "
                               f"p99 {stats['p99_ms']:.1f} ms <= {steady.max_p99_ms:g} ms "
                               f"({stats['count']} requests)", stats)


def gate_check(name: str, baseline: list[Sample], candidate: list[Sample], experiment: Experiment,
               what: str) -> Check:
    base = samples_table(baseline) if baseline else None
    cand = samples_table(candidate) if candidate else None
    metrics = [m for m in turns_metrics(base, cand) if m.name in GATE_METRICS]
    verdict = judge(metrics, experiment.gate)
    classification = verdict.verdict
    details = {"baseline": window_stats(baseline), "candidate": window_stats(candidate)}
    return Check(name, classification, f"{what}: gate {verdict.verdict} ({verdict.reason})", details, verdict)


def recovery_check(after: list[Sample], removed_ns: int | None, steady: SteadyState) -> tuple[Check, float | None]:
    """recovery_s: time from the removal to the first request from which every later request of
    the after phase meets the steady state (followed by at least RECOVERY_HOLD_S of them)."""
    if removed_ns is None or not after:
        return Check("recovery", "inconclusive", "no samples after the fault"), None
    ordered = sorted(after, key=lambda s: s.ts_ns)
    last_ns = ordered[-1].ts_ns
    for position, sample in enumerate(ordered):
        if (last_ns - sample.ts_ns) / 1e9 < RECOVERY_HOLD_S:
            break
        stats = window_stats(ordered[position:])
        if stats["error_rate_pct"] <= steady.max_error_rate_pct and stats["p99_ms"] <= steady.max_p99_ms:
            recovery_s = max(0.0, (sample.ts_ns - removed_ns) / 1e9)
            return Check("recovery", "pass", f"steady again {recovery_s:.2f} s after the removal "
                                             f"(after_s = {steady.after_s:g})",
                         {"recovery_s": recovery_s, **stats}), recovery_s
    tail = window_stats(ordered)
    return Check("recovery", "fail", f"the steady state did not hold again within after_s = {steady.after_s:g} s "
                                     f"(error rate {tail['error_rate_pct']:.2f}%, p99 {tail['p99_ms']:.1f} ms)",
                 tail), None


def proof_check(index: int, kind: str, proof: dict | None, error: str = "") -> Check:
    name = f"fault_bit[{index}]"
    if proof is None:
        return Check(name, "inconclusive", f"{kind}: no proof ({error or 'the fault never became active'})")
    text = f"{kind}: {proof.get('metric')} expected {proof.get('expected')}, measured {proof.get('measured')}"
    return Check(name, "pass" if proof.get("bit") else "fail", text, dict(proof))


def verdict_of(checks: list[Check], aborted_reason: str = "") -> tuple[str, str]:
    """(verdict, reason) from the checks, in order of precedence."""
    by_name = {check.name: check for check in checks}
    unsteady = [c for c in checks if c.name.endswith(".before") and c.classification != "pass"]
    if unsteady:
        return "not-steady", "the steady state did not hold before the fault: " + "; ".join(
            f"{check.name}: {check.reason}" for check in unsteady)
    if aborted_reason:
        return "aborted", aborted_reason
    for check in checks:
        if check.name.startswith("fault_bit") and check.classification != "pass":
            return "invalid", f"the fault did not take effect, nothing was tested: {check.reason}"
    control = by_name.get("control_unaffected")
    if control is not None and control.classification == "inconclusive":
        return "invalid", f"cannot tell whether the control was affected: {control.reason}"
    failed = [check for check in checks if check.classification == "fail"]
    if failed:
        return "refuted", "; ".join(f"{check.name}: {check.reason}" for check in failed)
    open_checks = [c for c in checks if c.classification == "inconclusive" and c.name != "experiment_vs_control"]
    if open_checks:
        return "invalid", "; ".join(f"{check.name}: {check.reason}" for check in open_checks)
    return "held", "every check passed"


def finite(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value
