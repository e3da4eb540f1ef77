"""HTML reports rendered from real bundles the tests make, loaded in headless Chromium.

Each live test makes a bundle the way a user does (audit on this kernel, pcap of a capture,
pg-log of a server log, gate on two bundles, a real HAProxy rollout), lets the command write its
report.html, and checks in Chromium: no console error (script errors and CSP violations from a
network fetch land there), a screenshot that is not blank, and key cells showing the numbers
the Parquet tables hold.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from tests.conftest import LOOPBACK_PING_PONG
from tests.report_browser import check_page, chromium_missing_reason, shown_number

FIXTURES = Path(__file__).resolve().parent / "fixtures"
sys.path.insert(0, str(FIXTURES / "pcap"))


@pytest.fixture(scope="module")
def browser():
    reason = chromium_missing_reason()
    if reason:
        pytest.skip(reason)


def report_path_from(stdout: str) -> Path:
    line = next(line for line in stdout.splitlines() if line.startswith("report: ") and ".html" in line)
    return Path(line.split()[1])


# ---------------------------------------------------------------------------------------------


# The audit's target: CPU work for the flame graph and a loopback request/response loop, so the
# tcp probe has connections with sRTT samples to show (per connection and per peer role).
TARGET = LOOPBACK_PING_PONG + """
import time
end = time.time() + 120
def spin():
    return sum(i * i for i in range(20000))
while time.time() < end:
    spin()
    client.sendall(b"ping")
    client.recv(64)
    time.sleep(0.001)
