"""jitter probe: interrupt parsing on recorded /proc files, gap statistics, CPU choice safety,
and a live busy-loop on one explicitly chosen CPU."""

from __future__ import annotations

from pathlib import Path

import pytest

from core.errors import BadInput, Unavailable
from core.host import Host
from probes.base import ProbeConfig, Window
from probes.jitter import (JitterProbe, choose_cpus, interrupt_rows, jitter_findings, jitter_rows,
                           parse_interrupt_counts)

FAKE = Path(__file__).resolve().parent / "fixtures" / "proc_fake"


def test_parse_interrupts_and_softirqs_recorded():
    counts = parse_interrupt_counts((FAKE / "proc/interrupts").read_text())
    assert counts[("LOC", "Local timer interrupts")] == {0: 10000, 1: 20000, 2: 3000, 3: 50}
    assert counts[("24", "PCI-MSIX-0000:00:03.0 0-edge eth0-rx-0")][3] == 500
    assert not any(name == "ERR" for name, _ in counts)  # global counters have no per-CPU columns
    softirqs = parse_interrupt_counts((FAKE / "proc/softirqs").read_text())
    assert softirqs[("NET_RX", "")] == {0: 300, 1: 100, 2: 0, 3: 250}


def test_parse_interrupts_with_offline_cpu_columns():
    text = "           CPU0       CPU2\n  LOC:        5        7   Local timer interrupts\n"
    assert parse_interrupt_counts(text) == {("LOC", "Local timer interrupts"): {0: 5, 2: 7}}


def test_interrupt_deltas_for_chosen_cpus():
    before = (FAKE / "proc/interrupts").read_text()
    after = before.replace("        50   Local timer", "       250   Local timer").replace(
        "   0-edge      eth0-rx-0", "   0-edge      eth0-rx-0").replace("500   PCI", "530   PCI")
    rows = interrupt_rows(before, after, [3], "hardirq", 2.0)
    by_name = {row["name"]: row for row in rows}
    assert by_name["LOC"]["count"] == 200 and by_name["LOC"]["rate_hz"] == 100.0
    assert by_name["24"]["count"] == 30 and by_name["24"]["description"].endswith("eth0-rx-0")
    assert by_name["RES"]["count"] == 0  # named per-CPU interrupts are kept even at zero
    assert "25" not in by_name  # a device IRQ with no delta is dropped
    assert all(row["cpu"] == 3 for row in rows)


def test_jitter_rows_percentiles_and_loss():
    gaps = [6_000] * 990 + [50_000] * 9 + [2_000_000]
    rows = jitter_rows([{"cpu": 2, "elapsed_ns": 1_000_000_000, "iterations": 5_000_000, "gap_count": 1000,
                         "gap_total_ns": sum(gaps), "gaps_ns": gaps}], 5_000)
    row = rows[0]
    assert row["gap_count"] == 1000 and row["gap_p50_ns"] == 6_000
    # "higher" interpolation: a percentile is always an observed gap and never under-reports a tail.
    assert row["gap_p99_ns"] == 50_000 and row["gap_p999_ns"] == 2_000_000 and row["gap_max_ns"] == 2_000_000
    assert row["loop_ns_mean"] == 200.0
    assert row["lost_pct"] == pytest.approx(100 * sum(gaps) / 1e9, rel=1e-3)
    quiet = jitter_rows([{"cpu": 3, "elapsed_ns": 10, "iterations": 1, "gaps_ns": []}], 5_000)[0]
    assert quiet["gap_count"] == 0 and quiet["gap_max_ns"] is None
    found = jitter_findings(rows, [{"cpu": 2, "name": "LOC", "count": 250}], isolated=[2])
    assert found[0]["severity"] == "critical" and "LOC 250" in found[0]["message"]


def test_cpu_choice_is_never_a_guess():
    with pytest.raises(Unavailable, match="--jitter-cpus"):
        choose_cpus(None, isolated=[], online=[0, 1])
    assert choose_cpus(None, isolated=[2, 3], online=[0, 1, 2, 3]) == [2, 3]
    assert choose_cpus("1", isolated=[2, 3], online=[0, 1, 2, 3]) == [1]
    with pytest.raises(BadInput, match="not online"):
        choose_cpus("7", isolated=[], online=[0, 1])
    assert JitterProbe.default_enabled == bool(Host.real().isolated_cpus())


@pytest.mark.live
def test_live_busy_loop_on_one_chosen_cpu():
    cpu = Host.real().online_cpus()[-1]
    probe = JitterProbe(ProbeConfig(options={"jitter_cpus": str(cpu)}))
    probe.check()
    window = Window(0.6, Path("/tmp"))
    tables = probe.collect(window)
    row = tables["jitter"].to_pylist()[0]
    assert row["cpu"] == cpu and row["iterations"] > 100_000
    assert row["loop_ns_mean"] < 5_000  # the loop resolves gaps far below the threshold
    assert 0.4e9 < row["duration_ns"] < 1.5e9
    interrupts = tables["interrupts"].to_pylist()
    assert any(r["name"] == "LOC" and r["cpu"] == cpu for r in interrupts)
    assert {r["cpu"] for r in interrupts} == {cpu}
