"""jitter native meters: oslat's and cyclictest's JSON reports into jitter rows, the meter choice,
and live runs of both meters (and the Python fallback) through the probe on one CPU."""

from __future__ import annotations

import shutil

import pytest

from probes.jitter import JitterProbe, choose_meter, oslat_rows, run_oslat
from probes.jitter_cyclictest import cyclictest_command, cyclictest_rows


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


def test_cyclictest_report_to_rows():
    # the shape rt-tests 2.40 writes with --json (histogram keys: whole us, floor)
    report = {"cmdline:": "cyclictest --quiet --default-system --duration 2 --json=/tmp/x.json",
              "thread": {"0": {"cycles": 10_000, "min": 8, "max": 10203, "avg": 32.8, "cpu": 1,
                               "histogram": {"3": 9_000, "8": 900, "40": 60, "400": 2}}}}
    rows, buckets = cyclictest_rows(report, 5_000)
    row = rows[0]
    assert row["meter"] == "cyclictest" and row["cpu"] == 1 and row["iterations"] == 10_000
    assert row["duration_ns"] == 2_000_000_000 and row["resolution_ns"] == 1000
    # 38 wakeups were later than the 1 ms histogram: they land in the last bucket, max stays exact
    assert buckets[-1] == {"cpu": 1, "meter": "cyclictest", "bucket_us": 1000, "count": 38}
    assert row["gap_count"] == 1000  # 8, 40, 400 and overflow buckets are >= 5 us; the 3 us one is not
    assert row["gap_p50_ns"] == 8_000 and row["gap_p99_ns"] == 1_000_000 and row["gap_max_ns"] == 10_203_000
    assert row["lost_pct"] is None and row["wakeup_avg_ns"] == 32_800 and row["wakeup_min_ns"] == 8_000
    command = cyclictest_command([2, 3], 5, "/tmp/x.json")
    assert "--default-system" in command and command[command.index("--affinity") + 1] == "2-3"
    assert command[command.index("--threads") + 1] == "2"


def test_meter_choice_prefers_oslat_then_cyclictest_and_says_why_it_fell_back():
    both = {"oslat": "/usr/bin/oslat", "cyclictest": "/usr/bin/cyclictest"}.get
    assert choose_meter(None, 2_000_000_000, both) == ("oslat", "")
    assert choose_meter("auto", 2_000_000_000, {"cyclictest": "/usr/bin/cyclictest"}.get) == ("cyclictest", "")
    assert choose_meter("cyclictest", 2_000_000_000, both) == ("cyclictest", "")
    meter, why = choose_meter("auto", 2_000_000_000, lambda name: None)
    assert meter == "python" and "apt-get install rt-tests" in why
    assert choose_meter("oslat", 500_000_000, both)[0] == "python"  # whole seconds only
    assert choose_meter("python", 2_000_000_000, both) == ("python", "asked for with --jitter-meter python")


@pytest.mark.live
def test_probe_runs_each_meter_and_the_manifest_reason_names_it():
    from pathlib import Path

    from core.host import Host
    from probes.base import ProbeConfig, Window

    assert shutil.which("cyclictest") and shutil.which("oslat"), "rt-tests is installed on this host (make setup)"
    cpu = Host.real().online_cpus()[-1]
    seen = {}
    for meter in ("auto", "cyclictest", "python"):
        probe = JitterProbe(ProbeConfig(options={"jitter_cpus": str(cpu), "jitter_meter": meter}))
        probe.check()
        tables = probe.collect(Window(1.2 if meter != "python" else 0.5, Path("/tmp")))
        row = tables["jitter"].to_pylist()[0]
        assert row["cpu"] == cpu
        seen[row["meter"]] = (probe.status_reason, row, tables)
    reason, row, tables = seen["oslat"]  # auto picks the C busy loop
    assert reason.startswith("meter: oslat (C busy loop") and "only the fallback" in reason
    # resolution: oslat's loop costs well under 1 us on this machine, so gaps of >= 100 ns land
    # in its first buckets instead of vanishing into the loop (the Python loop costs ~100-300 ns)
    assert row["resolution_ns"] < 1000 and row["iterations"] > 1_000_000
    assert set(tables["jitter_histogram"].column("meter").to_pylist()) == {"oslat"}
    reason, row, tables = seen["cyclictest"]
    assert reason.startswith("meter: cyclictest (timer wakeup latency") and "only the fallback" in reason
    assert 4_000 <= row["iterations"] <= 6_500  # one wakeup per 200 us for 1 s
    assert row["wakeup_min_ns"] >= 0
    assert row["gap_max_ns"] is None or row["gap_max_ns"] >= row["gap_p50_ns"]
    histogram = tables["jitter_histogram"].to_pylist()
    assert sum(b["count"] for b in histogram) == row["iterations"] and {b["meter"] for b in histogram} == {"cyclictest"}
    reason, row, tables = seen["python"]
    assert reason == "meter: python loop, the fallback (asked for with --jitter-meter python)"
    assert tables["jitter_histogram"].num_rows == 0 and row["resolution_ns"] == row["loop_ns_mean"]
    assert any(r["name"] == "LOC" for r in seen["oslat"][2]["interrupts"].to_pylist())
