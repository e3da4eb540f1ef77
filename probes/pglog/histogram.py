"""The fixed log-linear duration histogram behind pg-log's percentiles, one dense row per busy
fingerprint (memory flat in the log's size).

Durations are whole microseconds (the log prints '%.3f ms'). Below EXACT_BELOW_US every
microsecond is its own bucket (the log's own resolution: exact); above, each power of two is
split into SUB_BUCKETS equal buckets, so a bucket is at most 1/64 of its lower edge wide and its
middle is within RELATIVE_ERROR (1/128, 0.78 %) of any duration in it, up to 2^40 us (12.7 days;
longer ones share the last bucket, and percentiles are clamped to the exact max anyway).

Why a dense row and not a sparse (key, count) list or the `ddsketch` package: a row is BUCKETS
uint16 counts (5.9 kB; a chunk of rows widens to uint32, then uint64, before any count would
wrap) allocated once when a fingerprint gets busy, so memory is fixed per fingerprint from its
first histogram sample on and never grows or gets copied with the log
(the sparse list of the previous version filled up to 16 bytes x ~4,400 occupied buckets per
fingerprint, plus merge copies, which was the growth); adding a block is one sort and one
scatter-add in numpy, where ddsketch adds one Python call per value (~1 us each: 11M durations
would cost more than the whole analysis does now).

Percentiles are nearest-rank over executions: the smallest bucket whose cumulative count
reaches ceil(p * calls), reported as its middle clamped to the exact min and max (never floored,
never outside [min_ms, max_ms]).
"""

from __future__ import annotations

import numpy as np

EXACT_BELOW_US = 1024
SUB_BUCKETS = 64
_EXACT_BITS = 10            # log2(EXACT_BELOW_US)
_SUB_BITS = 6               # log2(SUB_BUCKETS)
_TOP_OCTAVE = 40            # durations >= 2^40 us go to the last bucket
BUCKETS = EXACT_BELOW_US + (_TOP_OCTAVE - _EXACT_BITS) * SUB_BUCKETS   # 2,944
RELATIVE_ERROR = 1.0 / (2 * SUB_BUCKETS)
ROWS_PER_CHUNK = 128        # rows are allocated 128 at a time (0.75 MB): no copy when more come
_CELLS_PER_CHUNK = ROWS_PER_CHUNK * BUCKETS
_WIDER = {np.dtype(np.uint16): np.uint32, np.dtype(np.uint32): np.uint64}
PERCENTILES = (("p50_ms", 0.50), ("p90_ms", 0.90), ("p99_ms", 0.99), ("p999_ms", 0.999))


def bucket_index(durations_us: np.ndarray) -> np.ndarray:
    """Histogram bucket of each duration (int64 microseconds; < 0 counts as 0), < BUCKETS."""
    values = np.clip(np.asarray(durations_us, dtype=np.int64), 0, (1 << _TOP_OCTAVE) - 1)
    index = values.copy()
    large = values >= EXACT_BELOW_US
    if large.any():
        wide = values[large]
        # frexp is exact for integers below 2^53: floor(log2(v)) = exponent - 1.
        octave = np.frexp(wide.astype(np.float64))[1].astype(np.int64) - 1
        mantissa = (wide >> (octave - _SUB_BITS)) - SUB_BUCKETS       # 0 .. SUB_BUCKETS-1
        index[large] = EXACT_BELOW_US + (octave - _EXACT_BITS) * SUB_BUCKETS + mantissa
    return index


def bucket_low_us(index: np.ndarray) -> np.ndarray:
    """Lower edge of each bucket (the smallest duration it holds)."""
    index = np.asarray(index, dtype=np.int64)
    above = np.maximum(index - EXACT_BELOW_US, 0)
    octave = _EXACT_BITS + above // SUB_BUCKETS
    low = (above % SUB_BUCKETS + SUB_BUCKETS) << (octave - _SUB_BITS)
    return np.where(index < EXACT_BELOW_US, index, low)


def bucket_middle_us(index: np.ndarray) -> np.ndarray:
    """The duration a bucket stands for: itself below EXACT_BELOW_US, else its middle."""
    index = np.asarray(index, dtype=np.int64)
    octave = _EXACT_BITS + np.maximum(index - EXACT_BELOW_US, 0) // SUB_BUCKETS
    half_width = np.where(index < EXACT_BELOW_US, 0, np.int64(1) << (octave - _SUB_BITS - 1))
    return bucket_low_us(index) + half_width


def nearest_ranks(calls: np.ndarray, fraction: float) -> np.ndarray:
    """1-based rank of the p-th execution: ceil(p * calls), at least 1."""
    return np.maximum(1, np.ceil(fraction * calls - 1e-9)).astype(np.int64)


def grouped_percentiles_us(group_of_row: np.ndarray, values, counts: np.ndarray,
                           groups: np.ndarray, calls: np.ndarray) -> dict[str, np.ndarray]:
    """Nearest-rank percentiles per group from rows sorted by (group, value), each row a value
    seen `counts` times: for every name in PERCENTILES, the value per entry of `groups` (which
    must all appear, with `calls` = their total count)."""
    cumulative = np.cumsum(counts)
    group_start = np.searchsorted(group_of_row, groups, side="left")
    before = np.where(group_start > 0, cumulative[np.maximum(group_start - 1, 0)], 0)
    result = {}
    for name, fraction in PERCENTILES:
        position = np.searchsorted(cumulative, before + nearest_ranks(calls, fraction), side="left")
        result[name] = values[np.minimum(position, len(cumulative) - 1)]
    return result


