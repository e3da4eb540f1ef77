"""tcp probe: slot maths, roles and row building on recorded kernel records, plus a live run on
loopback (real eBPF on this kernel's tracepoints)."""

from __future__ import annotations

import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import pytest

from core.errors import BadInput
from probes.base import ProbeConfig, Window
from probes.tcp import (MAX_CONNECTION_FINDINGS, SRTT_SLOTS, TcpProbe, parse_roles, peer_role, slots_quantile,
                        srtt_slot, srtt_slot_bounds, tcp_findings, tcp_rows)

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "pcap"))
from loopback_traffic import DelayedEchoServer, request_loop  # noqa: E402


def test_srtt_slots_cover_every_value_once():
    for value in list(range(0, 5000)) + [65_535, 1_000_000, 50_000_000]:
        low, high = srtt_slot_bounds(srtt_slot(value))
        assert low <= value < high, value
        if value >= 4:
            assert (high - low) / low <= 0.25
    largest = (1 << 32) - 1  # the kernel's srtt is a u32: every value has a slot
    low, high = srtt_slot_bounds(srtt_slot(largest))
    assert srtt_slot(largest) < SRTT_SLOTS and low <= largest < high


def test_slots_quantile_is_within_a_slot_and_clamped_to_seen_values():
    slots = [0] * SRTT_SLOTS
    for value, count in ((100, 90), (1000, 9), (5000, 1)):
        slots[srtt_slot(value)] += count
    p50 = slots_quantile(slots, 0.50, 100, 5000)
    p99 = slots_quantile(slots, 0.99, 100, 5000)
    assert 100 <= p50 <= 112
    assert 896 <= p99 <= 1024
    assert slots_quantile(slots, 1.0, 100, 5000) == 5000  # clamped to the max seen
    assert slots_quantile([0] * SRTT_SLOTS, 0.5, 0, 0) is None


def test_roles_from_configuration():
    ports, networks = parse_roles(["9100-9102=exchange", "10.20.0.0/16=exchange", "8080=internal-api"])
    assert peer_role("1.1.1.1", 5432, 40000, "outbound", ports, networks) == "database"
    assert peer_role("1.1.1.1", 9101, 40000, "outbound", ports, networks) == "exchange"
    assert peer_role("10.20.1.1", 443, 40000, "outbound", ports, networks) == "exchange"
    assert peer_role("127.0.0.1", 40000, 5432, "inbound", ports, networks) == "database-client"
    assert peer_role("10.1.1.1", 443, 40000, "outbound", ports, networks) == "internal"
    assert peer_role("1.1.1.1", 443, 40000, "outbound", ports, networks) == "external"
    for bad in ("9100", "x=exchange", "70000=exchange", "9100="):
        with pytest.raises(BadInput):
            parse_roles([bad])


def recorded(**overrides) -> dict:
    """A connection_t record as the kernel side produces it (ns are CLOCK_MONOTONIC)."""
    slots = [0] * SRTT_SLOTS
    slots[srtt_slot(180)] = 40
    slots[srtt_slot(2400)] = 1
    record = {
        "first_ns": 1_000_000_000, "connect_start_ns": 1_000_000_000, "established_ns": 1_000_090_000,
        "closed_ns": 0, "last_ns": 3_000_000_000, "bytes_received": 9000, "bytes_sent": 1200,
        "srtt_sum_us": 40 * 180 + 2400, "srtt_samples": 41, "pid": 4242, "srtt_min_us": 170,
        "srtt_max_us": 2400, "retransmits": 2, "resets_received": 0, "resets_sent": 0, "family": 2,
        "lport": 51000, "rport": 5432, "active": 1, "state": 1,
        "laddr": bytes([10, 0, 0, 1]) + bytes(12), "raddr": bytes([10, 0, 0, 2]) + bytes(12),
        "comm": b"trader\0\0\0\0\0\0\0\0\0\0", "srtt_slots": slots,
    }
    record.update(overrides)
    return record


