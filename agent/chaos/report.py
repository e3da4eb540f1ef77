"""The chaos bundle, its findings, the gate's decision record and the `chaos_runs` dataset.

    DIR/turns.parquet          every KPI request: group (experiment|control), phase, latency_ns,
                               status, error (the gate reads it like any other bundle's turns)
    DIR/chaos_faults.parquet   one row per fault: applying/applied/removed times, apply/remove
                               ms, who removed it, the exact undo, the proof it bit
    DIR/chaos_checks.parquet   one row per check with its classification
    DIR/chaos_runs.parquet     one row per run (the fleet dataset's `chaos_runs` table)
    DIR/findings.parquet       what weakness was found and what to fix
    DIR/journal.jsonl          this run's journal records
    DIR/manifest.json          last; its "chaos" key repeats the verdict
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from agent.chaos import journal
from agent.chaos.checks import Check
from agent.chaos.experiment import Experiment
from agent.chaos.runner import ChaosRun, Outcome
from agent.chaos.sampler import PHASES, window_stats
from agent.gate.record import append_decision, decision_rows
from agent.rollout.collector import samples_table
from probes.base import finding, findings_table, rows_to_table
from reports.bundle import BundleWriter, ProbeRecord

PROBE = "chaos"

FAULTS_SCHEMA = pa.schema([
    ("fault", pa.int32()), ("kind", pa.string()), ("target", pa.string()), ("backend", pa.string()),
    ("undo", pa.string()), ("blast_radius", pa.string()), ("spec_json", pa.string()),
    ("applying_at", pa.timestamp("ns", tz="UTC")), ("applied_at", pa.timestamp("ns", tz="UTC")),
    ("removed_at", pa.timestamp("ns", tz="UTC")), ("apply_ms", pa.float64()), ("remove_ms", pa.float64()),
    ("removed_by", pa.string()), ("proof_metric", pa.string()), ("proof_expected", pa.string()),
    ("proof_measured", pa.string()), ("proof_bit", pa.bool_()), ("proof_error", pa.string()),
])
CHECKS_SCHEMA = pa.schema([
    ("check", pa.string()), ("classification", pa.string()), ("reason", pa.string()),
    ("details_json", pa.string()),
])
RUNS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("started_at", pa.timestamp("us", tz="UTC")), ("hostname", pa.string()),
    ("title", pa.string()), ("experiment_path", pa.string()), ("environment", pa.string()),
    ("fault_kinds", pa.string()), ("verdict", pa.string()), ("reason", pa.string()),
    ("aborted_by", pa.string()), ("recovery_s", pa.float64()), ("planned_s", pa.float64()),
    ("checks_failed", pa.string()),
    ("experiment_p99_ms_before", pa.float64()), ("experiment_p99_ms_fault", pa.float64()),
    ("experiment_p99_ms_after", pa.float64()), ("experiment_error_rate_pct_fault", pa.float64()),
    ("control_p99_ms_fault", pa.float64()), ("control_error_rate_pct_fault", pa.float64()),
])


def turns_table(outcome: Outcome) -> pa.Table:
    table = samples_table(outcome.samples)
    groups = [sample.version for sample in outcome.samples]
    phases = [PHASES[sample.stage] if 0 <= sample.stage < len(PHASES) else "warmup" for sample in outcome.samples]
    return table.append_column("group", pa.array(groups, pa.string())).append_column(
        "phase", pa.array(phases, pa.string()))


def faults_table(outcome: Outcome, experiment: Experiment) -> pa.Table:
    rows = []
    for record, fault in zip(outcome.faults, experiment.faults, strict=True):
        proof = record.proof or {}
        rows.append({
            "fault": record.index, "kind": record.kind, "target": str(record.plan.get("target", "")),
            "backend": str(record.plan.get("backend", "")), "undo": str(record.plan.get("undo", "")),
            "blast_radius": str(record.plan.get("blast_radius", "")), "spec_json": json.dumps(fault.spec, default=str),
            "applying_at": record.applying_ns, "applied_at": record.applied_ns,
            "removed_at": record.removed_ns, "apply_ms": record.apply_ms, "remove_ms": record.remove_ms,
            "removed_by": record.removed_by, "proof_metric": str(proof.get("metric", "")),
            "proof_expected": json.dumps(proof.get("expected"), default=str),
            "proof_measured": json.dumps(proof.get("measured"), default=str),
            "proof_bit": proof.get("bit") if proof else None, "proof_error": record.proof_error,
        })
    return rows_to_table(rows, FAULTS_SCHEMA)


def checks_table(checks: list[Check]) -> pa.Table:
    return rows_to_table([{"check": c.name, "classification": c.classification, "reason": c.reason,
                           "details_json": json.dumps(c.details, default=str)} for c in checks], CHECKS_SCHEMA)


def _stat(outcome: Outcome, group: str, phase: str, name: str) -> float | None:
    index = PHASES.index(phase)
    return window_stats([s for s in outcome.samples if s.version == group and s.stage == index])[name]


def runs_table(outcome: Outcome, experiment: Experiment, started_at: datetime, hostname: str) -> pa.Table:
    row = {
        "run_id": outcome.run_id, "started_at": started_at, "hostname": hostname, "title": experiment.title,
        "experiment_path": str(experiment.path), "environment": experiment.environment,
        "fault_kinds": ",".join(f.kind for f in experiment.faults), "verdict": outcome.verdict,
        "reason": outcome.reason, "aborted_by": outcome.aborted_by, "recovery_s": outcome.recovery_s,
        "planned_s": experiment.planned_s,
        "checks_failed": ",".join(c.name for c in outcome.checks if c.classification == "fail"),
        "experiment_p99_ms_before": _stat(outcome, "experiment", "before", "p99_ms"),
        "experiment_p99_ms_fault": _stat(outcome, "experiment", "fault", "p99_ms"),
        "experiment_p99_ms_after": _stat(outcome, "experiment", "after", "p99_ms"),
        "experiment_error_rate_pct_fault": _stat(outcome, "experiment", "fault", "error_rate_pct"),
        "control_p99_ms_fault": _stat(outcome, "control", "fault", "p99_ms"),
        "control_error_rate_pct_fault": _stat(outcome, "control", "fault", "error_rate_pct"),
    }
    return rows_to_table([row], RUNS_SCHEMA)


def _fault_words(experiment: Experiment) -> str:
    words = []
    for fault in experiment.faults:
        detail = ", ".join(f"{key} = {value}" for key, value in fault.spec.items() if key not in ("kind", "duration_s"))
        words.append(f"{fault.kind} ({detail})")
    return " + ".join(words)


def _latency_fault(experiment: Experiment):
    return next((fault for fault in experiment.faults if "delay_ms" in fault.spec), None)


def findings_rows(outcome: Outcome, experiment: Experiment) -> list[dict]:
    """What weakness the run found and what to fix, one row per failed check (or one for a held run)."""
    steady = experiment.steady_state
    by_name = {check.name: check for check in outcome.checks}
    subject = experiment.title
    rows = []
    during = by_name.get("steady_state.during")
    if during is not None and during.classification == "fail":
        latency = _latency_fault(experiment)
        p99 = during.details.get("p99_ms") or 0.0
        if latency is not None and p99 >= 0.8 * float(latency.spec["delay_ms"]):
            target = latency.spec.get("target", "the dependency")
            rows.append(finding(PROBE, "critical", f"{steady.url} -> {target}",
                                f"requests to {steady.url} waited for the whole injected delay "
                                f"({latency.spec['delay_ms']:g} ms on {target}; p99 {p99:.0f} ms): the caller has "
                                f"no timeout on its calls to {target}, or one longer than the delay",
                                f"set a timeout below max_p99_ms ({steady.max_p99_ms:g} ms) on every call to "
                                f"{target} and fail fast (pause, answer 503) when it fires"))
        else:
            rows.append(finding(PROBE, "critical", steady.url,
                                f"the steady state did not hold during {_fault_words(experiment)}: {during.reason}",
                                "add a timeout, a fallback or a circuit breaker on the faulted dependency so the "
                                "service degrades within its tolerances"))
    for check in outcome.checks:
        if check.name.startswith("expect[") and check.classification == "fail":
            rows.append(finding(PROBE, "warning", subject, f"expected behaviour missing: {check.reason}",
                                "make the fallback engage (e.g. pause on a dependency timeout and report it on "
                                "/status) within the experiment's within_s"))
    control = by_name.get("control_unaffected")
    if control is not None and control.classification == "fail":
        rows.append(finding(PROBE, "critical", steady.control_url or "control",
                            f"the fault leaked into the control group: {control.reason}",
                            "narrow the fault's target (host:port, share_pct) so the blast radius stays on the "
                            "experiment group, or separate the groups' dependencies"))
    recovery = by_name.get("recovery")
    if recovery is not None and recovery.classification == "fail":
        rows.append(finding(PROBE, "warning", steady.url, f"no recovery after the fault: {recovery.reason}",
                            "resume automatically once the dependency is healthy again (health check, "
                            "half-open circuit breaker) instead of staying degraded"))
    if outcome.verdict == "invalid":
        rows.append(finding(PROBE, "warning", subject, f"the experiment proved nothing: {outcome.reason}",
                            "check the fault's target and backend (`chaos plan`, `chaos doctor`) and run it again"))
    if outcome.verdict == "not-steady":
        rows.append(finding(PROBE, "warning", steady.url, outcome.reason,
                            "fix the steady state first (or widen max_p99_ms / max_error_rate_pct to what "
                            "this service really delivers); nothing was injected"))
    if outcome.verdict == "aborted":
        rows.append(finding(PROBE, "critical" if outcome.aborted_by == "safeguard" else "info", subject,
                            f"aborted: {outcome.reason}",
                            "a tripped safeguard is a weakness of its own: find why the fault spread that far"
                            if outcome.aborted_by == "safeguard" else "run it again when the operator allows"))
    if outcome.verdict == "held":
        rows.append(finding(PROBE, "info", subject, f"hypothesis held: {experiment.hypothesis}",
                            "keep the experiment on its schedule to catch regressions"))
    return rows


def record_decisions(outcome: Outcome, experiment: Experiment, directory: Path) -> None:
    for check in outcome.checks:
        if check.gate is None:
            continue
        append_decision(directory / "decisions", decision_rows(
            check.gate, experiment.gate, context=f"chaos {experiment.title} {check.name}",
            baseline=f"{outcome.run_id}:{check.name}:baseline", candidate=f"{outcome.run_id}:{check.name}:candidate",
            baseline_run_id=outcome.run_id, candidate_run_id=outcome.run_id))


def summary(outcome: Outcome) -> dict:
    return {"run_id": outcome.run_id, "verdict": outcome.verdict, "reason": outcome.reason,
            "recovery_s": outcome.recovery_s, "aborted_by": outcome.aborted_by or None,
            "checks": [check.as_dict() for check in outcome.checks],
            "faults": [{"index": r.index, "kind": r.kind, "target": r.plan.get("target"),
                        "backend": r.plan.get("backend"), "apply_ms": r.apply_ms, "remove_ms": r.remove_ms,
                        "removed_by": r.removed_by, "proof": r.proof} for r in outcome.faults],
            "findings": outcome.findings,
            "bundle": str(outcome.bundle_dir) if outcome.bundle_dir else None,
            "published": outcome.published or None}


def write_bundle(run: ChaosRun, outcome: Outcome, out_dir: Path, started_at: datetime) -> Path:
    experiment = run.experiment
    writer = BundleWriter(out_dir, run_id=outcome.run_id, host=run.host)
    outcome.findings = findings_rows(outcome, experiment)
    tables = {"turns": turns_table(outcome), "chaos_faults": faults_table(outcome, experiment),
              "chaos_checks": checks_table(outcome.checks),
              "chaos_runs": runs_table(outcome, experiment, started_at, run.host.hostname()),
              "findings": findings_table(outcome.findings)}
    counts = {name: writer.write_table(name, table, PROBE) for name, table in tables.items()}
    state = journal.read_state(run.directory).runs.get(outcome.run_id)
    if state is not None:
        lines = "".join(json.dumps(record, default=str) + "\n" for record in state.records)
        writer.write_extra("journal.jsonl", lines)
    writer.add_probe(ProbeRecord(PROBE, "ok", "", counts, (datetime.now(timezone.utc) - started_at).total_seconds()))
    writer.finish(extra={"chaos": {"title": experiment.title, "verdict": outcome.verdict, "reason": outcome.reason,
                                   "recovery_s": outcome.recovery_s, "experiment": str(experiment.path)}})
    return writer.out_dir
