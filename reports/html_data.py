"""Read what a report needs from a bundle, a gate decision record or a single Parquet file.

The HTML report, the terminal histograms and the Prometheus textfile all read bundles of every
format the agent has written: format 1 repeats each pid x syscall's totals on every latency
bucket row of `syscalls`; format 2 splits them into `syscalls` (one row per pid x syscall) and
`syscall_buckets`. `syscall_pairs()` and `syscall_buckets()` give both shapes one answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from core.errors import BadInput

MANIFEST_NAME = "manifest.json"
READABLE_FORMATS = (1, 2)
PAIR_COLUMNS = ("count", "total_ns", "max_ns", "p50_ns", "p99_ns")
BUCKET_COLUMNS = ("pid", "syscall", "bucket_lo_ns", "bucket_hi_ns", "bucket_count")


@dataclass
class ReportSource:
    """A bundle directory (kind from its manifest), a gate decision record (a directory of
    decision Parquet files, no manifest) or one decision Parquet file."""

    path: Path
    kind: str
    manifest: dict[str, Any]
    files: dict[str, list[Path]] = field(default_factory=dict)
    _cache: dict[str, pa.Table] = field(default_factory=dict, repr=False)

    def table_names(self) -> list[str]:
        return sorted(self.files)

    def has(self, name: str) -> bool:
        return name in self.files

    def table(self, name: str) -> pa.Table | None:
        if name not in self.files:
            return None
        if name not in self._cache:
            parts = [pq.read_table(path) for path in self.files[name]]
            self._cache[name] = parts[0] if len(parts) == 1 else pa.concat_tables(parts, promote_options="default")
        return self._cache[name]

    def rows(self, name: str) -> int:
        table = self.table(name)
        return 0 if table is None else table.num_rows

    def extra(self, name: str) -> Path | None:
        candidate = self.path / name if self.path.is_dir() else None
        return candidate if candidate is not None and candidate.is_file() else None


def open_source(path: Path) -> ReportSource:
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no such bundle")
    if path.is_file():
        if path.suffix != ".parquet":
            raise BadInput(f"{path}: give a bundle directory, a gate decision record or a .parquet file")
        return ReportSource(path.parent, "gate", {"run_id": path.stem}, {"gate_decisions": [path]})
    manifest_path = path / MANIFEST_NAME
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
        except ValueError as error:
            raise BadInput(f"{manifest_path}: unreadable manifest ({error})") from None
        if manifest.get("format") not in READABLE_FORMATS:
            raise BadInput(f"{manifest_path}: unsupported bundle format {manifest.get('format')!r} "
                           f"(this agent reads {', '.join(map(str, READABLE_FORMATS))})")
        files = {p.stem: [p] for p in sorted(path.glob("*.parquet"))}
        return ReportSource(path, bundle_kind(manifest, files), manifest, files)
    decisions = sorted(path.glob("*.parquet"))
    if decisions and all(_is_decision_file(p) for p in decisions[:3]):
        return ReportSource(path, "gate", {"run_id": path.name}, {"gate_decisions": decisions})
    if decisions:
        raise BadInput(f"{path}: Parquet files but no {MANIFEST_NAME}: an incomplete bundle?")
    raise BadInput(f"{path}: not a bundle (no {MANIFEST_NAME}) nor a gate decision record")


def _is_decision_file(path: Path) -> bool:
    try:
        names = pq.read_schema(path).names
    except (OSError, pa.ArrowInvalid):
        return False
    return "decision_id" in names and "verdict" in names


def bundle_kind(manifest: dict, files: dict) -> str:
    """audit, pcap, pg-log, rollout, chaos (or any other probe name that wrote the bundle alone)."""
    if "rollout" in manifest:
        return "rollout"
    if any(name.startswith("chaos") for name in files) or "chaos" in manifest:
        return "chaos"
    source = manifest.get("source")
    if isinstance(source, dict) and source.get("kind"):
        return str(source["kind"])
    if isinstance(source, str) and source:
        return source
    return "audit"


# ---------------------------------------------------------------------------------------------
# syscalls, format 1 and 2


def syscall_pairs(source: ReportSource) -> pa.Table | None:
    """One row per pid x syscall: pid, comm, syscall, count, total_ns, max_ns (+ p50/p99 if any)."""
    table = source.table("syscalls")
    if table is None:
        return None
    if "bucket_lo_ns" not in table.column_names:
        return table
    present = [c for c in PAIR_COLUMNS if c in table.column_names]
    keys = [c for c in ("pid", "comm", "syscall") if c in table.column_names]
    # Format 1: the totals repeat on each bucket row of a pair, so any one of them is the pair's.
    grouped = table.group_by(keys, use_threads=False).aggregate([(c, "max") for c in present])
    return grouped.rename_columns(keys + present)


def syscall_buckets(source: ReportSource) -> pa.Table | None:
    """pid, syscall, bucket_lo_ns, bucket_hi_ns, bucket_count (format 2 table, or format 1's columns)."""
    table = source.table("syscall_buckets")
    if table is None:
        table = source.table("syscalls")
        if table is None or "bucket_lo_ns" not in table.column_names:
            return None
    return table.select(list(BUCKET_COLUMNS))


def log2_histogram(buckets: pa.Table, mask=None) -> list[tuple[int, int, int]]:
    """[(bucket_lo_ns, bucket_hi_ns, count)] summed over the selected rows, low to high."""
    if mask is not None:
        buckets = buckets.filter(mask)
    if buckets.num_rows == 0:
        return []
    grouped = buckets.group_by(["bucket_lo_ns", "bucket_hi_ns"], use_threads=False).aggregate(
        [("bucket_count", "sum")])
    rows = sorted(zip(grouped["bucket_lo_ns"].to_pylist(), grouped["bucket_hi_ns"].to_pylist(),
                      grouped["bucket_count_sum"].to_pylist()))
    return [(int(lo), int(hi), int(count)) for lo, hi, count in rows if count]


def top_syscalls(pairs: pa.Table, limit: int) -> list[dict]:
    """Syscalls (all pids together) by total time, most first."""
    if pairs is None or pairs.num_rows == 0:
        return []
    grouped = pairs.group_by(["syscall"], use_threads=False).aggregate(
        [("count", "sum"), ("total_ns", "sum"), ("max_ns", "max")])
    order = pc.sort_indices(grouped, [("total_ns_sum", "descending")])
    grouped = grouped.take(order).slice(0, limit)
    return [{"syscall": row["syscall"], "count": row["count_sum"], "total_ns": row["total_ns_sum"],
             "max_ns": row["max_ns_max"]} for row in grouped.to_pylist()]


def latency_log2_histogram(latencies_ns) -> list[tuple[int, int, int]]:
    """bcc-style power-of-two buckets [2^k, 2^(k+1)) for raw latencies (turns, KPI samples)."""
    import numpy as np

    values = np.asarray(latencies_ns, dtype=np.int64)
    values = values[values > 0]
    if values.size == 0:
        return []
    exponents = np.floor(np.log2(values)).astype(np.int64)
    counts = np.bincount(exponents - exponents.min())
    base = int(exponents.min())
    return [(1 << (base + i), 1 << (base + i + 1), int(c)) for i, c in enumerate(counts) if c]
