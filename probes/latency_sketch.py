"""Per-flow latency quantiles in bounded memory: exact for small flows, log-linear beyond.

Raw (flow, latency) samples go to a buffer of `buffer_samples`. When it fills, the flows holding
the most samples (more than SMALL_FLOW_SAMPLES) are folded into a sparse log-linear histogram
until the buffer is half empty; a folded flow stays in the histogram from then on. Flows with
few samples stay raw (a bucket costs what a sample does), so with very many small flows the
buffer holds up to SMALL_FLOW_SAMPLES per live flow. Quantiles of a flow never folded are
exact nearest-rank values (an observed latency); those of a folded flow come from its histogram:
128 sub-buckets per power of two (values below 256 ns are exact), reported at the bucket's middle
clamped to the flow's observed [min, max], so the error is at most 1/256 (0.39%) of the value.
Memory: the buffer (16 bytes a sample) plus 16 bytes per (folded flow, occupied bucket); a flow's
latencies typically span a few powers of two, so a few hundred buckets at most.
"""

from __future__ import annotations

import numpy as np

SUB_BUCKET_BITS = 7
SUB_BUCKETS = 1 << SUB_BUCKET_BITS
BIN_BITS = 13  # bins of values below 2^52 ns (52 days) stay below 2^13
LARGEST_NS = (1 << 52) - 1
RELATIVE_ERROR = 1.0 / (2 * SUB_BUCKETS)
DEFAULT_BUFFER_SAMPLES = 1 << 18
SMALL_FLOW_SAMPLES = 16


def latency_bins(values: np.ndarray) -> np.ndarray:
    """Log-linear bin of each value: width 1 below 2*SUB_BUCKETS, then 2^shift with SUB_BUCKETS
    bins per power of two. bin = shift * SUB_BUCKETS + (value >> shift)."""
    clipped = np.clip(values.astype(np.int64), 0, LARGEST_NS)
    # frexp is exact here: every value below 2^53 is a float64 without rounding.
    exponent = np.frexp(clipped.astype(np.float64))[1].astype(np.int64) - 1
    shift = np.maximum(exponent - SUB_BUCKET_BITS, 0)
    return shift * SUB_BUCKETS + (clipped >> shift)


