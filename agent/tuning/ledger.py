"""The tuning impact ledger (minimal stand-in on the tune-exp branch).

tune-fleet's branch owns the real module (host ledger in STATE_DIR, validation, the reader that
`audit --profile` uses); this one only has its interface, so `tune experiment` runs here: it
writes the rows, with `ts` added, to out_dir/tuning_impact.parquet. At merge the other one wins.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from reports.bundle import write_parquet_atomic

TABLE = "tuning_impact"
FILE_NAME = f"{TABLE}.parquet"
IMPACT_SCHEMA = pa.schema([
    ("ts", pa.timestamp("us", tz="UTC")), ("run_id", pa.string()), ("host", pa.string()),
    ("kernel", pa.string()), ("profile", pa.string()), ("item", pa.string()), ("value_before", pa.string()),
    ("value_after", pa.string()), ("workload", pa.string()), ("metric", pa.string()),
    ("effect_pct", pa.float64()), ("effect_low_pct", pa.float64()), ("effect_high_pct", pa.float64()),
    ("p_value", pa.float64()), ("verdict", pa.string()),
])


def append_impact(rows: list[dict], *, state_dir: Path, out_dir: Path | None = None) -> Path | None:
    if out_dir is None or not rows:
        return None
    ts = datetime.now(timezone.utc)
    table = pa.Table.from_pylist([{**row, "ts": row.get("ts") or ts} for row in rows], schema=IMPACT_SCHEMA)
    path = Path(out_dir) / FILE_NAME
    write_parquet_atomic(table, path, {"run_id": str(rows[0]["run_id"]), "probe": "tune", "table": TABLE})
    return path
