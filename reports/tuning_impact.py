"""The `tuning_impact` table: what each tuning item measurably did to latency on a host.

Written by agent/tuning/ledger.py (from `tune experiment`), read here as well by the kernel probe
(`audit --profile` shows the last measured effect of every item) and by anything that opens a
host's ledger: the schema and the reader sit in the reports layer so probes may use them.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.errors import WorkFailed

TABLE = "tuning_impact"
FILE_NAME = f"{TABLE}.parquet"
VERDICTS = ("improves", "no measurable effect", "worsens", "inconclusive")

IMPACT_SCHEMA = pa.schema([
    pa.field("ts", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("host", pa.string(), nullable=False),
    pa.field("kernel", pa.string()),
    pa.field("profile", pa.string()),
    pa.field("item", pa.string(), nullable=False),
    pa.field("value_before", pa.string()),
    pa.field("value_after", pa.string()),
    pa.field("workload", pa.string()),
    pa.field("metric", pa.string()),
    pa.field("effect_pct", pa.float64()),  # (B - A) / A of the metric: negative = lower latency
    pa.field("effect_low_pct", pa.float64()),
    pa.field("effect_high_pct", pa.float64()),
    pa.field("p_value", pa.float64()),
    pa.field("verdict", pa.string(), nullable=False),
])
# ledger column -> its copy in the `kernel` table (audit --profile; null before any experiment)
MEASURED_COLUMNS = {"effect_pct": "measured_effect_pct", "effect_low_pct": "measured_effect_low_pct",
                    "effect_high_pct": "measured_effect_high_pct", "p_value": "measured_p_value",
                    "verdict": "measured_verdict", "value_after": "measured_value",
                    "workload": "measured_workload", "metric": "measured_metric", "run_id": "measured_run_id",
                    "ts": "measured_at"}


def read_ledger(path: Path) -> pa.Table:
    """A ledger file as IMPACT_SCHEMA (columns a newer agent added are dropped); empty if absent."""
    if not path.exists():
        return IMPACT_SCHEMA.empty_table()
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise WorkFailed(f"{path}: unreadable tuning impact ledger ({reason}); move it aside") from None
    columns = {}
    for field in IMPACT_SCHEMA:
        if field.name in table.column_names:
            columns[field.name] = table.column(field.name).cast(field.type)
        else:
            columns[field.name] = pa.nulls(table.num_rows, field.type)
    return pa.Table.from_pydict(columns, schema=IMPACT_SCHEMA)


def last_effects(state_dir: Path, host: str) -> dict[str, dict]:
    """item -> the latest ledger row of that item measured on `host` (by ts; later rows win ties)."""
    rows = read_ledger(Path(state_dir) / FILE_NAME).to_pylist()
    latest: dict[str, dict] = {}
    for row in rows:
        if row["host"] != host:
            continue
        previous = latest.get(row["item"])
        if previous is None or row["ts"] >= previous["ts"]:
            latest[row["item"]] = row
    return latest


def effect_text(effect: dict) -> str:
    """A ledger row (or its kernel-table copy) in words: "improves: p99_ns -38.0% [-45.0%, -30.0%]"."""
    words = effect["verdict"]
    if effect.get("effect_pct") is not None:
        words += f": {effect.get('metric') or 'latency'} {effect['effect_pct']:+.1f}%"
        if effect.get("effect_low_pct") is not None and effect.get("effect_high_pct") is not None:
            words += f" [{effect['effect_low_pct']:+.1f}%, {effect['effect_high_pct']:+.1f}%]"
    return words


def measured_effect(kernel_row: dict) -> dict | None:
    """The ledger fields a `kernel` row carries (measured_* columns), or None when not measured."""
    if not kernel_row.get("measured_verdict"):
        return None
    return {name: kernel_row.get(column) for name, column in MEASURED_COLUMNS.items()}
