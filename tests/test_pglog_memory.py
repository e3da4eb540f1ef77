"""pg-log's bounded state: percentiles from the fixed log-linear histogram against a
brute-force nearest rank (and numpy's on a heavy-tailed sample), exact while a fingerprint has
few calls; a histogram row's memory is fixed from its first sample on; the fingerprint cap
folds the rarest shapes into an 'other' row that keeps every total, with a finding; the
per-minute series widens instead of growing; state stays within its bounds however many
durations go in."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from probes.pglog.aggregate import RAW_LIMIT, DurationAggregator
from probes.pglog.histogram import (BUCKETS, EXACT_BELOW_US, RELATIVE_ERROR, ROWS_PER_CHUNK,
                                    HistogramRows)


def cache_for(count: int) -> SimpleNamespace:
    return SimpleNamespace(fingerprints=[f"{i:016x}" for i in range(count)],
                           queries=[f"SELECT {i}" for i in range(count)],
                           parsed=[True] * count, examples=[""] * count)


def nearest_rank_us(values: np.ndarray, fraction: float) -> int:
    ordered = np.sort(values)
    return int(ordered[max(1, math.ceil(fraction * len(ordered) - 1e-9)) - 1])


def feed(aggregator: DurationAggregator, fingerprint_ids, durations_us, minutes, blocks: int = 7) -> None:
    for part in np.array_split(np.arange(len(durations_us)), blocks):
        aggregator.add(fingerprint_ids[part], np.zeros(len(part), np.int8), minutes[part], durations_us[part])


def test_percentiles_against_brute_force_and_exact_while_small():
    rng = np.random.default_rng(11)
    count = 40
    # Fingerprint i has 3 + i**2 calls (3 ... 1,524): the first ones stay under RAW_LIMIT.
    ids = np.concatenate([np.full(3 + i * i, i) for i in range(count)])
    durations = np.clip(np.exp(rng.normal(np.log(3000), 2.0, len(ids))), 1, 5e8).astype(np.int64)
    minutes = np.full(len(ids), 29_000_000, np.int64)
    aggregator = DurationAggregator()
    feed(aggregator, ids, durations, minutes)
    queries, _ = aggregator.finish(cache_for(count))
    by_fingerprint = {row["fingerprint"]: row for row in queries.to_pylist()}
    for i in range(count):
        mine = durations[ids == i]
        row = by_fingerprint[f"{i:016x}"]
        assert row["calls"] == len(mine) and row["total_ms"] == pytest.approx(mine.sum() / 1000, abs=1e-9)
        assert row["min_ms"] == mine.min() / 1000 and row["max_ms"] == mine.max() / 1000
        for name, fraction in (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99), ("p999_ms", 0.999)):
            expected_us = nearest_rank_us(mine, fraction)
            got_us = row[name] * 1000
            assert row["min_ms"] <= row[name] <= row["max_ms"]
            if len(mine) <= RAW_LIMIT or expected_us < EXACT_BELOW_US:
                assert got_us == pytest.approx(expected_us, abs=1e-6), (i, name)
            else:
                assert abs(got_us - expected_us) <= expected_us * RELATIVE_ERROR + 1e-6, (i, name, got_us, expected_us)


def test_fingerprint_cap_folds_the_rarest_into_other_keeping_every_total():
    rng = np.random.default_rng(5)
    count, cap = 3000, 200
    ids = np.minimum(rng.zipf(1.3, 200_000) - 1, count - 1)
    durations = rng.integers(10, 2_000_000, len(ids))
    minutes = 29_000_000 + np.arange(len(ids)) // 5000
    capped = DurationAggregator(max_fingerprints=cap)
    capped.minute_cells.due = lambda: True   # compact (and so fold) after every block
    feed(capped, ids, durations, minutes, blocks=20)
    queries, series = capped.finish(cache_for(count))
    rows = queries.to_pylist()
    other = next(row for row in rows if row["fingerprint"] == "other")
    assert len(rows) <= cap + 1 and capped.folded_shapes >= len(np.unique(ids)) - cap
    assert sum(row["calls"] for row in rows) == len(ids)
    assert sum(row["total_ms"] for row in rows) == pytest.approx(durations.sum() / 1000)
    assert sum(series.column("calls").to_pylist()) == len(ids)
    assert other["calls"] == capped.calls[0] and other["parsed"] is None
    # The most frequent shapes are never folded: their figures are exact.
    top = rows[0] if rows[0]["fingerprint"] != "other" else rows[1]
    assert top["calls"] == int((ids == int(top["fingerprint"], 16)).sum())

    from probes.pglog import LogAnalysis, capacity_findings

    analysis = LogAnalysis(queries, series, None, folded_shapes=capped.folded_shapes,
                           folded_executions=other["calls"], max_fingerprints=cap)
    (finding,) = capacity_findings(analysis)
    assert f"{other['calls']:,} executions of {capped.folded_shapes:,} statement shapes" in finding["message"]


def test_minute_series_widens_instead_of_growing():
    count, days = 50, 3
    minutes = 29_000_000 + np.arange(days * 1440).repeat(count)
    ids = np.tile(np.arange(count), days * 1440)
    durations = np.full(len(ids), 100, np.int64)
    aggregator = DurationAggregator(max_minute_cells=20_000)
    feed(aggregator, ids, durations, minutes, blocks=30)
    queries, series = aggregator.finish(cache_for(count))
    width_s = aggregator.minute_width * 60
    assert aggregator.minute_cells.rows <= 20_000 and width_s > 60
    assert set(series.column("bucket_s").to_pylist()) == {width_s}
    assert sum(series.column("calls").to_pylist()) == len(ids)
    assert all(stamp.timestamp() % width_s == 0 for stamp in series.column("minute").to_pylist()[:100])
    # pg_queries keeps the exact first and last minute.
    assert {row["first_minute"].timestamp() for row in queries.to_pylist()} == {29_000_000 * 60}


def test_state_is_bounded_per_fingerprint_not_per_execution():
    rng = np.random.default_rng(2)
    aggregator = DurationAggregator()
    sizes = []
    for block in range(12):
        ids = rng.integers(0, 20, 100_000)
        durations = np.clip(np.exp(rng.normal(np.log(2000), 1.0, len(ids))), 10, 900_000).astype(np.int64)
        aggregator.add(ids, np.zeros(len(ids), np.int8), np.full(len(ids), 29_000_000 + block), durations)
        aggregator._compact()
        sizes.append(aggregator.histogram.nbytes)
    # 1.2M executions of 20 shapes: one chunk of rows from the first block on, never more.
    assert sizes == [sizes[0]] * len(sizes) and sizes[0] <= ROWS_PER_CHUNK * BUCKETS * 2 + 4096, sizes
    assert sum(len(part) for part in aggregator.raw_slots) == 0


def test_histogram_error_bound_against_numpy_on_a_heavy_tail():
    rng = np.random.default_rng(23)
    # Pareto (alpha 1.1: a tail with no useful variance) above 200 us, a log-normal body, and a few
    # exact sub-millisecond ones: every percentile lands in a different part of the layout.
    samples = np.r_[(200 * (1 + rng.pareto(1.1, 150_000))), np.exp(rng.normal(np.log(3000), 1.5, 150_000)),
                    rng.integers(1, 1000, 20_000)]
    samples = np.clip(samples, 1, 2 ** 39).astype(np.int64)
    rows = HistogramRows()
    for part in np.array_split(rng.permutation(samples), 9):
        rows.add(np.zeros(len(part), np.int64), part)
    found = rows.percentiles_us(np.array([0]))
    for name, fraction in (("p50_ms", 0.5), ("p90_ms", 0.9), ("p99_ms", 0.99), ("p999_ms", 0.999)):
        exact = int(np.percentile(samples, 100 * fraction, method="inverted_cdf"))   # nearest rank
        got = int(found[name][0])
        assert abs(got - exact) <= exact * RELATIVE_ERROR, (name, got, exact)
        if exact < EXACT_BELOW_US:
            assert got == exact
    # The bound is tight enough to mean something: a 1 % error would fail it somewhere.
    assert RELATIVE_ERROR < 0.01


def test_histogram_memory_is_fixed_per_row_whatever_the_samples():
    rng = np.random.default_rng(4)
    rows = HistogramRows()
    sizes = []
    for samples in (100, 10_000, 1_000_000, 3_000_000):
        durations = np.exp(rng.normal(np.log(5000), 3.0, samples)).astype(np.int64)   # 1 us .. hours
        rows.add(rng.integers(0, 50, samples), durations)
        sizes.append(rows.nbytes)
    # 4.1M samples in 50 rows: one uint16 chunk throughout (no bucket of a row passes 65,535).
    assert sizes == [sizes[0]] * 4 and sizes[0] <= ROWS_PER_CHUNK * BUCKETS * 2 + 1024, sizes
    assert sum(int(chunk.sum()) for chunk in rows.chunks) == 100 + 10_000 + 1_000_000 + 3_000_000
    # Folding empties the rows into the target's and frees them for the next slots.
    before = rows.chunks[0][:50].sum(axis=0, dtype=np.int64)
    rows.fold(np.arange(1, 50), into_slot=0)
    assert np.array_equal(rows.chunks[0][rows.row_of_slot[0]], before) and len(rows.free_rows) == 49
    rows.add(np.array([77]), np.array([5]))
    assert rows.rows_used == 50 and len(rows.chunks) == 1 and len(rows.free_rows) == 48   # a freed row reused
    # A bucket past 65,535 widens its chunk to uint32 instead of wrapping (and the fold kept all).
    rows.add(np.zeros(70_000, np.int64), np.full(70_000, 5))
    row = rows.chunks[0][rows.row_of_slot[0]]
    assert rows.chunks[0].dtype == np.uint32 and int(row[5]) == int(before[5]) + 70_000
    assert int(row.sum()) == int(before.sum()) + 70_000


def test_cli_cap_writes_the_finding_and_refuses_a_zero_cap(tmp_path, agent_cli):
    import pyarrow.parquet as pq

    log = tmp_path / "shapes.log"
    # Shape k (table t_<letter>) appears 10 - k times: four shapes past a cap of 3 fold.
    log.write_text("".join(
        f"2026-12-01 10:00:{k:02d}.000 UTC [{100 + k}] LOG:  duration: 1.250 ms  statement: SELECT * FROM t_{chr(97 + k)} WHERE a = {n}\n"
        for k in range(7) for n in range(10 - k)))
    out = tmp_path / "out"
    result = agent_cli("pg-log", str(log), "--out", str(out), "--max-fingerprints", "3", "--no-html")
    assert result.returncode == 0, result.stderr
    queries = pq.read_table(out / "pg_queries.parquet").to_pylist()
    assert sum(row["calls"] for row in queries) == sum(10 - k for k in range(7))
    assert "other" in [row["fingerprint"] for row in queries]
    (finding,) = pq.read_table(out / "findings.parquet").to_pylist()
    assert finding["probe"] == "pg-log" and "statement shapes were folded" in finding["message"]
    assert "folded into the 'other' row" in result.stderr
    refused = agent_cli("pg-log", str(log), "--out", str(tmp_path / "out2"), "--max-fingerprints", "0")
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert not (tmp_path / "out2").exists()
