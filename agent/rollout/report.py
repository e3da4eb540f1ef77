"""The rollout's report bundle (a post-mortem when it rolled back).

Tables: turns (every KPI sample, with version and stage: the gate can re-judge them),
rollout_stages (per stage and version: samples, p50, p99, error rate), rollout_verdicts (every
gate evaluation, one row per metric, in the decision-record schema), findings, and after a
promotion with [after_promotion] experiments chaos_after_promotion (one row per experiment: its
verdict, reason, recovery, failed checks and its own chaos bundle) with a finding for each
experiment that did not hold (critical when refuted).
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from agent.gate.record import decision_rows, decision_table
from probes.base import finding, findings_table, rows_to_table
from reports.bundle import Bundle, BundleWriter, ProbeRecord

STAGES_SCHEMA = pa.schema([
    ("stage", pa.int32()), ("weight_pct", pa.float64()), ("version", pa.string()), ("samples", pa.int64()),
    ("p50_ms", pa.float64()), ("p99_ms", pa.float64()), ("error_rate_pct", pa.float64()),
])

AFTER_PROMOTION_SCHEMA = pa.schema([
    ("experiment", pa.string()), ("verdict", pa.string()), ("reason", pa.string()), ("run_id", pa.string()),
    ("recovery_s", pa.float64()), ("checks_failed", pa.string()), ("bundle", pa.string()),
])


def after_promotion_table(results: list[dict]) -> pa.Table:
    rows = [{"experiment": r["experiment"], "verdict": r["verdict"], "reason": r.get("reason", ""),
             "run_id": r.get("run_id"), "recovery_s": r.get("recovery_s"),
             "checks_failed": ",".join(c["name"] for c in r.get("checks", []) if c.get("classification") == "fail"),
             "bundle": r.get("bundle")} for r in results]
    return rows_to_table(rows, AFTER_PROMOTION_SCHEMA)


def status_finding(plan, status: str, reason: str, chaos_results: list[dict]) -> dict:
    if status != "promoted":
        return finding("rollout", "critical", plan.name, f"{status}: {reason}",
                       "read rollout_verdicts for the failing metrics and rollout_stages for blue vs green per stage")
    failed = [r for r in chaos_results if r["verdict"] != "held"]
    if not failed:
        return finding("rollout", "info", plan.name, f"{status}: {reason}", "nothing to do")
    return finding("rollout", "warning", plan.name,
                   f"{status}: {reason}; the promotion stands (green serves 100%), but "
                   f"{len(failed)} of {len(chaos_results)} experiment(s) after it did not hold",
                   "read chaos_after_promotion and each experiment's bundle; `rollout undo` brings blue back "
                   "while it is kept")


def write_rollout_bundle(driver, status: str, reason: str) -> Path:
    from agent.rollout.collector import samples_table
    from agent.rollout.driver import stage_summary_rows

    plan = driver.plan
    label = "postmortem" if status != "promoted" else "report"
    out_dir = plan.state_dir / f"{plan.name}-{driver.run_id}-{label}"
    writer = BundleWriter(out_dir, run_id=driver.run_id)
    samples = driver.collector.snapshot() if driver.collector is not None else []
    tables = {"turns": samples_table(samples),
              "rollout_stages": pa.Table.from_pylist(stage_summary_rows(samples, plan), schema=STAGES_SCHEMA)}
    rows = []
    for evaluation in driver.evaluations:
        rows += decision_rows(evaluation.verdict, plan.gate,
                              context=f"stage {evaluation.stage + 1} at {evaluation.elapsed_s:.1f} s "
                                      f"(baseline: {evaluation.baseline_scope})",
                              baseline="blue", candidate="green", baseline_run_id=driver.run_id,
                              candidate_run_id=driver.run_id,
                              decided_at=datetime.fromtimestamp(evaluation.decided_at, timezone.utc))
    tables["rollout_verdicts"] = decision_table(rows)
    from agent.chaos.session import rollout_findings

    chaos_results = driver.chaos_results
    tables["findings"] = findings_table([status_finding(plan, status, reason, chaos_results)]
                                        + rollout_findings(chaos_results))
    if plan.after_promotion is not None and status == "promoted":
        tables["chaos_after_promotion"] = after_promotion_table(chaos_results)
    counts = {}
    for name, table in tables.items():
        counts[name] = writer.write_table(name, table, probe="rollout")
    writer.add_probe(ProbeRecord("rollout", "ok", reason="", tables=counts))
    stacks_note = differential_flamegraph(plan, writer)
    writer.finish(extra={"rollout": {
        "name": plan.name, "status": status, "reason": reason, "plan": str(plan.path),
        "stages": [stage.__dict__ for stage in plan.stages],
        "unattributed_requests": driver.collector.unattributed.total if driver.collector else 0,
        "stacks": stacks_note,
        # What `gate --rollout` needs to re-judge as the driver judged: the plan's own gate
        # settings and when each decision was taken (samples after it were not seen).
        "crossover_s": plan.crossover_s,
        "gate_config": {key: plan.raw[key] for key in ("gate", "metrics") if key in plan.raw},
        "decisions": [{"stage": r.get("stage"), "decision": r.get("decision"), "verdict": r.get("verdict"),
                       "decided_at_ns": r.get("decided_at_ns"), "baseline_scope": r.get("baseline_scope")}
                      for r in driver_decisions(driver)],
        "unattributed_by_stage": dict(driver.collector.unattributed.by_stage) if driver.collector else {},
        "after_promotion": [{"experiment": r["experiment"], "verdict": r["verdict"], "reason": r.get("reason", ""),
                             "bundle": r.get("bundle")} for r in chaos_results],
    }})
    return out_dir


def driver_decisions(driver) -> list[dict]:
    from agent.rollout.journal import last_run

    try:
        return [r for r in last_run(driver.plan.journal_path).records if r["event"] == "decision"]
    except Exception:  # noqa: BLE001 - the journal is best effort here; the rollback already happened
        return []


def folded_stacks(bundle_dir: Path) -> dict[str, float]:
    table = Bundle(bundle_dir).table("stacks")
    folded: dict[str, float] = {}
    for stack, samples in zip(table.column("stack").to_pylist(), table.column("samples").to_pylist(), strict=True):
        if stack and samples:
            folded[stack] = folded.get(stack, 0.0) + float(samples)
    return folded


def differential_flamegraph(plan, writer: BundleWriter) -> str:
    """stacks.diff.svg (blue -> green) when the plan names stacks bundles of both; else why not."""
    from reports.flamegraph import differential_svg

    if plan.blue_stacks is None:
        return "not collected (set [postmortem] blue_stacks and green_stacks to stacks bundles)"
    try:
        blue, green = folded_stacks(plan.blue_stacks), folded_stacks(plan.green_stacks)
    except Exception as error:  # noqa: BLE001 - a missing profile must not cost the post-mortem
        return f"not drawn: {error}"
    if not blue or not green:
        return "not drawn: a stacks bundle holds no samples"
    svg = differential_svg(blue, green, title=f"{plan.name}: blue -> green",
                           subtitle="red: share of samples grew on green, blue: shrank")
    writer.write_extra("stacks.diff.svg", svg)
    return "stacks.diff.svg"
