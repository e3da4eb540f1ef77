"""The `tune experiment` bundle, its findings, decision records and impact-ledger rows.

    DIR/tuning_samples.parquet   every sample: run_id, item, round, arm (A|B), window, sample, latency_ns
    DIR/tuning_verdicts.parquet  one row per item: verdict, effect % and interval of the deciding
                                 metric, p50/p99 of each arm, both metrics' classifications
    DIR/tuning_impact.parquet    the impact ledger's rows for this run (agent/tuning/ledger.py)
    DIR/findings.parquet         "vm.stat_interval=10: p99 timer jitter −38% [−45%, −30%]"
    DIR/manifest.json            last; its "tune_experiment" key repeats the verdicts
The gate's decision record (one Parquet file per item) goes to STATE_DIR/decisions.
"""

from __future__ import annotations

import math
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa

from agent.gate.record import append_decision, decision_rows
from agent.tuning.experiment import ItemOutcome, Outcome, samples_by_arm
from agent.tuning.verdicts import SHIFT_METRIC, TAIL_METRIC, metric_word, signed
from core.host import Host
from probes.base import finding, findings_table, rows_to_table
from reports.bundle import BundleWriter, ProbeRecord

PROBE = "tune-experiment"

SAMPLES_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("item", pa.string()), ("round", pa.int32()), ("arm", pa.string()),
    ("window", pa.int32()), ("sample", pa.int64()), ("latency_ns", pa.int64()),
])
VERDICTS_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("item", pa.string()), ("value_before", pa.string()), ("value_after", pa.string()),
    ("verdict", pa.string()), ("reason", pa.string()), ("metric", pa.string()),
    ("effect_pct", pa.float64()), ("effect_low_pct", pa.float64()), ("effect_high_pct", pa.float64()),
    ("p_value", pa.float64()),
    ("p50_effect_pct", pa.float64()), ("p50_effect_low_pct", pa.float64()), ("p50_effect_high_pct", pa.float64()),
    ("p50_classification", pa.string()), ("p50_classification_better", pa.string()),
    ("p99_effect_pct", pa.float64()), ("p99_effect_low_pct", pa.float64()), ("p99_effect_high_pct", pa.float64()),
    ("p99_classification", pa.string()), ("p99_classification_better", pa.string()),
    ("a_p50_ns", pa.float64()), ("b_p50_ns", pa.float64()), ("a_p99_ns", pa.float64()), ("b_p99_ns", pa.float64()),
    ("a_samples", pa.int64()), ("b_samples", pa.int64()), ("kept", pa.bool_()),
])