def bin_middles(bins: np.ndarray) -> np.ndarray:
    shift = np.maximum(bins // SUB_BUCKETS - 1, 0)
    low = (bins - shift * SUB_BUCKETS) << shift
    return low + ((np.int64(1) << shift) >> 1)


def nearest_ranks(counts: np.ndarray, quantile: float) -> np.ndarray:
    """0-based nearest-rank index of `quantile` in groups of `counts` samples (counts > 0)."""
    return np.maximum(np.ceil(quantile * counts).astype(np.int64) - 1, 0)


class FlowLatencies:
    """Latency samples keyed by flow id (int64 >= 0); `pop_quantiles` finishes flows."""

    def __init__(self, buffer_samples: int = DEFAULT_BUFFER_SAMPLES) -> None:
        self.buffer_samples = max(int(buffer_samples), 2)
        self._flow_parts: list[np.ndarray] = []
        self._latency_parts: list[np.ndarray] = []
        self.buffered = 0
        # Sparse histogram, sorted by key = flow << BIN_BITS | bin.
        self.keys = np.zeros(0, dtype=np.int64)
        self.counts = np.zeros(0, dtype=np.int64)
        self.sketched_flows = np.zeros(0, dtype=np.int64)  # sorted flow ids folded into the histogram
        self.flows_ever_sketched = 0
        self.limit = self.buffer_samples

    def add(self, flows: np.ndarray, latencies_ns: np.ndarray) -> None:
        if not len(flows):
            return
        self._flow_parts.append(flows.astype(np.int64, copy=False))
        self._latency_parts.append(latencies_ns.astype(np.int64, copy=False))
        self.buffered += len(flows)
        if self.buffered > self.limit:
            self._fold_heaviest()
            # Samples of small flows stay (a histogram bucket costs what a sample does): when
            # they alone fill the buffer it grows with them, ≤ SMALL_FLOW_SAMPLES per live flow.
            self.limit = max(self.buffer_samples, 2 * self.buffered)

    def nbytes(self) -> int:
        return (16 * self.buffered + self.keys.nbytes + self.counts.nbytes + self.sketched_flows.nbytes)

    def _buffer(self) -> tuple[np.ndarray, np.ndarray]:
        if len(self._flow_parts) > 1:
            self._flow_parts = [np.concatenate(self._flow_parts)]
            self._latency_parts = [np.concatenate(self._latency_parts)]
        if not self._flow_parts:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return self._flow_parts[0], self._latency_parts[0]

    def _set_buffer(self, flows: np.ndarray, latencies: np.ndarray) -> None:
        self._flow_parts, self._latency_parts = ([flows], [latencies]) if len(flows) else ([], [])
        self.buffered = len(flows)

    def _fold_heaviest(self) -> None:
        flows, latencies = self._buffer()
        ids, counts = np.unique(flows, return_counts=True)
        # Heaviest first until what stays fits half the buffer, among flows with more than
        # SMALL_FLOW_SAMPLES (smaller ones stay exact); flows already folded always go.
        order = np.argsort(-counts, kind="stable")
        order = order[counts[order] > SMALL_FLOW_SAMPLES]
        kept_after = len(flows) - np.cumsum(counts[order])
        chosen = order[: int(np.searchsorted(-kept_after, -self.buffer_samples // 2)) + 1]
        fold_ids = np.union1d(ids[chosen], np.intersect1d(ids, self.sketched_flows, assume_unique=True))
        fold = np.isin(flows, fold_ids)
        self._merge(flows[fold], latencies[fold])
        new_ids = np.setdiff1d(fold_ids, self.sketched_flows, assume_unique=True)
        self.flows_ever_sketched += len(new_ids)
        self.sketched_flows = np.union1d(self.sketched_flows, fold_ids)
        self._set_buffer(flows[~fold], latencies[~fold])

    def _merge(self, flows: np.ndarray, latencies: np.ndarray) -> None:
        if not len(flows):
            return
        # Count the new samples per (flow, bin) first: the histogram itself is small next to
        # them (occupied buckets only), so the union and the scatter-adds are cheap.
        new_keys, new_counts = np.unique((flows << BIN_BITS) | latency_bins(latencies), return_counts=True)
        keys = np.union1d(self.keys, new_keys)
        counts = np.zeros(len(keys), dtype=np.int64)
        counts[np.searchsorted(keys, self.keys)] += self.counts
        counts[np.searchsorted(keys, new_keys)] += new_counts
        self.keys, self.counts = keys, counts

    def pop_quantiles(self, flows: np.ndarray, minimum_ns: np.ndarray, maximum_ns: np.ndarray,
                      quantiles: tuple[float, ...] = (0.5, 0.99)) -> list[np.ndarray]:
        """Nearest-rank quantiles per flow of `flows` (sorted unique ids) and forget those flows.
        minimum_ns/maximum_ns: each flow's observed extremes (clamp the histogram's values).
        Flows without samples get -1."""
        results = [np.full(len(flows), -1, dtype=np.int64) for _ in quantiles]
        if not len(flows):
            return results
        buffer_flows, buffer_latencies = self._buffer()
        mine = np.isin(buffer_flows, flows)
        raw_flows, raw_latencies = buffer_flows[mine], buffer_latencies[mine]
        if mine.any():
            self._set_buffer(buffer_flows[~mine], buffer_latencies[~mine])
            self.limit = max(self.buffer_samples, 2 * self.buffered)
        sketched = np.isin(flows, self.sketched_flows)
        if sketched.any():
            to_fold = np.isin(raw_flows, flows[sketched])
            self._merge(raw_flows[to_fold], raw_latencies[to_fold])
            raw_flows, raw_latencies = raw_flows[~to_fold], raw_latencies[~to_fold]
            self._sketched_quantiles(flows, sketched, minimum_ns, maximum_ns, quantiles, results)
        if len(raw_flows):
            self._exact_quantiles(flows, raw_flows, raw_latencies, quantiles, results)
        return results

    @staticmethod
    def _exact_quantiles(flows, raw_flows, raw_latencies, quantiles, results) -> None:
        rank = np.searchsorted(flows, raw_flows)
        if len(flows) < (1 << 23) and (raw_latencies < (1 << 40)).all() and (raw_latencies >= 0).all():
            # One sort of (flow rank, latency) packed in an int64: 3-4x faster than lexsort.
            packed = np.sort((rank << 40) | raw_latencies)
            rank, raw_latencies = packed >> 40, packed & ((1 << 40) - 1)
        else:
            order = np.lexsort((raw_latencies, rank))
            rank, raw_latencies = rank[order], raw_latencies[order]
        where, starts, counts = np.unique(rank, return_index=True, return_counts=True)
        for result, quantile in zip(results, quantiles):
            result[where] = raw_latencies[starts + nearest_ranks(counts, quantile)]

    def _sketched_quantiles(self, flows, sketched, minimum_ns, maximum_ns, quantiles, results) -> None:
        wanted = flows[sketched]
        key_flows = self.keys >> BIN_BITS
        mine = np.isin(key_flows, wanted)
        keys, counts = self.keys[mine], self.counts[mine]
        self.keys, self.counts = self.keys[~mine], self.counts[~mine]
        self.sketched_flows = np.setdiff1d(self.sketched_flows, wanted, assume_unique=True)
        key_flows = keys >> BIN_BITS
        ids, starts = np.unique(key_flows, return_index=True)
        totals = np.add.reduceat(counts, starts)
        before = np.cumsum(counts) - counts  # samples in earlier bins (all flows)
        where = np.searchsorted(flows, ids)
        for result, quantile in zip(results, quantiles):
            # The bin holding sample number `rank` of the flow (0-based) in cumulative order.
            target = before[starts] + nearest_ranks(totals, quantile)
            index = np.searchsorted(before, target, side="right") - 1
            values = bin_middles(keys[index] & ((1 << BIN_BITS) - 1))
            result[where] = np.clip(values, minimum_ns[where], maximum_ns[where])
