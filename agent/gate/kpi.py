"""KPIs from whatever a bundle holds, as raw samples where the bundle has them.

Every extractor takes a table (or None when the bundle lacks it) and returns plain data, so the
same code serves report bundles (gate) and the samples a rollout collects (driver).

Metric kinds:
- "shift":      raw samples; Mann-Whitney U + Hodges-Lehmann shift relative to the baseline median
- "tail":       raw samples; bootstrap interval of the relative p99 difference
- "proportion": (events, trials); two-proportion test, threshold in percentage points
- "ratio":      one summary number per side (pg_queries has no per-call samples): no test
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Histograms (syscalls) are expanded into samples; past this many the counts are scaled down so a
# busy host's 10^8 syscalls do not become 10^8 floats. The shape, which the tests use, is kept.
MAX_EXPANDED_SAMPLES = 50_000
# Syscalls judged per gate: the busiest ones present on both sides. More would mostly add
# multiple-comparison noise to the score.
MAX_SYSCALL_METRICS = 10


@dataclass
class MetricData:
    name: str
    kind: str
    unit: str
    baseline: object = None  # np.ndarray | (events, trials) | float | None
    candidate: object = None
    notes: list[str] = field(default_factory=list)


def _column(table: pa.Table | None, name: str) -> np.ndarray | None:
    if table is None or name not in table.column_names:
        return None
    return table.column(name).to_numpy(zero_copy_only=False)


def turn_errors(table: pa.Table | None) -> tuple[int, int] | None:
    """(errors, turns) when the turns carry an outcome: an `error` flag or an HTTP `status`."""
    if table is None or table.num_rows == 0:
        return None
    if "error" in table.column_names:
        flags = pc.fill_null(table.column("error").cast(pa.bool_()), False)
        return int(pc.sum(flags.cast(pa.int64())).as_py() or 0), table.num_rows
    if "status" in table.column_names:
        status = pc.fill_null(table.column("status").cast(pa.int64()), 0)
        bad = pc.or_(pc.greater_equal(status, 500), pc.equal(status, 0))
        return int(pc.sum(bad.cast(pa.int64())).as_py() or 0), table.num_rows
    return None


def turns_metrics(baseline: pa.Table | None, candidate: pa.Table | None) -> list[MetricData]:
    metrics = []
    base = _column(baseline, "latency_ns")
    cand = _column(candidate, "latency_ns")
    if base is not None or cand is not None:
        base_values = None if base is None else base.astype(np.float64)
        cand_values = None if cand is None else cand.astype(np.float64)
        metrics.append(MetricData("turns.latency_ns", "shift", "ns", base_values, cand_values))
        metrics.append(MetricData("turns.latency_ns.p99", "tail", "ns", base_values, cand_values))
    base_errors, cand_errors = turn_errors(baseline), turn_errors(candidate)
    if base_errors is not None or cand_errors is not None:
        metrics.append(MetricData("turns.error_rate", "proportion", "fraction", base_errors, cand_errors))
    return metrics


def histogram_samples(lower_bounds: np.ndarray, counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    total = counts.sum()
    if total > MAX_EXPANDED_SAMPLES:
        counts = np.rint(counts * (MAX_EXPANDED_SAMPLES / total))
    return np.repeat(np.asarray(lower_bounds, dtype=np.float64), counts.astype(np.int64))


def syscall_histograms(table: pa.Table | None) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """syscall -> (bucket_lo_ns, bucket_count) summed over processes."""
    if table is None or not {"syscall", "bucket_lo_ns", "bucket_count"} <= set(table.column_names):
        return {}
    grouped = table.group_by(["syscall", "bucket_lo_ns"]).aggregate([("bucket_count", "sum")])
    result: dict[str, tuple[list, list]] = {}
    for name, low, count in zip(grouped.column("syscall").to_pylist(),
                                grouped.column("bucket_lo_ns").to_pylist(),
                                grouped.column("bucket_count_sum").to_pylist(), strict=True):
        if name is None or low is None or not count:
            continue
        lows, counts = result.setdefault(name, ([], []))
        lows.append(low)
        counts.append(count)
    return {name: (np.asarray(lows), np.asarray(counts)) for name, (lows, counts) in result.items()}


def syscall_metrics(baseline: pa.Table | None, candidate: pa.Table | None) -> list[MetricData]:
    base, cand = syscall_histograms(baseline), syscall_histograms(candidate)
    common = set(base) & set(cand)
    busiest = sorted(common, key=lambda name: -(base[name][1].sum() + cand[name][1].sum()))
    return [MetricData(f"syscalls.{name}.latency_ns", "shift", "ns",
                       histogram_samples(*base[name]), histogram_samples(*cand[name]),
                       ["from log2 histogram buckets (lower bounds): shifts resolve to a bucket"])
            for name in busiest[:MAX_SYSCALL_METRICS]]


def pg_metrics(baseline: pa.Table | None, candidate: pa.Table | None) -> list[MetricData]:
    def by_fingerprint(table):
        if table is None or not {"fingerprint", "p99_ms"} <= set(table.column_names):
            return {}
        return {row["fingerprint"]: row for row in table.select(
            [c for c in ("fingerprint", "p50_ms", "p99_ms", "calls") if c in table.column_names]).to_pylist()}

    base, cand = by_fingerprint(baseline), by_fingerprint(candidate)
    metrics = []
    for fingerprint in sorted(set(base) & set(cand)):
        for column in ("p50_ms", "p99_ms"):
            b, c = base[fingerprint].get(column), cand[fingerprint].get(column)
            if b is None or c is None:
                continue
            metrics.append(MetricData(f"pg_queries.{fingerprint}.{column}", "ratio", "ms", float(b), float(c),
                                      ["per-fingerprint summary only (no per-call samples): not tested"]))
    return metrics


BUSY_COLUMNS = ("user_pct", "nice_pct", "system_pct", "irq_pct", "softirq_pct", "steal_pct")


def host_metrics(baseline: pa.Table | None, candidate: pa.Table | None) -> list[MetricData]:
    def totals(table):
        if table is None or "cpu" not in table.column_names:
            return table
        return table.filter(pc.equal(table.column("cpu"), -1))

    def busy(table):
        if table is None or table.num_rows == 0:
            return None
        if "idle_pct" in table.column_names:
            idle = _column(table, "idle_pct").astype(np.float64)
            iowait = _column(table, "iowait_pct")
            return 100.0 - idle - (0 if iowait is None else iowait.astype(np.float64))
        present = [c for c in BUSY_COLUMNS if c in table.column_names]
        if not present:
            return None
        return sum(_column(table, c).astype(np.float64) for c in present)

    base, cand = totals(baseline), totals(candidate)
    metrics = []
    base_busy, cand_busy = busy(base), busy(cand)
    if base_busy is not None or cand_busy is not None:
        metrics.append(MetricData("host.cpu_busy_pct", "shift", "pct", base_busy, cand_busy))
    memory_columns = set()
    for table in (base, cand):
        if table is not None:
            memory_columns |= {c for c in table.column_names
                               if "mem" in c and (c.endswith("_bytes") or c.endswith("_pct"))}
    for column in sorted(memory_columns):
        b, c = _column(base, column), _column(cand, column)
        metrics.append(MetricData(f"host.{column}", "shift", column.rsplit("_", 1)[-1],
                                  None if b is None else b.astype(np.float64),
                                  None if c is None else c.astype(np.float64)))
    return metrics


def rate_of_rows_with(table: pa.Table | None, column: str) -> tuple[int, int] | None:
    if table is None or column not in table.column_names or table.num_rows == 0:
        return None
    values = pc.fill_null(table.column(column).cast(pa.int64()), 0)
    return int(pc.sum(pc.greater(values, 0).cast(pa.int64())).as_py() or 0), table.num_rows


def connection_metrics(tables: dict[str, tuple[pa.Table | None, pa.Table | None]]) -> list[MetricData]:
    """Error/reset rates as proportions of connections (tcp) or flows (flows) affected."""
    metrics = []
    for table_name, (baseline, candidate) in tables.items():
        columns = set()
        for table in (baseline, candidate):
            if table is not None:
                columns |= {c for c in table.column_names if "retrans" in c or "reset" in c}
        for column in sorted(columns):
            b, c = rate_of_rows_with(baseline, column), rate_of_rows_with(candidate, column)
            if b is None and c is None:
                continue
            metrics.append(MetricData(f"{table_name}.{column}_rate", "proportion", "fraction", b, c,
                                      [f"share of {table_name} rows with {column} > 0"]))
    return metrics


def bundle_metrics(baseline, candidate) -> list[MetricData]:
    """All KPIs two bundles (reports.bundle.Bundle) support, present in at least one of them."""

    def pair(name):
        return (baseline.table(name) if baseline.has(name) else None,
                candidate.table(name) if candidate.has(name) else None)

    metrics = []
    metrics += turns_metrics(*pair("turns"))
    # Bundle.table gives format 2's syscall_buckets from format 1 bundles too.
    metrics += syscall_metrics(*pair("syscall_buckets"))
    metrics += pg_metrics(*pair("pg_queries"))
    metrics += host_metrics(*pair("host"))
    metrics += connection_metrics({"tcp": pair("tcp"), "flows": pair("flows")})
    return metrics
