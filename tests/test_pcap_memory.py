"""pcap analysis memory: state per live flow only, finished flows retired, a cap on live flows,
bounded latency quantiles, and the streamed `pcap` bundle equal to the in-memory analysis.

Captures are generated with numpy (tests/fixtures/pcap/synthetic.py), so the truth is known:
every flow has 6 + 2 * turns packets and `turns` request→response turns.
"""

from __future__ import annotations

import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from probes.flow_index import MISSING, FlowIndex
from probes.latency_sketch import RELATIVE_ERROR, FlowLatencies, bin_middles, latency_bins
from probes.pcap_analysis import OTHER_FLOW, FlowAnalyzer, FlowLimits, analyse_capture, capture_findings
from probes.pcap_reader import CaptureReader, decode_tcp

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "pcap"))
import synthetic  # noqa: E402

SMALL_BUFFERS = dict(latency_buffer_samples=2048, turn_batch_rows=1024)


def _analyse_streaming(path: Path, limits: FlowLimits, trace: bool) -> dict:
    """Feed 64 KiB blocks; keep only row counts from the sinks and the largest state the
    analyser holds between blocks (numpy bytes: without and with the latency histogram), plus,
    when traced, the peak of everything Python and numpy allocated during the analysis."""
    result = {"flows": 0, "turns": 0, "state_bytes": 0, "histogram_bytes": 0, "traced_peak_bytes": 0}

    def sink(name):
        def write(table: pa.Table) -> None:
            result[name] += table.num_rows
        return write

    analyzer = FlowAnalyzer(limits=limits, flow_sink=sink("flows"), turn_sink=sink("turns"))
    if trace:
        tracemalloc.start()
    try:
        for block in CaptureReader(path, block_bytes=1 << 16).blocks():
            analyzer.add(decode_tcp(block))
            histogram = analyzer.latencies.keys.nbytes + analyzer.latencies.counts.nbytes
            result["histogram_bytes"] = max(result["histogram_bytes"], histogram)
            result["state_bytes"] = max(result["state_bytes"], analyzer.state_nbytes() - histogram)
        analyzer.finish()
        if trace:
            result["traced_peak_bytes"] = tracemalloc.get_traced_memory()[1]
    finally:
        if trace:
            tracemalloc.stop()
    return result


def test_state_and_traced_memory_do_not_grow_with_packets(tmp_path):
    short, long, longest = tmp_path / "short.pcap", tmp_path / "long.pcap", tmp_path / "longest.pcap"
    synthetic.write_capture(short, flows=20, turns=100)
    synthetic.write_capture(long, flows=20, turns=800)  # 8x the packets, same flows
    packets = synthetic.write_capture(longest, flows=20, turns=2400)
    assert packets == 20 * (6 + 2 * 2400)
    limits = FlowLimits(**SMALL_BUFFERS)
    runs = [_analyse_streaming(path, limits, trace=path != longest) for path in (short, long, longest)]
    assert [(run["flows"], run["turns"]) for run in runs] == [(20, 2000), (20, 16000), (20, 48000)]
    # Flow columns, index, pending runs, turn batch and latency buffer: bounded by flows and
    # buffer sizes, the same at 8x and 24x the packets.
    assert runs[2]["state_bytes"] <= runs[0]["state_bytes"] * 1.1, [run["state_bytes"] for run in runs]
    # The histogram fills the buckets a flow's latencies span (128 per power of two), then stops.
    spanned_octaves = 20  # lognormal latencies: well within 2^10..2^30 ns
    assert runs[2]["histogram_bytes"] <= 20 * 128 * spanned_octaves * 16
    # Everything Python and numpy allocated, not only the state counted above.
    assert runs[1]["traced_peak_bytes"] <= runs[0]["traced_peak_bytes"] * 1.3 + (1 << 20), (
        runs[0]["traced_peak_bytes"], runs[1]["traced_peak_bytes"])


def test_finished_flows_retire_and_give_the_same_rows_as_keeping_them(tmp_path):
    path = tmp_path / "waves.pcap"
    synthetic.write_capture(path, flows=2000, turns=3, waves=8, wave_gap_s=30)
    retiring, retiring_turns, retiring_summary = analyse_capture(CaptureReader(path, block_bytes=1 << 16))
    keeping, keeping_turns, keeping_summary = analyse_capture(
        CaptureReader(path, block_bytes=1 << 16), limits=FlowLimits(idle_timeout_s=1e9, close_linger_s=1e9))
    # Waves of 250 flows that close 30 s apart: at most two waves are ever live at once.
    assert keeping_summary.peak_live_flows == 2000
    assert retiring_summary.peak_live_flows <= 500
    assert retiring.equals(keeping) and retiring.num_rows == 2000
    assert retiring_turns.equals(keeping_turns) and retiring_turns.num_rows == 6000
    assert set(retiring.column("packets").to_pylist()) == {12}
    assert set(retiring.column("unanswered_requests").to_pylist()) == {0}


def test_flows_beyond_the_cap_are_folded_into_one_row_and_a_finding(tmp_path):
    path = tmp_path / "many.pcap"
    synthetic.write_capture(path, flows=250, turns=4)
    flows, turns, summary = analyse_capture(CaptureReader(path, block_bytes=1 << 16),
                                            limits=FlowLimits(max_live_flows=100))
    assert summary.folded_flows == 150 and summary.folded_packets == 150 * 14
    assert flows.num_rows == 101 and turns.num_rows == 100 * 4
    other = flows.filter(pa.compute.equal(flows["flow"], OTHER_FLOW)).to_pylist()
    assert other[0]["client"] == "other" and other[0]["packets"] == 150 * 14
    assert other[0]["bytes"] == 150 * (14 * 40 + 4 * 300)
    assert sum(flows.column("packets").to_pylist()) == 250 * 14
    messages = capture_findings(summary, "pcap").column("message").to_pylist()
    assert any("150 flows (2100 packets)" in message and "cap of 100" in message for message in messages)
    # The same flows one wave at a time fit under the cap: nothing folded.
    # (Waves of 200 flows, each longer than a 64 KiB block: flows finish between blocks.)
    waves = tmp_path / "waves.pcap"
    synthetic.write_capture(waves, flows=1000, turns=4, waves=5, wave_gap_s=30)
    flows, _, summary = analyse_capture(CaptureReader(waves, block_bytes=1 << 16),
                                        limits=FlowLimits(max_live_flows=450))
    assert summary.folded_packets == 0 and flows.num_rows == 1000


