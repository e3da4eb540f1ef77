"""Lengths a capture cannot mean: a bogus IP length beyond the frame, an original length of
0xFFFFFFFF, IPv6 BIG TCP's payload length 0. Each is clamped to what was on the wire and
counted, never turned into phantom bytes or retransmissions."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from probes.pcap_analysis import analyse_capture, capture_findings
from probes.pcap_reader import CaptureReader

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "pcap"))
import build  # noqa: E402

pytest.importorskip("scapy", reason="scapy not installed (it is in pyproject.toml): run `make setup`")

PCAP_HEADER_BYTES = 24
RECORD_HEADER_BYTES = 16
ETHERNET_BYTES = 14


def conversation():
    return build.conversation("10.0.0.1", "10.0.0.2", 40000, 5432, [((100,), 400)] * 6)


def records(data: bytes):
    """(offset of the record header, captured length) of every record of a little-endian pcap."""
    offset = PCAP_HEADER_BYTES
    while offset < len(data):
        captured = struct.unpack_from("<I", data, offset + 8)[0]
        yield offset, captured
        offset += RECORD_HEADER_BYTES + captured


def analysed(path: Path):
    flows, turns, summary = analyse_capture(CaptureReader(path))
    return flows.to_pylist(), turns.num_rows, summary


def data_records(data: bytes):
    return [(offset, captured) for offset, captured in records(data) if captured > 100]


def test_bogus_ip_length_and_impossible_original_length_are_clamped(tmp_path):
    clean_path = build.write_pcap(tmp_path / "clean.pcap", build.framed(conversation()))
    clean_flows, clean_turns, _ = analysed(clean_path)
    data = bytearray(clean_path.read_bytes())
    bogus = data_records(data)
    # Three packets say 60,000 IP bytes, one record claims 4 GiB on the wire.
    for offset, _ in bogus[:3]:
        struct.pack_into(">H", data, offset + RECORD_HEADER_BYTES + ETHERNET_BYTES + 2, 60000)
    struct.pack_into("<I", data, bogus[4][0] + 12, 0xFFFFFFFF)
    broken_path = tmp_path / "broken.pcap"
    broken_path.write_bytes(bytes(data))
    flows, turns, summary = analysed(broken_path)
    assert flows == clean_flows and turns == clean_turns
    assert flows[0]["retransmits"] == 0
    assert summary.ip_lengths_beyond_wire == 3 and summary.impossible_wire_lengths == 1
    messages = capture_findings(summary, "pcap").column("message").to_pylist()
    assert len(messages) == 2 and "4 GiB" not in " ".join(messages)


def test_ipv6_big_tcp_payload_length_zero_counts_the_wire_bytes(tmp_path):
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    packets = build.conversation("fd00::1", "fd00::2", 40000, 5432, [((100,), 400)] * 2)
    normal = build.framed(packets)
    # The same frames with every IPv6 payload length set to 0 (as Linux BIG TCP GSO frames).
    zeroed = []
    for frame in normal:
        ip_bytes = bytearray(bytes(frame)[ETHERNET_BYTES:])
        ip_bytes[4:6] = b"\0\0"
        copy = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02", type=0x86DD) / Raw(bytes(ip_bytes))
        copy.time = frame.time
        zeroed.append(copy)
    normal_flows, _, _ = analysed(build.write_pcap(tmp_path / "v6.pcap", normal))
    jumbo_flows, _, _ = analysed(build.write_pcap(tmp_path / "big.pcap", zeroed))
    assert normal_flows[0]["client_payload_bytes"] == 200
    assert jumbo_flows == normal_flows
