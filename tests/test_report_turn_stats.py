"""The report's streamed turn statistics equal numpy on the whole column (reports/turn_stats.py).

Small batches and small keep limits force several refinement passes over the file, so the
binned path is exercised on a table that fits a test; the distributions are the awkward ones:
heavy tail, ties, zeros, nulls and negatives (not counted), one value only.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reports import turn_stats
from reports.html_data import latency_log2_histogram

QUANTILES = [0.5, 0.99, 0.999] + np.linspace(0, 1, 401)[1:].tolist()


def _write_turns(path, flow, latency, row_group_size=5_000):
    pq.write_table(pa.table({"flow": pa.array(flow, pa.int64()), "latency_ns": pa.array(latency, pa.int64())}),
                   path, row_group_size=row_group_size)
    return path


def _expected(flow_ids, latency, flow):
    values = np.array([v for f, v in zip(flow_ids, latency) if f == flow and v is not None and v >= 0], np.int64)
    return values


@pytest.fixture
def tiny_limits(monkeypatch):
    monkeypatch.setattr(turn_stats, "BATCH_ROWS", 3_000)
    monkeypatch.setattr(turn_stats, "KEEP_RANGE_VALUES", 50)
    monkeypatch.setattr(turn_stats, "KEEP_BUDGET_VALUES", 200)
    monkeypatch.setattr(turn_stats, "BIN_BUDGET", 4_000)
    monkeypatch.setattr(turn_stats, "MAX_BINS_PER_RANGE", 16)


def test_streamed_quantiles_equal_numpy_higher(tmp_path, tiny_limits):
    rng = np.random.default_rng(7)
    rows = 60_000
    flow_ids = rng.choice(np.arange(10), size=rows, p=np.linspace(2, 0.2, 10) / np.linspace(2, 0.2, 10).sum())
    latency = (rng.lognormal(10, 1.5, rows)).astype(np.int64)
    latency[flow_ids == 1] = 4_242  # one flow all ties
    latency[rng.random(rows) < 0.01] = 0
    latency[rng.random(rows) < 0.001] = 10**12  # a far outlier stretches the first range
    values = latency.tolist()
    for index in rng.choice(rows, 300, replace=False).tolist():
        values[index] = None if index % 2 else -5
    path = _write_turns(tmp_path / "turns.parquet", flow_ids, values)

    summaries = turn_stats.flow_turn_stats([path], 6, QUANTILES)

    unique, counts = np.unique(flow_ids, return_counts=True)
    expected_flows = [unique[i].item() for i in np.argsort(-counts, kind="stable")[:6]]
    assert [s.flow for s in summaries] == expected_flows
    for summary in summaries:
        expected = _expected(flow_ids, values, summary.flow)
        assert summary.turns == expected.size
        assert summary.max_ns == expected.max()
        assert summary.quantiles_ns == np.quantile(expected, QUANTILES, method="higher").tolist()
        assert summary.log2 == latency_log2_histogram(expected)


def test_no_flow_column_one_value_and_ranks(tmp_path, tiny_limits):
    path = tmp_path / "turns.parquet"
    pq.write_table(pa.table({"latency_ns": pa.array([7] * 999 + [9], pa.int64())}), path)
    (summary,) = turn_stats.flow_turn_stats([path], 6, QUANTILES)
    assert summary.flow is None and summary.turns == 1000 and summary.max_ns == 9
    assert summary.quantiles_ns == np.quantile(np.array([7] * 999 + [9]), QUANTILES, method="higher").tolist()
    for count in (1, 2, 3, 10, 999, 1000, 123_457):
        assert turn_stats.higher_ranks(count, QUANTILES) == [
            int(v) for v in np.quantile(np.arange(count), QUANTILES, method="higher")]


def test_refinement_takes_several_bounded_passes(tmp_path, tiny_limits, monkeypatch):
    """The tiny limits cannot keep a flow whole: values are found by binning, pass after pass."""
    rng = np.random.default_rng(3)
    latency = rng.integers(0, 10**9, 20_000)
    path = _write_turns(tmp_path / "turns.parquet", np.zeros(20_000, np.int64), latency)
    passes = []
    original = turn_stats._batches
    monkeypatch.setattr(turn_stats, "_batches", lambda paths, columns: passes.append(columns) or original(paths, columns))
    (summary,) = turn_stats.flow_turn_stats([path], 6, QUANTILES)
    assert summary.quantiles_ns == np.quantile(latency, QUANTILES, method="higher").tolist()
    assert 4 <= len(passes) <= 12


def test_string_flow_ids_of_rollout_samples(tmp_path, tiny_limits):
    """A rollout's KPI samples name their flow by version (a string), with a null or two."""
    rng = np.random.default_rng(5)
    versions = rng.choice(["blue", "green"], 5_000).tolist()
    versions[10] = None
    latency = rng.integers(1, 10**6, 5_000)
    path = tmp_path / "turns.parquet"
    pq.write_table(pa.table({"flow": pa.array(versions, pa.string()), "latency_ns": latency}), path)
    summaries = turn_stats.flow_turn_stats([path], 6, QUANTILES)
    assert sorted(s.flow for s in summaries) == ["blue", "green"]
    for summary in summaries:
        expected = latency[np.array([v == summary.flow for v in versions])]
        assert summary.quantiles_ns == np.quantile(expected, QUANTILES, method="higher").tolist()


RENDER_AND_PEAK = """
import sys
from pathlib import Path
from reports.html import write_report
write_report(Path(sys.argv[1]), Path(sys.argv[2]))
print([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM")][0])
"""


def _turns_bundle(path, rows: int):
    from reports.bundle import BundleWriter

    rng = np.random.default_rng(11)
    writer = BundleWriter(path)
    writer.write_table("turns", pa.table({"flow": rng.integers(0, 100, rows),
                                          "latency_ns": rng.lognormal(11, 0.8, rows).astype(np.int64)}), "pcap")
    writer.finish()
    return path


def test_report_peak_memory_does_not_grow_with_turns(tmp_path):
    """Whole `report` processes on 1M and 3M turns: peak RSS (VmHWM, the child's own: exec starts
    a fresh one) grows by less than 30 MiB; loading the table whole grew it by 95 MiB here."""
    import os
    import subprocess
    import sys

    from tests.conftest import PROJECT_ROOT

    peaks_kib = []
    for rows in (1_000_000, 3_000_000):
        bundle = _turns_bundle(tmp_path / f"turns-{rows}", rows)
        result = subprocess.run([sys.executable, "-c", RENDER_AND_PEAK, str(bundle), str(tmp_path / f"{rows}.html")],
                                capture_output=True, text=True, timeout=120, cwd=PROJECT_ROOT,
                                env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT)))
        assert result.returncode == 0, result.stderr
        peaks_kib.append(int(result.stdout.split()[-1]))
        assert f"turns has {rows:,} rows" in (tmp_path / f"{rows}.html").read_text()
    assert peaks_kib[1] - peaks_kib[0] < 30 * 1024, peaks_kib