def test_latency_quantiles_exact_under_the_buffer_and_within_the_bound_beyond(tmp_path):
    path = tmp_path / "latency.pcap"
    synthetic.write_capture(path, flows=30, turns=400, seed=7)
    exact, turns, exact_summary = analyse_capture(CaptureReader(path, block_bytes=1 << 16))
    sketched, sketched_turns, summary = analyse_capture(CaptureReader(path, block_bytes=1 << 16),
                                                        limits=FlowLimits(**SMALL_BUFFERS))
    assert exact_summary.sketched_latency_flows == 0 and summary.sketched_latency_flows == 30
    assert sketched_turns.equals(turns)
    by_flow = {}
    for flow, latency in zip(turns.column("flow").to_pylist(), turns.column("latency_ns").to_pylist()):
        by_flow.setdefault(flow, []).append(latency)
    for row_exact, row_sketched in zip(exact.to_pylist(), sketched.to_pylist()):
        values = np.sort(by_flow[row_exact["flow"]])
        for column, quantile in (("latency_ns_p50", 0.5), ("latency_ns_p99", 0.99)):
            truth = values[int(np.ceil(quantile * len(values))) - 1]  # nearest rank, independent
            assert row_exact[column] == truth
            assert abs(row_sketched[column] - truth) <= RELATIVE_ERROR * truth + 1
        assert row_exact["latency_ns_max"] == row_sketched["latency_ns_max"] == values[-1]
    untouched = [name for name in exact.column_names if not name.startswith("latency_ns_p")]
    assert sketched.select(untouched).equals(exact.select(untouched))


def test_log_linear_bins_and_sketch_bound_on_random_values():
    rng = np.random.default_rng(3)
    values = np.concatenate((np.arange(0, 5000), rng.integers(1, 1 << 50, 200_000)))
    middles = bin_middles(latency_bins(values))
    assert np.all(np.abs(middles - values) <= RELATIVE_ERROR * values)
    assert np.all(latency_bins(values[:256]) == values[:256])  # exact below 256 ns
    sketch = FlowLatencies(buffer_samples=1000)
    flows = rng.integers(0, 5, 20_000)
    latencies = rng.lognormal(11, 2, 20_000).astype(np.int64) + 1
    for start in range(0, 20_000, 700):
        sketch.add(flows[start:start + 700], latencies[start:start + 700])
    ids = np.arange(5)
    minimum = np.array([latencies[flows == i].min() for i in ids])
    maximum = np.array([latencies[flows == i].max() for i in ids])
    p50, p99 = sketch.pop_quantiles(ids, minimum, maximum)
    for i in ids:
        values = np.sort(latencies[flows == i])
        for got, quantile in ((p50[i], 0.5), (p99[i], 0.99)):
            truth = values[int(np.ceil(quantile * len(values))) - 1]
            assert abs(got - truth) <= RELATIVE_ERROR * truth + 1
    assert sketch.nbytes() == 0  # popped flows leave nothing behind


def test_flow_index_keeps_tuples_with_one_hash_apart():
    index = FlowIndex(capacity=16)
    tuples = np.arange(100, 400)  # stand-ins for 4-tuples: slot i holds tuple 100 + i
    hashes = (tuples % 7 + 1).astype(np.uint64)  # seven hashes for 300 tuples

    def verify(slots, which):
        return tuples[slots] == wanted[which]

    wanted = tuples
    index.insert(hashes, np.arange(len(tuples)))
    found, positions = index.lookup(hashes, verify)
    assert np.array_equal(found, np.arange(len(tuples))) and (positions >= 0).all()
    wanted = np.array([5000, 100])
    found, _ = index.lookup(np.array([1, 3], dtype=np.uint64), verify)
    assert found.tolist() == [MISSING, 0]


def test_pcap_bundle_streams_the_same_rows_as_the_in_memory_analysis(tmp_path, agent_cli):
    path = tmp_path / "cap.pcap"
    synthetic.write_capture(path, flows=300, turns=20)
    expected_flows, expected_turns, _ = analyse_capture(CaptureReader(path), limits=FlowLimits(max_live_flows=250))
    out = tmp_path / "bundle"
    result = agent_cli("pcap", str(path), "--out", str(out), "--max-flows", "250", "--no-html")
    assert result.returncode == 0, result.stderr
    flows = pq.read_table(out / "flows.parquet")
    turns = pq.read_table(out / "turns.parquet")
    assert flows.sort_by("flow").equals(expected_flows.replace_schema_metadata(None).cast(flows.schema))
    assert turns.sort_by([("flow", "ascending"), ("ts_ns", "ascending")]).equals(
        expected_turns.cast(turns.schema))
    assert flows.num_rows == 251 and turns.num_rows == 250 * 20
    assert "251 TCP flows, 5000 request→response turns" in result.stdout
    messages = pq.read_table(out / "findings.parquet").column("message").to_pylist()
    assert any("50 flows (2300 packets) beyond the cap of 250 live flows" in message for message in messages)
