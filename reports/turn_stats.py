"""Per-flow turn-latency statistics for the report, streamed from `turns.parquet`.

The page shows, for the busiest flows, exact quantiles (numpy's "higher" method: always an
observed value), the max, a log2 histogram and a CDF. Reading the whole `turns` table for that
made `guardian-agent report` grow by ~160 MB per million turns, while `pcap` keeps its own
memory flat. Here the file is read in record batches of the two columns needed, in passes:

1. turns per flow (the busiest flows are chosen from these counts, ties to the lower flow id);
2. for those flows: valid latencies (not null, >= 0), min, max, log2 histogram;
3. exact order statistics by refinement: each wanted rank sits in a value range of its flow;
   a pass counts the flow's values in bins of that range, and the bin holding the rank becomes
   its new range, until the range is one value wide or holds few enough values to keep and sort.

Memory is one batch, the counts per flow, and the bins and kept values of the open ranges (both
capped below), never the turns. The numbers are the ones np.quantile(..., method="higher") gives
on the whole column (tests/test_report_turn_stats.py compares them).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

BATCH_ROWS = 1 << 18
# Bins over all open ranges in one pass (8 MB of int64 counts), split evenly between them.
BIN_BUDGET = 1 << 20
MAX_BINS_PER_RANGE = 4096
# A range holding at most this many values is kept and sorted in the next pass instead of binned;
# all kept values together stay under the second figure (16 MB).
KEEP_RANGE_VALUES = 1 << 16
KEEP_BUDGET_VALUES = 1 << 21
LOG2_EXPONENTS = 64


@dataclass
class FlowTurns:
    """One flow's (or all turns', flow None) latency summary."""

    flow: object
    turns: int
    max_ns: int
    log2: list[tuple[int, int, int]]
    quantiles_ns: list[int] = field(default_factory=list)


@dataclass
class _Range:
    """Values of one flow in [lo, hi) whose sorted positions start at `below` (values < lo)."""

    lo: int
    hi: int
    below: int
    count: int
    ranks: list[int]


def higher_ranks(count: int, quantiles: Sequence[float]) -> list[int]:
    """0-based positions np.quantile(method="higher") reads in a sorted array of `count` values."""
    positions = np.ceil((count - 1) * np.asarray(quantiles, dtype=np.float64)).astype(np.intp)
    return np.clip(positions, 0, count - 1).tolist()


def turn_row_count(paths: Sequence[Path]) -> int:
    return sum(pq.ParquetFile(path).metadata.num_rows for path in paths)


def flow_turn_stats(paths: Sequence[Path], top_flows: int, quantiles: Sequence[float]) -> list[FlowTurns]:
    """The `top_flows` flows with the most turns (or all turns together when there is no `flow`
    column), each with its exact "higher" quantiles for `quantiles`, max and log2 histogram."""
    paths = list(paths)
    has_flow = "flow" in pq.read_schema(paths[0]).names
    flows = _busiest_flows(paths, top_flows) if has_flow else [None]
    summaries = []
    per_flow_ranges = {}
    for flow, (count, low, high, log2) in zip(flows, _flow_extents(paths, flows)):
        if count == 0:
            continue
        summary = FlowTurns(flow, count, high, log2)
        summaries.append(summary)
        ranks = higher_ranks(count, quantiles)
        per_flow_ranges[flow] = (ranks, [_Range(low, high + 1, 0, count, sorted(set(ranks)))])
    values = _select_ranks(paths, {flow: ranges for flow, (_, ranges) in per_flow_ranges.items()})
    for summary in summaries:
        ranks = per_flow_ranges[summary.flow][0]
        summary.quantiles_ns = [values[summary.flow][rank] for rank in ranks]
    return summaries


def _batches(paths: Sequence[Path], columns: list[str]):
    for path in paths:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=BATCH_ROWS, columns=columns):
            yield batch


def _latencies(batch: pa.RecordBatch) -> tuple[np.ndarray, np.ndarray]:
    """(int64 latencies, mask of the valid ones: not null and >= 0), as the report always counted."""
    column = batch.column(batch.schema.get_field_index("latency_ns"))
    valid = column.is_valid().to_numpy(zero_copy_only=False) if column.null_count else None
    values = column.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    keep = values >= 0
    return values, keep if valid is None else keep & valid


def _busiest_flows(paths: Sequence[Path], top: int) -> list:
    ids, counts = None, None
    for batch in _batches(paths, ["flow"]):
        # Flow ids are integers in pcap bundles, strings (the version) in a rollout's KPI samples.
        column = batch.column(0)
        column = column.drop_null() if column.null_count else column  # a turn without a flow is no flow's
        batch_ids, batch_counts = np.unique(column.to_numpy(zero_copy_only=False), return_counts=True)
        if ids is None:
            ids, counts = batch_ids, batch_counts
            continue
        ids, inverse = np.unique(np.concatenate([ids, batch_ids]), return_inverse=True)
        counts = np.bincount(inverse, weights=np.concatenate([counts, batch_counts]),
                             minlength=ids.size).astype(np.int64)
    if ids is None:
        return []
    order = np.argsort(-counts, kind="stable")[:top]  # np.unique sorted the ids: ties go to the lower id
    return [ids[i].item() if hasattr(ids[i], "item") else ids[i] for i in order]


def _flow_masks(batch: pa.RecordBatch, flows: list):
    """(flow, mask of its rows) for each wanted flow; all rows for flow None."""
    if flows == [None]:
        yield None, None
        return
    flow = batch.column(batch.schema.get_field_index("flow")).to_numpy(zero_copy_only=False)
    for wanted in flows:
        yield wanted, flow == wanted


def _columns(flows: list) -> list[str]:
    return ["latency_ns"] if flows == [None] else ["flow", "latency_ns"]


def _flow_extents(paths: Sequence[Path], flows: list) -> list[tuple[int, int, int, list]]:
    """Per flow: valid count, min, max, log2 histogram [(2^k, 2^(k+1), count)] of values > 0."""
    counts = dict.fromkeys(flows, 0)
    lows = dict.fromkeys(flows, np.iinfo(np.int64).max)
    highs = dict.fromkeys(flows, -1)
    log2 = {flow: np.zeros(LOG2_EXPONENTS, dtype=np.int64) for flow in flows}
    for batch in _batches(paths, _columns(flows)):
        values, valid = _latencies(batch)
        for flow, mask in _flow_masks(batch, flows):
            selected = values[valid if mask is None else valid & mask]
            if selected.size == 0:
                continue
            counts[flow] += selected.size
            lows[flow] = min(lows[flow], int(selected.min()))
            highs[flow] = max(highs[flow], int(selected.max()))
            positive = selected[selected > 0]
            # The same float log2 as latency_log2_histogram, so the buckets are the page's.
            log2[flow] += np.bincount(np.floor(np.log2(positive)).astype(np.int64), minlength=LOG2_EXPONENTS)
    return [(counts[flow], lows[flow], highs[flow],
             [(1 << e, 1 << (e + 1), int(c)) for e, c in enumerate(log2[flow].tolist()) if c])
            for flow in flows]


def _select_ranks(paths: Sequence[Path], ranges: dict[object, list[_Range]]) -> dict[object, dict[int, int]]:
    """{flow: {rank: value}} for every rank of every range, one streaming pass per refinement."""
    found: dict[object, dict[int, int]] = {flow: {} for flow in ranges}
    flows = list(ranges)
    while any(ranges.values()):
        open_ranges = sum(len(r) for r in ranges.values())
        bins = max(2, min(MAX_BINS_PER_RANGE, BIN_BUDGET // open_ranges))
        keep_budget = [KEEP_BUDGET_VALUES]  # shared by every flow's plan in this pass
        plans = {flow: _plan(flow_ranges, bins, keep_budget) for flow, flow_ranges in ranges.items() if flow_ranges}
        for batch in _batches(paths, _columns(flows)):
            values, valid = _latencies(batch)
            for flow, mask in _flow_masks(batch, flows):
                if flow in plans:
                    plans[flow].add(values[valid if mask is None else valid & mask])
        ranges = {flow: plan.narrow(found[flow]) for flow, plan in plans.items()}
    return found


class _Plan:
    """One pass over one flow's open ranges (disjoint, sorted by lo): binned or kept whole."""

    def __init__(self, ranges: list[_Range], widths: list[int], keep: list[bool]):
        self.ranges = ranges
        self.los = np.array([r.lo for r in ranges], dtype=np.int64)
        self.his = np.array([r.hi for r in ranges], dtype=np.int64)
        self.widths = np.array(widths, dtype=np.int64)
        self.keep = np.array(keep, dtype=bool)
        self.bins = np.array([1 if k else -(-(r.hi - r.lo) // w) for r, w, k in zip(ranges, widths, keep)],
                             dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.bins)[:-1]]).astype(np.int64)
        self.counts = np.zeros(int(self.bins.sum()), dtype=np.int64)
        self.kept: list[list[np.ndarray]] = [[] for _ in ranges]

    def add(self, values: np.ndarray) -> None:
        index = np.searchsorted(self.los, values, side="right") - 1
        inside = index >= 0
        inside[inside] = values[inside] < self.his[index[inside]]
        values, index = values[inside], index[inside]
        kept = self.keep[index]
        if kept.any():
            kept_index, kept_values = index[kept], values[kept]
            order = np.argsort(kept_index, kind="stable")
            kept_index, kept_values = kept_index[order], kept_values[order]
            starts = np.flatnonzero(np.diff(kept_index, prepend=-1))
            for start, end in zip(starts.tolist(), starts[1:].tolist() + [kept_index.size]):
                self.kept[int(kept_index[start])].append(kept_values[start:end])
        values, index = values[~kept], index[~kept]
        slots = self.offsets[index] + (values - self.los[index]) // self.widths[index]
        self.counts += np.bincount(slots, minlength=self.counts.size)

    def narrow(self, found: dict[int, int]) -> list[_Range]:
        """Resolve what this pass pinned down; the ranges still open for the next one."""
        narrowed: dict[tuple[int, int], _Range] = {}
        for position, current in enumerate(self.ranges):
            if self.keep[position]:
                kept = np.sort(np.concatenate(self.kept[position])) if self.kept[position] else np.empty(0, np.int64)
                for rank in current.ranks:
                    found[rank] = int(kept[rank - current.below])
                continue
            start = int(self.offsets[position])
            counts = self.counts[start:start + int(self.bins[position])]
            cumulative = np.cumsum(counts)
            width = int(self.widths[position])
            for rank in current.ranks:
                slot = int(np.searchsorted(cumulative, rank - current.below, side="right"))
                lo = current.lo + slot * width
                hi = min(current.hi, lo + width)
                below = current.below + (int(cumulative[slot - 1]) if slot else 0)
                if hi - lo == 1:
                    found[rank] = lo
                    continue
                key = (lo, hi)
                if key not in narrowed:
                    narrowed[key] = _Range(lo, hi, below, int(counts[slot]), [])
                narrowed[key].ranks.append(rank)
        return sorted(narrowed.values(), key=lambda r: r.lo)


def _plan(ranges: list[_Range], bins: int, keep_budget: list[int]) -> _Plan:
    widths, keep = [], []
    for current in ranges:
        keep_it = current.count <= KEEP_RANGE_VALUES and current.count <= keep_budget[0]
        if keep_it:
            keep_budget[0] -= current.count
        keep.append(keep_it)
        widths.append(1 if keep_it else max(1, -(-(current.hi - current.lo) // bins)))
    return _Plan(ranges, widths, keep)