"""


@pytest.mark.live
def test_audit_report_shows_the_bundle_numbers(browser, agent_cli, tmp_path):
    target = subprocess.Popen([sys.executable, "-c", TARGET])
    try:
        bundle = tmp_path / "audit"
        result = agent_cli("audit", "--duration", "3", "--profile", "trading-latency", "--out", str(bundle),
                           "--probes", "host,syscalls,tcp,kernel,stacks,jitter", "--jitter-cpus", "1",
                           "--pid", str(target.pid), timeout=180)
    finally:
        target.kill()
        target.wait()
    assert result.returncode == 0, result.stderr + result.stdout
    page = report_path_from(result.stdout)
    assert page == bundle / "report.html"
    statuses = {r["name"]: (r["status"], r["reason"]) for r in json.loads((bundle / "manifest.json").read_text())["probes"]}
    assert statuses["syscalls"][0] == "ok", statuses
    assert "nsecs" in result.stdout and ": count     distribution" in result.stdout, result.stdout  # bcc-style
    cells = check_page(page, tmp_path)
    manifest = json.loads((bundle / "manifest.json").read_text())
    for record in manifest["probes"]:
        assert cells[f"probes:{record['name']}:status"] == record["status"]
    syscalls = pq.read_table(bundle / "syscalls.parquet")
    if "bucket_lo_ns" in syscalls.column_names:  # format 1: totals repeat on each bucket row
        syscalls = syscalls.group_by(["pid", "syscall"]).aggregate([("count", "max"), ("total_ns", "max")]) \
            .rename_columns(["pid", "syscall", "count", "total_ns"])
    per_syscall = syscalls.group_by(["syscall"]).aggregate([("count", "sum"), ("total_ns", "sum")])
    top = per_syscall.take(pc.sort_indices(per_syscall, [("total_ns_sum", "descending")])).to_pylist()[0]
    assert shown_number(cells[f"syscalls:{top['syscall']}:count"]) == top["count_sum"]
    assert shown_number(cells[f"syscalls:{top['syscall']}:total_ns"]) == top["total_ns_sum"]
    kernel = pq.read_table(bundle / "kernel.parquet").to_pylist()
    for row in kernel:
        expected = "n/a" if row["compliant"] is None else "yes" if row["compliant"] else "no"
        assert cells[f"kernel:{row['item']}:compliant"] == expected
    host = pq.read_table(bundle / "host.parquet")
    cpu0 = host.filter(pc.equal(host["cpu"], 0))
    assert shown_number(cells["host:0:busy_pct"]) == pytest.approx(pc.mean(cpu0["busy_pct"]).as_py(), abs=0.001)
    findings = pq.read_table(bundle / "findings.parquet")
    shown_findings = sum(shown_number(v) for k, v in cells.items() if k.startswith("findings:"))
    assert shown_findings == findings.num_rows
    html = page.read_text()
    assert "pid × syscall heat map" in html and "CPU time split per CPU" in html
    if (bundle / "stacks.svg").exists():
        assert "data:image/svg+xml;base64," in html
    assert "Interrupts and softirqs per CPU" in html and "why" in html and "reboot required" in html
    tcp = [row for row in pq.read_table(bundle / "tcp.parquet").to_pylist() if row["srtt_us_p50"] is not None]
    assert tcp, "the target's loopback connection has sRTT samples"
    for row in tcp:
        key = f"tcp:{row['laddr']}:{row['lport']} → {row['raddr']}:{row['rport']}:srtt_us_p50"
        assert shown_number(cells[key]) == pytest.approx(row["srtt_us_p50"], rel=1e-3)
    assert "sRTT by peer role" in html and "smoothed RTT per connection" in html
    jitter = pq.read_table(bundle / "jitter.parquet").to_pylist()
    for row in jitter:
        assert shown_number(cells[f"jitter:{row['cpu']}:gap_count"]) == row["gap_count"]


@pytest.mark.live
def test_pcap_and_gate_record_reports_show_the_parquet_numbers(browser, agent_cli, tmp_path):
    """Two captures (blue fast, green slow on one flow): the pcap report's turn quantiles equal the
    turns table; the gate's decision record report shows each metric's effect and counts."""
    from build import conversation, framed, merged, write_pcap

    bundles, printed = {}, {}
    for name, latency_s in (("blue", 0.0002), ("green", 0.0004)):
        fast = conversation("10.0.0.1", "10.0.0.2", 40000, 9000, [([100], 200)] * 300, latency_s=latency_s)
        slow = conversation("10.0.0.3", "10.0.0.2", 40001, 9000, [([100], 200)] * 120, latency_s=0.004,
                            start_s=0.01)
        capture = write_pcap(tmp_path / f"{name}.pcap", framed(merged(fast, slow)))
        bundles[name] = tmp_path / name
        result = agent_cli("pcap", str(capture), "--out", str(bundles[name]), *(["--no-html"] if name == "green" else []))
        assert result.returncode == 0, result.stderr
        printed[name] = result.stdout
    assert not (bundles["green"] / "report.html").exists()  # --no-html
    page = report_path_from(printed["blue"])
    assert page == bundles["blue"] / "report.html"
    cells = check_page(page, tmp_path)
    turns = pq.read_table(bundles["blue"] / "turns.parquet")
    for flow in set(turns["flow"].to_pylist()):
        latency = turns.filter(pc.equal(turns["flow"], flow))["latency_ns"].to_numpy()
        assert shown_number(cells[f"turns:flow {flow}:turns"]) == latency.size
        assert shown_number(cells[f"turns:flow {flow}:p50_ns"]) == np.quantile(latency, 0.5, method="higher")
        assert shown_number(cells[f"turns:flow {flow}:max_ns"]) == latency.max()
    for row in pq.read_table(bundles["blue"] / "flows.parquet").to_pylist():
        assert shown_number(cells[f"flows:{row['flow']}:packets"]) == row["packets"]

    record = tmp_path / "decisions"
    gate = agent_cli("gate", "--baseline", str(bundles["blue"]), "--candidate", str(bundles["green"]),
                     "--record", str(record))
    assert gate.returncode in (0, 1, 2), gate.stderr
    out = tmp_path / "gate.html"
    result = agent_cli("report", str(record), "--out", str(out))
    assert result.returncode == 0, result.stderr
    cells = check_page(out, tmp_path)
    decisions = pa.concat_tables([pq.read_table(p) for p in record.glob("*.parquet")]).to_pylist()
    judged = [row for row in decisions if row["metric"] and row["effect_pct"] is not None]
    assert judged
    for row in judged:
        assert shown_number(cells[f"gate:{row['metric']}:effect_pct"]) == pytest.approx(row["effect_pct"], abs=0.0005)
        assert shown_number(cells[f"gate:{row['metric']}:baseline_count"]) == row["baseline_count"]
    assert "per-metric effect with its interval against the threshold" in out.read_text()


@pytest.mark.live
def test_pg_log_report_lists_top_queries_with_their_quantiles(browser, agent_cli, tmp_path):
    bundle = tmp_path / "pglog"
    result = agent_cli("pg-log", str(FIXTURES / "pglog" / "recorded_stderr.log"), "--out", str(bundle))
    assert result.returncode == 0, result.stderr
    cells = check_page(report_path_from(result.stdout), tmp_path)
    queries = pq.read_table(bundle / "pg_queries.parquet")
    top = queries.take(pc.sort_indices(queries, [("total_ms", "descending")])).slice(0, 5).to_pylist()
    assert top
    for row in top:
        assert shown_number(cells[f"pg_queries:{row['fingerprint']}:calls"]) == row["calls"]
        for column in ("total_ms", "p50_ms", "p99_ms", "p999_ms"):
            assert shown_number(cells[f"pg_queries:{row['fingerprint']}:{column}"]) == pytest.approx(
                row[column], abs=0.0005)


@pytest.mark.live
def test_rollout_report_shows_stages_weights_and_decisions(browser, agent_cli, tmp_path):
    from tests.test_rollout_live import HAPROXY, Setup

    if not Path(HAPROXY).exists():
        pytest.skip("LIVE TEST SKIPPED: haproxy not installed (make setup installs it)")
    setup = Setup(tmp_path)
    try:
        setup.start(green_delay_ms=1.0)
        result = agent_cli("rollout", "--plan", str(setup.plan([(10, 1.0, 3), (100, 1.0, 3)])), timeout=90)
    finally:
        setup.stop()
    assert result.returncode in (0, 1) and "internal error" not in result.stderr, result.stderr + result.stdout
    page = report_path_from(result.stdout)
    cells = check_page(page, tmp_path)
    html = page.read_text()
    assert "traffic weight on green per stage" in html and "KPI latency per second by version" in html
    verdicts = pq.read_table(page.parent / "rollout_verdicts.parquet")
    assert verdicts.num_rows
    assert any(key.startswith("gate:") for key in cells)


def test_report_of_a_bundle_that_does_not_exist_is_bad_input(agent_cli, tmp_path):
    result = agent_cli("report", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no such bundle" in result.stderr
    (tmp_path / "half").mkdir()
    pq.write_table(pa.table({"x": [1]}), tmp_path / "half" / "x.parquet")
    result = agent_cli("report", str(tmp_path / "half"))
    assert result.returncode == 2 and "incomplete bundle" in result.stderr
    assert not (tmp_path / "half" / "report.html").exists()
