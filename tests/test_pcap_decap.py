"""TCP inside tunnels and link encapsulations is analysed as its inner flow, and what the
analysis could not decode is counted per reason and said: one capture per class of input,
checked against the same conversations unwrapped and against tshark."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from probes.pcap_analysis import analyse_capture, capture_findings
from probes.pcap_reader import CaptureReader

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "pcap"))
import build  # noqa: E402

pytest.importorskip("scapy", reason="scapy not installed (it is in pyproject.toml): run `make setup`")

KINDS = list(build.ENCAPSULATIONS)
FIRST_PORT = 40000
# tshark 4.0 decodes an MPLS Ethernet pseudowire only with "Decode As": left out of that check.
NOT_DECODED_BY_TSHARK = {"mpls-pseudowire"}
# Columns that depend on the outer headers (frame bytes) or name the tunnel itself.
OUTER_COLUMNS = {"bytes", "encapsulation", "flow"}


def conversation(index: int):
    client, server = ("fd00::1", "fd00::2") if KINDS[index] == "6in4" else ("10.0.0.1", "10.0.0.2")
    return build.conversation(client, server, FIRST_PORT + index, 5432, [((10,), 100)] * (index % 3 + 1),
                              start_s=index * 0.05)


def inner_columns(flow: dict) -> dict:
    return {key: value for key, value in flow.items() if key not in OUTER_COLUMNS}


def tshark_conversations(capture: Path) -> dict[str, tuple[int, int]]:
    """client port -> (packets, bytes) of every TCP conversation tshark finds."""
    output = subprocess.run(["tshark", "-r", str(capture), "-q", "-z", "conv,tcp"], capture_output=True,
                            text=True, timeout=60, check=True).stdout
    found = {}
    for line in output.splitlines():
        match = re.match(r"^(\S+)\s+<->\s+(\S+)\s+(?:\d+\s+\S+\s+\S+\s+){2}(\d+)\s+(\d+)\s*(\S+)", line)
        if match:
            amount, unit = int(match.group(4)), match.group(5)
            if unit.lower().startswith("kb"):
                amount = None  # rounded by tshark: compare packets only
            ports = [int(endpoint.rsplit(":", 1)[1]) for endpoint in match.group(1, 2)]
            found[str(min(ports, key=lambda port: abs(port - FIRST_PORT)))] = (int(match.group(3)), amount)
    return found


def test_tunnelled_tcp_is_its_inner_flow_in_every_encapsulation(tmp_path):
    plain, wrapped = [], []
    for index, kind in enumerate(KINDS):
        pairs = conversation(index)
        plain.append(pairs)
        wrapped.append(list(zip([time for time, _ in pairs], build.encapsulated(pairs, kind))))
    plain_path = build.write_pcap(tmp_path / "plain.pcap", build.framed(build.merged(*plain)))
    frames = [frame for _, frame in sorted((pair for kind in wrapped for pair in kind), key=lambda p: p[0])]
    tunnels_path = build.write_pcap(tmp_path / "tunnels.pcap", frames)
    plain_flows, plain_turns, _ = analyse_capture(CaptureReader(plain_path))
    flows, turns, summary = analyse_capture(CaptureReader(tunnels_path))

    by_port = {flow["client_port"]: flow for flow in flows.to_pylist()}
    plain_by_port = {flow["client_port"]: flow for flow in plain_flows.to_pylist()}
    assert sorted(by_port) == sorted(plain_by_port) == [FIRST_PORT + i for i in range(len(KINDS))]
    for index, kind in enumerate(KINDS):
        flow = by_port[FIRST_PORT + index]
        assert inner_columns(flow) == inner_columns(plain_by_port[FIRST_PORT + index]), kind
        assert flow["encapsulation"] == build.ENCAPSULATIONS[kind], kind
        assert flow["bytes"] > plain_by_port[FIRST_PORT + index]["bytes"], kind
    assert turns.column("latency_ns").to_pylist() == plain_turns.column("latency_ns").to_pylist()
    assert summary.not_decoded == {} and summary.not_tcp == {}
    assert summary.tcp_packets == summary.packets
    assert sum(summary.encapsulations.values()) == summary.packets
    assert set(summary.encapsulations) == set(build.ENCAPSULATIONS.values())
    assert plain_flows.column("encapsulation").null_count == plain_flows.num_rows

    if shutil.which("tshark"):  # an independent decoder: same conversations, packets and bytes
        theirs = tshark_conversations(tunnels_path)
        ours = {str(port): (flow["packets"], flow["bytes"]) for port, flow in by_port.items()
                if KINDS[port - FIRST_PORT] not in NOT_DECODED_BY_TSHARK}
        assert set(theirs) == set(ours), (theirs, ours)
        for port, (packets, amount) in theirs.items():
            assert packets == ours[port][0], (port, theirs[port], ours[port])
            assert amount is None or amount == ours[port][1], (port, theirs[port], ours[port])


def test_what_was_not_decoded_is_counted_by_reason_and_said(tmp_path, cli_runner):
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import ARP, Ether
    from scapy.packet import Raw

    macs = {"src": "02:00:00:00:00:01", "dst": "02:00:00:00:00:02"}
    frames = build.framed(conversation(0))  # 9 TCP packets

    def add(frame, count: int):
        for _ in range(count):
            copy = frame.copy()
            copy.time = build.BASE_TIME_S + 1
            frames.append(copy)

    add(Ether(**macs) / IP(src="192.0.2.1", dst="192.0.2.2", proto=50) / Raw(b"\x00" * 64), 12)  # ESP
    add(Ether(**macs) / ARP(), 2)
    add(Ether(**macs) / IP(src="192.0.2.1", dst="192.0.2.2") / UDP(sport=1, dport=53) / Raw(b"q"), 3)
    add(Ether(**macs) / IP(src="192.0.2.1", dst="192.0.2.2", proto=47) / Raw(b"\x00\x00\x88\x0b" + b"p" * 20), 2)
    add(Ether(**macs) / IP(src="10.0.0.1", dst="10.0.0.2", proto=6, frag=100) / Raw(b"f" * 40), 4)
    add(Ether(type=0x8847, **macs) / Raw(build._mpls_label(16, True) + b"\x9f" + b"m" * 40), 1)
    add(Ether(type=0x88E5, **macs) / Raw(b"s" * 40), 1)  # MACsec: encrypted
    # VXLAN cut by the snap length inside the inner Ethernet header
    vxlan = build.encapsulated(conversation(0)[:1], "vxlan")[0]
    add(Ether(bytes(vxlan)[:14 + 20 + 8 + 8 + 10]), 1)
    path = build.write_pcap(tmp_path / "mixed.pcap", frames)

    flows, _, summary = analyse_capture(CaptureReader(path))
    assert flows.num_rows == 1 and summary.tcp_packets == 9 and summary.packets == 35
    assert summary.not_tcp == {"ethertype 0x0806 (ARP)": 2, "IP protocol 17 (UDP)": 3}
    assert summary.not_decoded == {
        "IP protocol 50 (ESP)": 12,
        "GRE carrying protocol 0x880b": 2,
        "IP fragments of TCP after the first (not reassembled)": 4,
        "MPLS payload starting with nibble 9 (not IP)": 1,
        "ethertype 0x88e5 (MACsec)": 1,
        "headers cut by the snap length inside vxlan": 1,
    }
    assert sum(summary.not_tcp.values()) + sum(summary.not_decoded.values()) == summary.other_packets == 26
    messages = capture_findings(summary, "pcap").column("message").to_pylist()
    assert "12 packets (34%) not decoded: IP protocol 50 (ESP)" in messages
    assert not any("ARP" in message or "UDP" in message for message in messages)

    result = cli_runner.invoke(["pcap", str(path), "--out", str(tmp_path / "bundle")])
    assert result.exit_code == 0, result.output
    assert "35 packets (9 TCP, 21 not decoded: by reason in the manifest)" in result.output
    from reports.bundle import Bundle

    source = Bundle(tmp_path / "bundle").manifest["source"]
    assert source["not_decoded"] == summary.not_decoded and source["not_tcp"] == summary.not_tcp
