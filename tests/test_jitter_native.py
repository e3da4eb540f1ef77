"""jitter native meter: oslat's JSON report into jitter rows, and a live oslat run on one CPU."""

from __future__ import annotations

import shutil

import pytest

from probes.jitter import oslat_rows, run_oslat


def test_oslat_report_to_rows():
    report = {"thread": {"0": {"cpu": 1, "avg": 1.01, "max": 900, "duration": 2.0,
                               "histogram": {"1": 1_000_000, "2": 50, "10": 98, "50": 1, "900": 1}}}}
    rows, buckets = oslat_rows(report, 5_000)
    row = rows[0]
    assert row["gap_count"] == 100 and row["gap_p50_ns"] == 10_000 and row["gap_max_ns"] == 900_000
    assert row["gap_p99_ns"] == 50_000 and row["gap_p999_ns"] == 900_000
    assert row["iterations"] == 1_000_150 and len(buckets) == 5


@pytest.mark.live
def test_oslat_live_one_cpu(tmp_path):
    assert shutil.which("oslat"), "rt-tests oslat is installed on this host"
    rows, buckets = run_oslat([1], 1, 1_000, str(tmp_path))
    assert rows[0]["cpu"] == 1 and rows[0]["iterations"] > 100_000
    # 1 us buckets: the meter resolves gaps well under the Python loop's 5 us threshold
    assert min(b["bucket_us"] for b in buckets) <= 1
    assert not list(tmp_path.iterdir())


@pytest.mark.live
def test_probe_uses_oslat_when_window_allows():
    from pathlib import Path

    from core.host import Host
    from probes.base import ProbeConfig, Window
    from probes.jitter import JitterProbe
    cpu = Host.real().online_cpus()[-1]
    probe = JitterProbe(ProbeConfig(options={"jitter_cpus": str(cpu)}))
    probe.check()
    tables = probe.collect(Window(1.5, Path("/tmp")))
    assert probe.status_reason == ""  # the native meter, not the fallback
    assert tables["jitter_histogram"].num_rows > 0
    row = tables["jitter"].to_pylist()[0]
    assert row["cpu"] == cpu and row["loop_ns_mean"] < 100  # the C loop resolves gaps >= 100 ns
    assert any(r["name"] == "LOC" for r in tables["interrupts"].to_pylist())
