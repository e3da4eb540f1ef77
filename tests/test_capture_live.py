"""Live: `guardian-agent audit --probes tcp,capture` on loopback against a server that answers
after a fixed 2 ms delay. The capture's turns, the tcp probe's connection and the pcap file must
all show the same N requests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from probes.pcap_reader import CaptureReader
from reports.bundle import Bundle
from tests.conftest import PROJECT_ROOT

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "pcap"))
from loopback_traffic import DelayedEchoServer, request_loop  # noqa: E402

REQUESTS = 40
DELAY_S = 0.002


@pytest.mark.live
@pytest.mark.timeout(90)
def test_audit_tcp_and_capture_see_the_same_delayed_requests(tmp_path):
    out = tmp_path / "bundle"
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    with DelayedEchoServer(delay_s=DELAY_S) as server:
        audit = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "-v", "audit", "--probes", "tcp,capture", "--iface", "lo",
             "--capture-filter", f"tcp port {server.port}", "--peer-role", f"{server.port}=exchange",
             "--duration", "2", "--out", str(out)],  # 40 requests take < 0.5 s even under load
            cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stderr_lines = []

        def read_stderr(started: threading.Event):
            for line in audit.stderr:
                stderr_lines.append(line)
                if "collecting" in line:
                    started.set()
            started.set()

        started = threading.Event()
        reader = threading.Thread(target=read_stderr, args=(started,), daemon=True)
        reader.start()
        assert started.wait(60), "audit never started its window"
        answered = request_loop("127.0.0.1", server.port, REQUESTS, connections=1, deadline_s=30)
        stdout, _ = audit.communicate(timeout=60)
        reader.join(5)
    assert answered == REQUESTS
    assert audit.returncode == 0, "".join(stderr_lines) + stdout

    bundle = Bundle(out)
    assert bundle.probe("capture")["status"] == "ok"
    assert bundle.probe("tcp")["status"] == "ok", bundle.probe("tcp")

    # capture: one flow to the server, N turns at the server's delay
    flows = bundle.table("flows").to_pylist()
    assert [flow["server_port"] for flow in flows] == [server.port]
    assert flows[0]["turns"] == REQUESTS and flows[0]["handshake_rtt_ns"] > 0
    latency_ms = np.array(bundle.table("turns").column("latency_ns").to_pylist()) / 1e6
    assert len(latency_ms) == REQUESTS
    assert latency_ms.min() >= DELAY_S * 1000 * 0.95
    assert np.median(latency_ms) < DELAY_S * 1000 + 3.0  # shared 2-core box: generous upper bound

    # the pcap in the bundle holds those packets, headers only, and drops are reported
    capture = bundle.table("capture").to_pylist()[0]
    packets_in_file = sum(len(block) for block in CaptureReader(out / "capture.pcap").blocks())
    assert packets_in_file == capture["packets_in_file"] == flows[0]["packets"]
    assert packets_in_file >= 2 * REQUESTS + 3
    assert capture["snaplen_bytes"] == 128 and capture["packets_dropped_by_kernel"] >= 0
    assert "capture.pcap" in bundle.manifest["extras"]
    if shutil.which("tshark"):  # the same capture read by tshark: same flow, same packet count
        from tests.test_pcap_cli import tshark_conversations

        assert list(tshark_conversations(out / "capture.pcap").values()) == [flows[0]["packets"]]

    # tcp probe: the client connection, owned by this test process, with a non-zero RTT
    rows = [row for row in bundle.table("tcp").to_pylist() if row["rport"] == server.port]
    assert len(rows) == 1, rows
    client = rows[0]
    assert client["lport"] == flows[0]["client_port"]
    assert client["pid"] == os.getpid() and client["direction"] == "outbound"
    assert client["role"] == "exchange"
    assert client["srtt_us_p50"] > 0 and client["srtt_samples"] > 0
    assert client["connect_latency_us"] > 0
    assert client["bytes_received"] == REQUESTS * 256 and client["bytes_sent"] == REQUESTS * 64
    assert client["retransmits"] == 0