def test_rows_from_recorded_kernel_records():
    inbound = recorded(pid=0, comm=b"", active=0, lport=5432, rport=40000, connect_start_ns=0,
                       closed_ns=2_000_000_000, state=7, family=10,
                       laddr=socket.inet_pton(socket.AF_INET6, "fd00::1"),
                       raddr=socket.inet_pton(socket.AF_INET6, "fd00::2"))
    rows = tcp_rows([recorded(), inbound], now_monotonic_ns=4_000_000_000, wall_offset_ns=0,
                    listeners={5432: (77, "postgres")})
    by_direction = {row["direction"]: row for row in rows}
    outbound = by_direction["outbound"]
    assert (outbound["pid"], outbound["comm"], outbound["laddr"], outbound["raddr"]) == (4242, "trader", "10.0.0.1", "10.0.0.2")
    assert outbound["role"] == "database" and outbound["state"] == "ESTABLISHED" and not outbound["closed"]
    assert outbound["connect_latency_us"] == 90.0
    assert outbound["lifetime_ms"] == 3000.0  # open: until now
    assert 160 <= outbound["srtt_us_p50"] <= 192 and outbound["srtt_us_max"] == 2400
    assert outbound["retransmits"] == 2 and outbound["bytes_sent"] == 1200
    accepted = by_direction["inbound"]
    assert (accepted["pid"], accepted["comm"]) == (77, "postgres")  # owner from the listener
    assert accepted["laddr"] == "fd00::1" and accepted["role"] == "database-client"
    assert accepted["closed"] and accepted["lifetime_ms"] == 1000.0 and accepted["connect_latency_us"] is None
    only_trader = tcp_rows([recorded(), inbound], 4_000_000_000, 0, listeners={5432: (77, "postgres")}, pids=[4242])
    assert [row["pid"] for row in only_trader] == [4242]


@pytest.mark.live
@pytest.mark.timeout(60)
def test_live_probe_sees_rtt_bytes_and_a_reset():
    probe = TcpProbe(ProbeConfig(options={"peer_roles": ["7=echo-role"]}))
    probe.check()
    probe.prepare()
    window = Window(2.5, Path("/tmp"))

    def traffic(result: dict):
        time.sleep(0.3)
        with DelayedEchoServer(delay_s=0.001, host="::1") as server:
            result["port"] = server.port
            result["answered"] = request_loop("::1", server.port, 20)
        # a listener that resets the connection: SO_LINGER 0 then close
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        accepted.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        accepted.close()
        time.sleep(0.05)
        result["reset_port"] = listener.getsockname()[1]
        client.close()
        listener.close()

    result: dict = {}
    thread = threading.Thread(target=traffic, args=(result,))
    thread.start()
    tables = probe.collect(window)
    thread.join()
    rows = tables["tcp"].to_pylist()
    echo = [row for row in rows if row["rport"] == result["port"] and row["raddr"] == "::1"]
    assert result["answered"] == 20 and len(echo) == 1, rows
    assert echo[0]["pid"] == os.getpid() and echo[0]["closed"]
    assert echo[0]["srtt_us_p50"] > 0 and echo[0]["bytes_received"] == 20 * 256
    assert echo[0]["bytes_sent"] == 20 * 64
    assert echo[0]["connect_latency_us"] > 0 and echo[0]["lifetime_ms"] > 0
    reset = [row for row in rows if row["rport"] == result["reset_port"]]
    assert len(reset) == 1 and reset[0]["resets_received"] == 1, rows
    findings = tables["findings"].to_pylist()
    assert any("reset" in finding["message"] for finding in findings)


def test_bad_peer_role_is_refused_before_the_audit_starts(tmp_path):
    from tests.conftest import run_agent

    result = run_agent("audit", "--probes", "tcp", "--peer-role", "5432-x=database", "--out", str(tmp_path / "b"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "guardian-agent: --peer-role '5432-x=database': '5432-x' is not a port, port range or network"]
    assert not (tmp_path / "b").exists()


@pytest.mark.live
@pytest.mark.timeout(120)
def test_tcp_and_syscalls_probes_compile_side_by_side(tmp_path):
    """The runner prepares probes in parallel threads and BCC's compiler is not thread-safe:
    with tcp listed first (its thread starts first) both programs must still load."""
    from reports.bundle import Bundle
    from tests.conftest import run_agent

    result = run_agent("audit", "--probes", "tcp,syscalls", "--duration", "1", "--out", str(tmp_path / "b"))
    assert result.returncode == 0, result.stderr
    statuses = {record["name"]: record["status"] for record in Bundle(tmp_path / "b").manifest["probes"]}
    assert statuses == {"tcp": "ok", "syscalls": "ok"}, Bundle(tmp_path / "b").manifest["probes"]


def test_findings_keep_the_worst_connections_and_summarise_the_rest():
    rows = tcp_rows([recorded(lport=50000 + i, retransmits=i + 1) for i in range(MAX_CONNECTION_FINDINGS + 3)],
                    4_000_000_000, 0)
    findings = tcp_findings(rows, lost_untracked=2, lost_closed=0)
    warnings = [f for f in findings if f["message"].endswith("retransmits")]
    assert len(warnings) == MAX_CONNECTION_FINDINGS
    assert warnings[0]["message"] == f"{MAX_CONNECTION_FINDINGS + 3} retransmits"
    assert any(f["subject"] == "3 more connections" for f in findings)
    assert findings[-1]["subject"] == "probe capacity" and findings[-1]["message"].startswith("partial: ")
    assert "2 socket events not tracked" in findings[-1]["message"]
