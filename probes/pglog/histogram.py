"""The fixed log-linear duration histogram behind pg-log's percentiles (HDR-histogram layout).

Durations are whole microseconds (the log prints '%.3f ms'). Below EXACT_BELOW_US every
microsecond is its own bucket; above, each power of two is split into SUB_BUCKETS equal buckets,
so a bucket is at most 1/512 of its lower edge wide and its middle is within 0.1 % of any
duration in it. A fingerprint therefore holds at most ~16,900 buckets up to 2^40 us (12 days)
whatever the number of executions, where the previous histogram (exact below 100 ms) could hold
100,000: that, times the fingerprints, was what grew with the log.

Percentiles are nearest-rank over executions: the smallest bucket whose cumulative count
reaches ceil(p * calls), reported as its middle clamped to the exact min and max (never floored,
never outside [min_ms, max_ms]).
"""

from __future__ import annotations

import numpy as np

EXACT_BELOW_US = 1024
SUB_BUCKETS = 512
_EXACT_BITS = 10            # log2(EXACT_BELOW_US)
BUCKET_SPACE = 1 << 15      # bucket indexes are < 32,768 for any int64 duration
PERCENTILES = (("p50_ms", 0.50), ("p90_ms", 0.90), ("p99_ms", 0.99), ("p999_ms", 0.999))


def bucket_index(durations_us: np.ndarray) -> np.ndarray:
    """Histogram bucket of each duration (int64 microseconds, >= 0)."""
    values = np.maximum(np.asarray(durations_us, dtype=np.int64), 0)
    index = values.copy()
    large = values >= EXACT_BELOW_US
    if large.any():
        wide = values[large]
        # frexp is exact for integers below 2^53 us (285 years): floor(log2(v)) = exponent - 1.
        octave = np.frexp(wide.astype(np.float64))[1].astype(np.int64) - 1
        shift = octave - (_EXACT_BITS - 1)
        index[large] = EXACT_BELOW_US + (octave - _EXACT_BITS) * SUB_BUCKETS + ((wide >> shift) - SUB_BUCKETS)
    return index


def bucket_low_us(index: np.ndarray) -> np.ndarray:
    """Lower edge of each bucket (the smallest duration it holds)."""
    index = np.asarray(index, dtype=np.int64)
    octave = _EXACT_BITS + (index - EXACT_BELOW_US) // SUB_BUCKETS
    mantissa = (index - EXACT_BELOW_US) % SUB_BUCKETS + SUB_BUCKETS
    shift = np.maximum(octave - (_EXACT_BITS - 1), 0)
    return np.where(index < EXACT_BELOW_US, index, mantissa << shift)


def bucket_middle_us(index: np.ndarray) -> np.ndarray:
    """The duration a bucket stands for: itself below EXACT_BELOW_US, else its middle."""
    index = np.asarray(index, dtype=np.int64)
    octave = _EXACT_BITS + (index - EXACT_BELOW_US) // SUB_BUCKETS
    width = np.where(index < EXACT_BELOW_US, 1, np.int64(1) << np.maximum(octave - (_EXACT_BITS - 1), 0))
    return bucket_low_us(index) + width // 2


def nearest_ranks(calls: np.ndarray, fraction: float) -> np.ndarray:
    """1-based rank of the p-th execution: ceil(p * calls), at least 1."""
    return np.maximum(1, np.ceil(fraction * calls - 1e-9)).astype(np.int64)


def grouped_percentiles_us(group_of_row: np.ndarray, values, counts: np.ndarray,
                           groups: np.ndarray, calls: np.ndarray) -> dict[str, np.ndarray]:
    """Nearest-rank percentiles per group from rows sorted by (group, value), each row a value
    seen `counts` times: for every name in PERCENTILES, the value per entry of `groups` (which
    must all appear, with `calls` = their total count). `values` is an array, or a function from
    row positions to values (so a histogram's bucket middles are computed only where needed)."""
    cumulative = np.cumsum(counts)
    group_start = np.searchsorted(group_of_row, groups, side="left")
    before = np.where(group_start > 0, cumulative[np.maximum(group_start - 1, 0)], 0)
    value_at = values if callable(values) else values.__getitem__
    result = {}
    for name, fraction in PERCENTILES:
        position = np.searchsorted(cumulative, before + nearest_ranks(calls, fraction), side="left")
        result[name] = value_at(np.minimum(position, len(cumulative) - 1))
    return result