class HistogramRows:
    """One BUCKETS-wide row of counts per slot that asked for one (`add`), in chunks of
    ROWS_PER_CHUNK rows, uint16 until a count of the chunk would pass 65,535; rows of folded
    slots are emptied and reused."""

    def __init__(self) -> None:
        self.chunks: list[np.ndarray] = []
        self.row_of_slot = np.full(0, -1, np.int64)
        self.free_rows: list[int] = []
        self.rows_used = 0

    @property
    def nbytes(self) -> int:
        return sum(chunk.nbytes for chunk in self.chunks) + self.row_of_slot.nbytes

    def _rows(self, slots: np.ndarray) -> np.ndarray:
        """Row of each slot, allocating rows for slots that have none yet."""
        if len(self.row_of_slot) <= slots.max():
            grown = np.full(max(int(slots.max()) + 1, 2 * len(self.row_of_slot)), -1, np.int64)
            grown[:len(self.row_of_slot)] = self.row_of_slot
            self.row_of_slot = grown
        missing = np.unique(slots[self.row_of_slot[slots] < 0])
        for slot in missing.tolist():
            if self.free_rows:
                row = self.free_rows.pop()
            else:
                row = self.rows_used
                self.rows_used += 1
                if row // ROWS_PER_CHUNK >= len(self.chunks):
                    self.chunks.append(np.zeros((ROWS_PER_CHUNK, BUCKETS), np.uint16))
            self.row_of_slot[slot] = row
        return self.row_of_slot[slots]

    def add(self, slots: np.ndarray, durations_us: np.ndarray) -> None:
        """Count each duration in its slot's row."""
        if len(slots) == 0:
            return
        cells, counts = np.unique(self._rows(slots) * BUCKETS + bucket_index(durations_us), return_counts=True)
        chunk_of_cell = cells // _CELLS_PER_CHUNK
        starts = np.flatnonzero(np.r_[True, chunk_of_cell[1:] != chunk_of_cell[:-1]])
        for start, end in zip(starts.tolist(), np.r_[starts[1:], len(cells)].tolist()):
            chunk_index = int(chunk_of_cell[start])
            local, more = cells[start:end] % _CELLS_PER_CHUNK, counts[start:end]
            flat = self._fitting(chunk_index, int(self.chunks[chunk_index].reshape(-1)[local].max()) + int(more.max()))
            # Cells are unique, so a fancy-index add counts each once.
            flat[local] += more.astype(flat.dtype)

    def _fitting(self, chunk_index: int, largest: int) -> np.ndarray:
        """The chunk (flat), widened first if a count could reach `largest`."""
        while largest > np.iinfo(self.chunks[chunk_index].dtype).max:
            self.chunks[chunk_index] = self.chunks[chunk_index].astype(_WIDER[self.chunks[chunk_index].dtype])
        return self.chunks[chunk_index].reshape(-1)

    def fold(self, slots: np.ndarray, into_slot: int) -> None:
        """Add the rows of `slots` (those that have one) into `into_slot`'s row and free them."""
        slots = slots[slots < len(self.row_of_slot)]
        slots = slots[self.row_of_slot[slots] >= 0]
        if len(slots) == 0:
            return
        (target,) = self._rows(np.array([into_slot], np.int64))
        total = self.chunks[target // ROWS_PER_CHUNK][target % ROWS_PER_CHUNK].astype(np.int64)
        for row in self.row_of_slot[slots].tolist():
            source = self.chunks[row // ROWS_PER_CHUNK][row % ROWS_PER_CHUNK]
            total += source
            source[:] = 0
            self.free_rows.append(row)
        self.row_of_slot[slots] = -1
        flat = self._fitting(target // ROWS_PER_CHUNK, int(total.max()))
        start = (target % ROWS_PER_CHUNK) * BUCKETS
        flat[start:start + BUCKETS] = total

    def percentiles_us(self, slots: np.ndarray) -> dict[str, np.ndarray]:
        """Nearest-rank percentiles of each slot's row (every slot must have one), bucket middles."""
        rows = self.row_of_slot[slots]
        result = {name: np.zeros(len(slots), np.int64) for name, _ in PERCENTILES}
        chunk_of_row = rows // ROWS_PER_CHUNK
        for chunk_index in np.unique(chunk_of_row).tolist():
            mine = np.flatnonzero(chunk_of_row == chunk_index)
            # One chunk's cumulative counts at a time (1.5 MB of int64 per 64 rows).
            cumulative = np.cumsum(self.chunks[chunk_index][rows[mine] % ROWS_PER_CHUNK], axis=1, dtype=np.int64)
            calls = cumulative[:, -1]
            for name, fraction in PERCENTILES:
                rank = nearest_ranks(calls, fraction)
                result[name][mine] = bucket_middle_us((cumulative < rank[:, None]).sum(axis=1))
        return result

    def release(self) -> None:
        self.chunks, self.free_rows, self.rows_used = [], [], 0
        self.row_of_slot = np.full(0, -1, np.int64)
