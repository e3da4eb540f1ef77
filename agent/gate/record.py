"""The decision record: every verdict appended as Parquet, one row per metric.

Parquet files cannot be appended to in place, so the record is a directory of Parquet files (a
dataset): each verdict adds `<decided_at>-<id>.parquet` atomically, and readers (pyarrow.dataset,
duckdb `read_parquet('DIR/*.parquet')`) see one table. Rows carry the bundle paths, run ids and the
full settings used, so a past rollout can be re-judged with new settings.
"""

from __future__ import annotations

import json
import math
import secrets
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from core.errors import BadInput
from agent.gate.config import GateSettings
from agent.gate.verdict import GateVerdict

DECISION_SCHEMA = pa.schema([
    ("decision_id", pa.string()),
    ("decided_at", pa.timestamp("us", tz="UTC")),
    ("context", pa.string()),  # "gate" or "rollout <name> stage <n>"
    ("baseline", pa.string()),
    ("candidate", pa.string()),
    ("baseline_run_id", pa.string()),
    ("candidate_run_id", pa.string()),
    ("verdict", pa.string()),
    ("score", pa.float64()),
    ("gate_reason", pa.string()),
    ("metric", pa.string()),
    ("kind", pa.string()),
    ("test", pa.string()),
    ("critical", pa.bool_()),
    ("direction", pa.string()),
    ("threshold_pct", pa.float64()),
    ("estimate", pa.float64()),
    ("interval_low", pa.float64()),
    ("interval_high", pa.float64()),
    ("effect_pct", pa.float64()),
    ("effect_low_pct", pa.float64()),
    ("effect_high_pct", pa.float64()),
    ("p_value", pa.float64()),
    ("baseline_count", pa.int64()),
    ("candidate_count", pa.int64()),
    ("samples_needed", pa.int64()),
    ("classification", pa.string()),
    ("reason", pa.string()),
    ("settings_json", pa.string()),
])


def _finite(value: float) -> float | None:
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def decision_rows(verdict: GateVerdict, settings: GateSettings, *, context: str, baseline: str,
                  candidate: str, baseline_run_id: str = "", candidate_run_id: str = "",
                  decided_at: datetime | None = None, decision_id: str | None = None) -> list[dict]:
    decided_at = decided_at or datetime.now(timezone.utc)
    decision_id = decision_id or f"{decided_at:%Y%m%dT%H%M%S}-{secrets.token_hex(3)}"
    settings_json = json.dumps(settings.as_dict(), sort_keys=True)
    common = {"decision_id": decision_id, "decided_at": decided_at, "context": context,
              "baseline": baseline, "candidate": candidate, "baseline_run_id": baseline_run_id,
              "candidate_run_id": candidate_run_id, "verdict": verdict.verdict,
              "score": _finite(verdict.score), "gate_reason": verdict.reason, "settings_json": settings_json}
    rows = []
    if not verdict.metrics:
        rows.append({**common, "metric": "", "classification": "skipped", "reason": verdict.reason})
    for metric in verdict.metrics:
        row = dict(common)
        row.update({"metric": metric.metric, "kind": metric.kind, "test": metric.test, "critical": metric.critical,
                    "direction": metric.direction, "threshold_pct": metric.threshold_pct,
                    "classification": metric.classification, "reason": metric.reason,
                    "baseline_count": metric.baseline_count, "candidate_count": metric.candidate_count,
                    "samples_needed": metric.samples_needed})
        for key in ("estimate", "interval_low", "interval_high", "effect_pct", "effect_low_pct",
                    "effect_high_pct", "p_value"):
            row[key] = _finite(getattr(metric, key))
        rows.append(row)
    return rows


def decision_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=DECISION_SCHEMA)


def validate_record_dir(path: Path) -> Path:
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise BadInput(f"--record {path}: exists and is not a directory")
    if (path / "manifest.json").exists():
        raise BadInput(f"--record {path}: is a report bundle, not a decision record")
    return path


def append_decision(record_dir: Path, rows: list[dict]) -> Path:
    from reports.bundle import write_parquet_atomic

    record_dir = validate_record_dir(record_dir)
    record_dir.mkdir(parents=True, exist_ok=True)
    decision_id = rows[0]["decision_id"] if rows else secrets.token_hex(4)
    path = record_dir / f"{decision_id}.parquet"
    write_parquet_atomic(decision_table(rows), path, {"table": "gate_decisions"})
    return path
