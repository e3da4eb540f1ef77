"""The tuning impact ledger: what each tuning item measurably did to latency on this host.

`tune experiment` judges every item (B = item applied) against the current settings (A) with the
gate and hands its rows to `append_impact`, which writes them twice:

    <bundle>/tuning_impact.parquet      the experiment's bundle; `publish` (agent/chaos/report.py,
                                        the path `chaos_runs` takes) spools and stages it, so the
                                        fleet dataset gets table `tuning_impact` on the next
                                        `collect`/daemon drain like any bundle table
    <state_dir>/tuning_impact.parquet   the host's own ledger, beside the tuning journal: it
                                        outlives the bundles (which are spooled, uploaded and
                                        deleted) so `audit --profile` can show the last measured
                                        effect of each item on this host

Both files are rewritten whole through core/atomic (a reader sees the old ledger or the new one,
never half of it); appends are serialised by a lock file of their own, not the journal's lock,
which an experiment holds for its whole run. The schema and the reader live in
reports/tuning_impact.py, where the kernel probe can use them too.
"""

from __future__ import annotations

import fcntl
import math
import os
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from agent import __version__
from core.errors import BadInput, WorkFailed
from reports.bundle import write_parquet_atomic
from reports.tuning_impact import (  # noqa: F401 - re-exported for tune experiment
    FILE_NAME, IMPACT_SCHEMA, TABLE, VERDICTS, last_effects, read_ledger)

LOCK_NAME = f"{TABLE}.lock"
REQUIRED = tuple(field.name for field in IMPACT_SCHEMA if not field.nullable and field.name != "ts")
STRINGS = tuple(field.name for field in IMPACT_SCHEMA if pa.types.is_string(field.type))
NUMBERS = tuple(field.name for field in IMPACT_SCHEMA if pa.types.is_floating(field.type))


def _checked_row(row: dict, ts: datetime) -> dict:
    unknown = sorted(set(row) - set(IMPACT_SCHEMA.names))
    if unknown:
        raise BadInput(f"tuning_impact row: unknown column(s) {', '.join(unknown)}")
    missing = [name for name in REQUIRED if not row.get(name)]
    if missing:
        raise BadInput(f"tuning_impact row: missing {', '.join(missing)}")
    if row["verdict"] not in VERDICTS:
        raise BadInput(f"tuning_impact row for {row['item']}: verdict {row['verdict']!r} is not one of "
                       + ", ".join(VERDICTS))
    checked = {name: row.get(name) for name in IMPACT_SCHEMA.names}
    checked["ts"] = row.get("ts") or ts
    for name in STRINGS:
        if checked[name] is not None and not isinstance(checked[name], str):
            checked[name] = str(checked[name])
    for name in NUMBERS:
        value = checked[name]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            raise BadInput(f"tuning_impact row for {row['item']}: {name} must be a number, not {value!r}")
        checked[name] = float(value)
    p_value = checked["p_value"]
    if p_value is not None and not 0.0 <= p_value <= 1.0:
        raise BadInput(f"tuning_impact row for {row['item']}: p_value {p_value:g} is outside [0, 1]")
    return checked


def impact_table(rows: list[dict], ts: datetime | None = None) -> pa.Table:
    """Validated rows as a table of IMPACT_SCHEMA; rows without `ts` get `ts` (default: now)."""
    ts = ts or datetime.now(timezone.utc)
    checked = [_checked_row(row, ts) for row in rows]
    return pa.Table.from_pydict({name: [row[name] for row in checked] for name in IMPACT_SCHEMA.names},
                                schema=IMPACT_SCHEMA)


def _append(path: Path, table: pa.Table, run_id: str) -> None:
    combined = pa.concat_tables([read_ledger(path), table])
    write_parquet_atomic(combined, path, {"run_id": run_id, "probe": "tune", "table": TABLE,
                                          "agent_version": __version__})


class _Locked:
    def __init__(self, directory: Path):
        self.path = directory / LOCK_NAME

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def append_impact(rows: list[dict], *, state_dir: Path, out_dir: Path | None = None) -> Path:
    """Validate `rows` (all of them, before anything is written), add `ts`, append them to
    out_dir/tuning_impact.parquet (the experiment's bundle; created or extended) and to the
    host's ledger state_dir/tuning_impact.parquet. Returns the ledger's path."""
    table = impact_table(rows)
    if table.num_rows == 0:
        raise BadInput("tuning_impact: no rows to append")
    run_id = table.column("run_id")[0].as_py()
    state_dir = Path(state_dir)
    ledger = state_dir / FILE_NAME
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        if out_dir is not None:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            _append(Path(out_dir) / FILE_NAME, table, run_id)
        with _Locked(state_dir):
            _append(ledger, table, run_id)
    except OSError as error:
        raise WorkFailed(f"tuning impact ledger: {error.strerror or error} writing {error.filename or ledger}") from None
    return ledger


def with_ledger_dir(options: dict) -> dict:
    """Probe options for a run: an audit against a profile reads the ledger of the tune state
    directory (--state-dir of `tune`, $GUARDIAN_AGENT_STATE_DIR or the default) unless told
    otherwise, so the `kernel` table shows what each item measurably did on this host."""
    from agent.tuning.journal import state_dir

    if options.get("profile") and not options.get("tuning_state_dir"):
        return {**options, "tuning_state_dir": state_dir()}
    return options