def _finite(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def samples_table(outcome: Outcome) -> pa.Table:
    columns = {name: [] for name in SAMPLES_SCHEMA.names}
    for window in outcome.windows:
        count = len(window.samples)
        columns["run_id"] += [outcome.run_id] * count
        columns["item"] += [window.item] * count
        columns["round"] += [window.round] * count
        columns["arm"] += [window.arm] * count
        columns["window"] += [window.order] * count
        columns["sample"] += range(count)
        columns["latency_ns"] += window.samples
    return pa.Table.from_pydict(columns, schema=SAMPLES_SCHEMA)


def _quantile(values: np.ndarray, q: float) -> float | None:
    return float(np.quantile(values, q)) if values.size else None


def verdict_row(outcome: Outcome, item: ItemOutcome) -> dict:
    row = {"run_id": outcome.run_id, "item": item.item.name, "value_before": item.item.value_before,
           "value_after": item.item.value_after, "verdict": item.verdict, "kept": item.kept,
           "reason": item.skipped_reason}
    judgement = item.judgement
    if judgement is None:
        return row
    a, b = samples_by_arm(outcome, item.item.name)
    row.update(reason=judgement.reason, a_samples=int(a.size), b_samples=int(b.size),
               a_p50_ns=_quantile(a, 0.5), b_p50_ns=_quantile(b, 0.5), a_p99_ns=_quantile(a, 0.99),
               b_p99_ns=_quantile(b, 0.99))
    deciding = judgement.deciding
    if deciding is not None:
        row.update(metric=metric_word(deciding.metric), effect_pct=_finite(deciding.effect_pct),
                   effect_low_pct=_finite(deciding.effect_low_pct), effect_high_pct=_finite(deciding.effect_high_pct),
                   p_value=_finite(deciding.p_value))
    for prefix, name in (("p50", SHIFT_METRIC), ("p99", TAIL_METRIC)):
        metric = judgement.metric(name)
        if metric is None:
            continue
        row.update({f"{prefix}_effect_pct": _finite(metric.effect_pct),
                    f"{prefix}_effect_low_pct": _finite(metric.effect_low_pct),
                    f"{prefix}_effect_high_pct": _finite(metric.effect_high_pct),
                    f"{prefix}_classification": metric.classification,
                    f"{prefix}_classification_better": judgement.better.get(name)})
    return row


def verdict_rows(outcome: Outcome) -> list[dict]:
    return [verdict_row(outcome, item) for item in outcome.items]


def _label(item: ItemOutcome) -> str:
    if len(item.item.plan_items) == 1:
        return f"{item.item.name}={item.item.value_after}"
    return item.item.name


def findings_rows(outcome: Outcome, rows: list[dict]) -> list[dict]:
    findings = []
    for item, row in zip(outcome.items, rows, strict=True):
        if item.verdict in ("improves", "worsens"):
            low, estimate, high = (math.nan if row.get(key) is None else row[key]
                                   for key in ("effect_low_pct", "effect_pct", "effect_high_pct"))
            effect = f"{row['metric']} {outcome.metric} {signed(estimate)}% [{signed(low)}%, {signed(high)}%]"
            if item.verdict == "improves":
                advice = ("kept (applied through the journal; `tune rollback` undoes it)" if item.kept else
                          "keep it: re-run with --keep, or `tune apply` the profile")
                findings.append(finding(PROBE, "info", item.item.name, f"{_label(item)}: {effect}", advice))
            else:
                findings.append(finding(PROBE, "warning", item.item.name, f"{_label(item)}: {effect}",
                                        "leave it out of this host's profile (it hurts this workload)"))
        elif item.verdict == "no measurable effect":
            findings.append(finding(PROBE, "info", item.item.name,
                                    f"{item.item.name}: no measurable effect on this workload ({outcome.workload})",
                                    "leave it out unless another workload needs it: it changes the host for nothing here"))
        elif item.verdict == "inconclusive":
            findings.append(finding(PROBE, "info", item.item.name, f"{item.item.name}: inconclusive ({item.judgement.reason})",
                                    "measure longer (--window-s, --rounds) or on a quieter host"))
    return findings


def ledger_rows(outcome: Outcome, rows: list[dict], host: Host) -> list[dict]:
    return [{"run_id": outcome.run_id, "host": host.hostname(), "kernel": host.kernel_release(),
             "profile": outcome.profile, "item": row["item"], "value_before": row["value_before"],
             "value_after": row["value_after"], "workload": outcome.workload,
             "metric": f"{outcome.metric} {row.get('metric') or 'p50'}",
             "effect_pct": row.get("effect_pct"), "effect_low_pct": row.get("effect_low_pct"),
             "effect_high_pct": row.get("effect_high_pct"), "p_value": row.get("p_value"),
             "verdict": row["verdict"]}
            for item, row in zip(outcome.items, rows, strict=True) if item.judgement is not None]


def record_decisions(outcome: Outcome, settings, state_dir: Path) -> None:
    for item in outcome.measured:
        append_decision(state_dir / "decisions", decision_rows(
            item.judgement.gate, settings, context=f"tune experiment {outcome.profile} {item.item.name}",
            baseline=f"{outcome.run_id}:{item.item.name}:A", candidate=f"{outcome.run_id}:{item.item.name}:B",
            baseline_run_id=outcome.run_id, candidate_run_id=outcome.run_id))


def write_bundle(outcome: Outcome, out_dir: Path, host: Host, state_dir: Path, started_at: datetime) -> dict:
    from agent.tuning.ledger import append_impact

    writer = BundleWriter(out_dir, run_id=outcome.run_id, host=host)
    rows = verdict_rows(outcome)
    findings = findings_rows(outcome, rows)
    tables = {"tuning_samples": samples_table(outcome), "tuning_verdicts": rows_to_table(rows, VERDICTS_SCHEMA),
              "findings": findings_table(findings)}
    counts = {name: writer.write_table(name, table, PROBE) for name, table in tables.items()}
    impact = ledger_rows(outcome, rows, host)
    if impact:
        append_impact(impact, state_dir=state_dir, out_dir=writer.out_dir)
    if impact and (writer.out_dir / "tuning_impact.parquet").exists():
        counts["tuning_impact"] = len(impact)
        writer.tables_written["tuning_impact"] = len(impact)
    summary = summary_dict(outcome, rows, findings, writer.out_dir)
    writer.add_probe(ProbeRecord(PROBE, "ok", "", counts, (datetime.now(timezone.utc) - started_at).total_seconds()))
    writer.finish(tuning_profile=outcome.profile, extra={"tune_experiment": {
        key: summary[key] for key in ("profile", "workload", "metric", "rounds", "window_s", "kept_journal")}
        | {"verdicts": {row["item"]: row["verdict"] for row in rows}}})
    return summary


def summary_dict(outcome: Outcome, rows: list[dict], findings: list[dict], bundle: Path) -> dict:
    return {"run_id": outcome.run_id, "profile": outcome.profile, "workload": outcome.workload,
            "metric": outcome.metric, "rounds": outcome.rounds, "window_s": outcome.window_s,
            "items": rows, "findings": [f["message"] for f in findings],
            "kept": [row["item"] for row in rows if row.get("kept")], "kept_journal": outcome.kept_journal or None,
            "bundle": str(bundle)}
