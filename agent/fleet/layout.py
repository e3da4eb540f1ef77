"""Lay one report bundle out as the objects of the Hive-partitioned dataset.

Every table gets a `run_id` column (the partition keys say table/date/host, and several runs of
one host land in the same partition). The `runs` table has one row per probe per run, from the
manifest, so SQL can see which probes ran, failed or were unavailable without reading JSON.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa

from core.atomic import write_json_atomic
from reports.bundle import Bundle, write_parquet_atomic

PARTITION_KEYS = ("table", "date", "host")
RUNS_TABLE = "runs"
MANIFEST_PREFIX = "manifests"
EXTRAS_PREFIX = "extras"

RUNS_SCHEMA = pa.schema([
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("started_at", pa.timestamp("us", tz="UTC"), nullable=False),
    pa.field("duration_s", pa.float64()),
    pa.field("window_s", pa.float64()),
    pa.field("interrupted", pa.bool_()),
    pa.field("agent_version", pa.string()),
    pa.field("kernel", pa.string()),
    pa.field("tuning_profile", pa.string()),
    pa.field("probe", pa.string(), nullable=False),
    pa.field("status", pa.string(), nullable=False),
    pa.field("reason", pa.string()),
    pa.field("probe_seconds", pa.float64()),
    pa.field("tables_json", pa.string()),
])


@dataclass(frozen=True)
class StagedObject:
    key: str  # relative to ROOT, '/'-separated
    size_bytes: int
    md5_hex: str

    def as_dict(self) -> dict:
        return {"key": self.key, "size_bytes": self.size_bytes, "md5_hex": self.md5_hex}

    @classmethod
    def from_dict(cls, data: dict) -> "StagedObject":
        return cls(data["key"], int(data["size_bytes"]), data["md5_hex"])


def partition_value(text: str) -> str:
    """A Hive partition value that is safe in a path and an S3 key on every engine."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "-", text.strip()) or "unknown"
    return cleaned.lstrip(".") or "unknown"


def run_partition(manifest: dict) -> tuple[str, str]:
    started = datetime.fromisoformat(manifest["started_at"]).astimezone(timezone.utc)
    return started.strftime("%Y-%m-%d"), partition_value(manifest["host"]["hostname"])


def table_key(table: str, date: str, host: str, run_id: str) -> str:
    return f"table={table}/date={date}/host={host}/{run_id}.parquet"


def manifest_key(date: str, host: str, run_id: str) -> str:
    return f"{MANIFEST_PREFIX}/date={date}/host={host}/{run_id}.json"


def with_run_id(table: pa.Table, run_id: str) -> pa.Table:
    """Add run_id, and move aside any column that would shadow a partition key in readers."""
    names = list(table.column_names)
    renamed = [f"{name}_column" if name in PARTITION_KEYS else name for name in names]
    if renamed != names:
        table = table.rename_columns(renamed)
    if "run_id" not in table.column_names:
        table = table.append_column("run_id", pa.array([run_id] * table.num_rows, pa.string()))
    return table


def runs_rows(manifest: dict) -> pa.Table:
    """One row per probe of a run, from its manifest."""
    started = datetime.fromisoformat(manifest["started_at"]).astimezone(timezone.utc)
    host = manifest.get("host", {})
    rows = []
    for record in manifest.get("probes", []):
        rows.append({
            "run_id": manifest["run_id"],
            "started_at": started,
            "duration_s": manifest.get("duration_s"),
            "window_s": manifest.get("window_s"),
            "interrupted": manifest.get("interrupted"),
            "agent_version": manifest.get("agent"),
            "kernel": host.get("kernel"),
            "tuning_profile": host.get("tuning_profile"),
            "probe": record["name"],
            "status": record["status"],
            "reason": record.get("reason", ""),
            "probe_seconds": record.get("seconds"),
            "tables_json": json.dumps(record.get("tables", {}), sort_keys=True),
        })
    columns = {name: [row[name] for row in rows] for name in RUNS_SCHEMA.names}
    return pa.Table.from_pydict(columns, schema=RUNS_SCHEMA)


def file_md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def stage_bundle(bundle_dir: Path, staged_dir: Path) -> list[StagedObject]:
    """Write the dataset objects of a complete bundle under staged_dir, manifest last in order.

    Empty tables are left out: a zero-row file per run and table would multiply the file count
    of the dataset (the usual bottleneck of Parquet-on-object-store readers) for no data. The
    manifest and the `runs` table still record that the probe ran and wrote no rows.
    """
    bundle = Bundle(bundle_dir)
    manifest = bundle.manifest
    run_id = manifest["run_id"]
    date, host = run_partition(manifest)
    staged_dir = Path(staged_dir)
    keys: list[str] = []

    def target(key: str) -> Path:
        path = staged_dir / key
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    for name in bundle.table_names():
        table = bundle.table(name)
        if table.num_rows == 0:
            continue
        key = table_key(name, date, host, run_id)
        write_parquet_atomic(with_run_id(table, run_id), target(key))
        keys.append(key)
    runs = runs_rows(manifest)
    if runs.num_rows:
        key = table_key(RUNS_TABLE, date, host, run_id)
        write_parquet_atomic(runs, target(key), {"run_id": run_id, "table": RUNS_TABLE})
        keys.append(key)
    for extra in manifest.get("extras", []):
        source = bundle.path / extra
        if source.is_file():
            key = f"{EXTRAS_PREFIX}/date={date}/host={host}/{run_id}/{partition_value(extra)}"
            shutil.copyfile(source, target(key))
            keys.append(key)
    key = manifest_key(date, host, run_id)
    write_json_atomic(manifest, target(key))
    keys.append(key)  # last: a manifest in the store means every object of the run is there

    return [StagedObject(key, (staged_dir / key).stat().st_size, file_md5(staged_dir / key)) for key in keys]
