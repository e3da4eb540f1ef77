"""Reports of bundles that are hard to draw: failed and unavailable probes, empty tables, a
million-row table, a table no section knows (chaos), and syscalls in bundle formats 1 and 2."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reports.bundle import BundleWriter, ProbeRecord
from reports.html import write_report
from tests.report_browser import chromium_missing_reason, keyed_cells, load, non_blank_share, shown_number

MILLION = 1_000_000
PAGE_BUDGET_BYTES = 3_000_000

PAIRS_SCHEMA = pa.schema([("pid", pa.int32()), ("comm", pa.string()), ("syscall", pa.string()),
                          ("count", pa.int64()), ("total_ns", pa.int64()), ("max_ns", pa.int64())])
BUCKETS_SCHEMA = pa.schema([("pid", pa.int32()), ("syscall", pa.string()), ("bucket_lo_ns", pa.int64()),
                            ("bucket_hi_ns", pa.int64()), ("bucket_count", pa.int64())])


def finish(writer: BundleWriter, bundle_format: int = 1) -> None:
    writer.finish()
    if bundle_format != 1:
        path = writer.out_dir / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["format"] = bundle_format
        path.write_text(json.dumps(manifest))


def degraded_bundle(path: Path) -> Path:
    rng = np.random.default_rng(7)
    writer = BundleWriter(path)
    writer.write_table("syscalls", PAIRS_SCHEMA.empty_table(), "syscalls")
    writer.write_table("syscall_buckets", BUCKETS_SCHEMA.empty_table(), "syscalls")
    writer.write_table("tcp", pa.table({"pid": pa.array([], pa.int32()), "laddr": pa.array([], pa.string())}), "tcp")
    latency = rng.lognormal(mean=11, sigma=0.6, size=MILLION).astype(np.int64)
    flows = rng.integers(0, 3, size=MILLION)
    writer.write_table("turns", pa.table({"flow": flows, "ts": pa.array(np.arange(MILLION) * 1000, pa.timestamp("us", tz="UTC")),
                                          "latency_ns": latency, "request_bytes": np.full(MILLION, 100)}), "pcap")
    writer.write_table("chaos_samples", pa.table({"ts_ns": np.arange(MILLION), "latency_ns": latency,
                                                  "arm": np.where(flows == 0, "control", "fault")}), "chaos")
    findings = [{"probe": "syscalls", "severity": "warning", "subject": f"worker-{i} ({1000 + i})",
                 "message": f"futex: {i + 3} calls over 10 ms", "recommendation": "pin the worker to an isolated CPU"}
                for i in range(13)]
    findings.append({"probe": "kernel", "severity": "critical", "subject": "vm.swappiness",
                     "message": "60, profile expects 10", "recommendation": "guardian-agent tune apply"})
    writer.write_table("findings", pa.Table.from_pylist(findings), "runner")
    writer.add_probe(ProbeRecord("syscalls", "failed", "BPF program failed to load: needs CAP_BPF", {}, 0.5))
    writer.add_probe(ProbeRecord("stacks", "unavailable", "py-spy not installed: pip install py-spy"))
    writer.add_probe(ProbeRecord("tcp", "ok", "", {"tcp": 0}, 3.0))
    writer.add_probe(ProbeRecord("chaos", "ok", "", {"chaos_samples": MILLION}, 3.0))
    finish(writer, 2)
    return path


@pytest.fixture(scope="module")
def degraded(tmp_path_factory):
    """(bundle, rendered report) made once: a million rows take a few seconds to write and draw."""
    bundle = degraded_bundle(tmp_path_factory.mktemp("degraded") / "bundle")
    return bundle, write_report(bundle)


def test_degraded_bundle_with_a_million_rows_stays_under_budget_and_says_so(degraded):
    bundle, rendered = degraded
    html = rendered.path.read_text()
    assert rendered.size_bytes < PAGE_BUDGET_BYTES
    assert "turns has 1,000,000 rows: shown as per-flow quantiles" in html
    assert "chaos_samples has 1,000,000 rows: its numeric columns are summarised" in html
    assert 'id="aggregated-note"' in html
    assert "BPF program failed to load: needs CAP_BPF" in html and "py-spy not installed" in html
    assert "The syscalls table is empty" in html and "No TCP connection" in html
    cells = keyed_cells(html)
    assert cells["probes:syscalls:status"] == "failed" and cells["probes:stacks:status"] == "unavailable"
    # Thirteen processes with the same advice: one row with a count of 13, after the critical one.
    assert cells["findings:0:count"] == "1" and cells["findings:1:count"] == "13"
    turns = pq.read_table(bundle / "turns.parquet")
    flow = turns["flow"].to_numpy() == 0
    latency = turns["latency_ns"].to_numpy()[flow]
    assert shown_number(cells["turns:flow 0:turns"]) == latency.size
    assert shown_number(cells["turns:flow 0:p99_ns"]) == np.quantile(latency, 0.99, method="higher")


@pytest.mark.live
def test_degraded_report_loads_in_chromium(degraded, tmp_path):
    reason = chromium_missing_reason()
    if reason:
        pytest.skip(reason)
    _bundle, rendered = degraded
    loaded = load(rendered.path, screenshot=tmp_path / "degraded.png")
    assert loaded.console == []
    assert non_blank_share(loaded.screenshot) > 0.05
    assert keyed_cells(loaded.dom)["findings:1:count"] == "13"


def syscall_rows():
    """Two processes, three syscalls, log2 buckets: the same data in either format."""
    pairs, buckets = [], []
    for pid, comm in ((100, "trader"), (200, "feed")):
        for index, syscall in enumerate(("read", "futex", "epoll_wait")):
            slots = {1 << (9 + index + k): (pid // 100) * (k + 1) * 10 for k in range(4)}
            count = sum(slots.values())
            total = sum(lo * n * 3 // 2 for lo, n in slots.items())
            pairs.append({"pid": pid, "comm": comm, "syscall": syscall, "count": count, "total_ns": total,
                          "max_ns": max(slots) * 2 - 1})
            buckets += [{"pid": pid, "syscall": syscall, "bucket_lo_ns": lo, "bucket_hi_ns": lo * 2, "bucket_count": n}
                        for lo, n in slots.items()]
    return pairs, buckets


def test_syscalls_render_the_same_from_bundle_format_1_and_format_2(tmp_path):
    pairs, buckets = syscall_rows()
    format_1_rows = [{**pair, **bucket} for pair in pairs for bucket in buckets
                     if (bucket["pid"], bucket["syscall"]) == (pair["pid"], pair["syscall"])]
    writer = BundleWriter(tmp_path / "f1")
    writer.write_table("syscalls", pa.Table.from_pylist(format_1_rows), "syscalls")
    finish(writer, 1)
    writer = BundleWriter(tmp_path / "f2")
    writer.write_table("syscalls", pa.Table.from_pylist(pairs, PAIRS_SCHEMA), "syscalls")
    writer.write_table("syscall_buckets", pa.Table.from_pylist(buckets, BUCKETS_SCHEMA), "syscalls")
    finish(writer, 2)
    pages = [write_report(tmp_path / name).path.read_text() for name in ("f1", "f2")]
    cells = [keyed_cells(page) for page in pages]
    assert cells[0] == cells[1]
    for syscall in ("read", "futex", "epoll_wait"):
        expected = sum(p["count"] for p in pairs if p["syscall"] == syscall)
        assert shown_number(cells[1][f"syscalls:{syscall}:count"]) == expected
    # The histogram titles (one per top syscall) carry the call counts of both formats alike.
    for page in pages:
        assert page.count("latency, log2 buckets") == 3
    assert "pid × syscall heat map" in pages[0]


def test_unknown_format_and_foreign_directories_are_refused(tmp_path):
    from core.errors import BadInput

    writer = BundleWriter(tmp_path / "future")
    writer.write_table("findings", pa.table({"probe": ["x"]}), "x")
    finish(writer, 99)
    with pytest.raises(BadInput, match="unsupported bundle format 99"):
        write_report(tmp_path / "future")
    assert not (tmp_path / "future" / "report.html").exists()


def test_terminal_histograms_have_bcc_layout_exactly():
    """The same counts through bcc's own print_log2_hist (the oracle) and ours."""
    import contextlib
    import io

    bcc_table = pytest.importorskip("bcc.table", reason="python3-bpfcc provides bcc's printer")
    from agent.summary import log2_histogram_lines

    counts = {512: 2, 1024: 7, 65536: 1, 262144: 3}
    values = [0] * 64
    for low, count in counts.items():
        values[low.bit_length()] = count  # bcc slot i holds [2^(i-1), 2^i - 1]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        bcc_table._print_log2_hist(values, "nsecs", True)
    ours = log2_histogram_lines([(low, low * 2, count) for low, count in sorted(counts.items())])
    assert ours == printed.getvalue().rstrip("\n").split("\n")
