"""pcap/pcapng reader and flow/turn analysis on hand-built captures (scapy builds them)."""

from __future__ import annotations

import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from core.errors import BadInput
from probes.pcap_analysis import MAX_FLOW_FINDINGS, analyse_capture, flows_findings
from probes.pcap_reader import CaptureCorrupt, CaptureReader

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "pcap"))
import build  # noqa: E402

pytest.importorskip("scapy", reason="scapy not installed (it is in pyproject.toml): run `make setup`")


def analyse(path: Path, block_bytes: int | None = None):
    reader = CaptureReader(path, **({"block_bytes": block_bytes} if block_bytes else {}))
    flows, turns, summary = analyse_capture(reader)
    return flows.to_pydict(), turns.to_pydict(), summary


def two_flows():
    """An IPv4 database flow with 5 turns (latency 2 ms) and an IPv6 flow with 3 (latency 3 ms)."""
    database = build.conversation("10.0.0.1", "10.0.0.2", 40000, 5432, [((10,), 100)] * 5)
    web = build.conversation("fd00::1", "fd00::2", 40001, 8080, [((20,), 300)] * 3, start_s=0.004,
                             latency_s=0.003)
    return build.merged(database, web)


@pytest.mark.parametrize("link", ["ether", "vlan", "sll", "sll2", "raw", "null"])
def test_link_types_ipv4_and_ipv6_give_flows_and_turns(tmp_path, link):
    path = build.write_pcap(tmp_path / f"{link}.pcap", build.framed(two_flows(), link), link=link)
    flows, turns, summary = analyse(path)
    assert summary.packets == summary.tcp_packets == len(two_flows())
    assert flows["client"] == ["10.0.0.1:40000", "[fd00::1]:40001"]
    assert flows["server"] == ["10.0.0.2:5432", "[fd00::2]:8080"]
    assert flows["ip_version"] == [4, 6]
    assert flows["turns"] == [5, 3]
    assert flows["handshake_rtt_ns"] == [100_000, 100_000]
    assert flows["retransmits"] == [0, 0]
    assert flows["client_payload_bytes"] == [50, 60]
    assert flows["server_payload_bytes"] == [500, 900]
    latency = dict(zip(turns["flow"], turns["latency_ns"]))
    assert abs(latency[0] - 2_000_000) < 1000 and abs(latency[1] - 3_000_000) < 1000
    assert turns["request_bytes"][:5] == [10] * 5 and turns["response_bytes"][:5] == [100] * 5


def test_pcapng_and_nanosecond_and_big_endian_agree_with_pcap(tmp_path):
    frames = build.framed(two_flows())
    reference = analyse(build.write_pcap(tmp_path / "a.pcap", frames))
    for path in (build.write_pcapng(tmp_path / "a.pcapng", frames),
                 build.write_pcap(tmp_path / "nano.pcap", frames, nano=True),
                 build.write_pcap(tmp_path / "big.pcap", frames, nano=True, endianness=">")):
        flows, turns, _ = analyse(path)
        assert flows["packets"] == reference[0]["packets"]
        assert flows["bytes"] == reference[0]["bytes"]
        assert flows["turns"] == reference[0]["turns"]
        # microsecond pcap vs nanosecond formats: same instants within scapy's float rounding
        assert np.allclose(turns["latency_ns"], reference[1]["latency_ns"], atol=1000)


def test_retransmitted_request_is_counted_and_does_not_open_a_turn(tmp_path):
    packets = build.conversation("10.0.0.1", "10.0.0.2", 40000, 5432, [((10,), 100)] * 4,
                                 retransmit_turns=(1, 3))
    flows, turns, _ = analyse(build.write_pcap(tmp_path / "r.pcap", build.framed(packets)))
    assert flows["retransmits"] == [2]
    assert flows["client_retransmits"] == [2] and flows["server_retransmits"] == [0]
    assert flows["turns"] == [4]
    assert turns["request_bytes"] == [10, 10, 10, 10]  # the copy does not add bytes


def test_pipelined_requests_share_one_turn_timed_from_the_first(tmp_path):
    packets = build.conversation("10.0.0.1", "10.0.0.2", 40000, 6379,
                                 [((10, 20, 30), 500), ((5,), 50)], latency_s=0.004)
    flows, turns, _ = analyse(build.write_pcap(tmp_path / "p.pcap", build.framed(packets)))
    assert flows["turns"] == [2]
    assert turns["request_bytes"] == [60, 5]
    assert turns["request_packets"] == [3, 1]
    assert turns["latency_ns"] == [4_000_000, 4_000_000]


def test_blocks_smaller_than_the_file_give_the_same_answer(tmp_path):
    """Records cut by block edges are carried over; many flows spread over many blocks."""
    conversations = [build.conversation(f"10.0.{i // 250}.{i % 250 + 1}", "10.1.0.1", 30000 + i, 5432,
                                        [((40,), 400)] * 3, start_s=i * 0.0003) for i in range(160)]
    frames = build.framed(build.merged(*conversations))
    path = build.write_pcap(tmp_path / "many.pcap", frames)
    assert path.stat().st_size > 2 * (1 << 16)
    whole = analyse(path)
    small = analyse(path, block_bytes=1 << 16)
    assert small[0] == whole[0]
    assert small[1] == whole[1]
    assert len(whole[0]["flow"]) == 160 and set(whole[0]["turns"]) == {3}
    pcapng = build.write_pcapng(tmp_path / "many.pcapng", frames)
    assert analyse(pcapng, block_bytes=1 << 16)[0] == whole[0]


def test_flow_seen_mid_connection_takes_the_higher_port_as_client(tmp_path):
    packets = build.conversation("10.0.0.1", "10.0.0.2", 51000, 443, [((10,), 100)] * 2)[3:]  # no handshake
    flows, _, _ = analyse(build.write_pcap(tmp_path / "mid.pcap", build.framed(packets)))
    assert flows["client"] == ["10.0.0.1:51000"]
    assert flows["handshake_rtt_ns"] == [None]



def reused_tuple(connections: int) -> list:
    """`connections` connections one after another on the same 4-tuple (each its own ISN), the
    way a client reusing an ephemeral port talks to the same server; connection i has i % 5 + 1
    turns."""
    return build.merged(*[build.conversation("10.0.0.1", "10.0.0.2", 40000, 5432, [((10,), 100)] * (i % 5 + 1),
                                             start_s=i * 0.03, client_isn=1000 + 7919 * i)
                          for i in range(connections)])


def test_a_reused_tuple_is_one_flow_per_connection(tmp_path):
    flows, turns, _ = analyse(build.write_pcap(tmp_path / "reuse.pcap", build.framed(reused_tuple(2))))
    assert flows["client"] == ["10.0.0.1:40000"] * 2 and flows["server"] == ["10.0.0.2:5432"] * 2
    assert flows["turns"] == [1, 2]
    assert flows["handshake_rtt_ns"] == [100_000, 100_000]  # each connection's own handshake
    assert flows["client_payload_bytes"] == [10, 20] and flows["retransmits"] == [0, 0]
    assert sorted(set(turns["flow"])) == flows["flow"]


def test_reuse_across_blocks_gives_the_same_flows(tmp_path):
    path = build.write_pcap(tmp_path / "reuse-many.pcap", build.framed(reused_tuple(250)))
    assert path.stat().st_size > 2 * (1 << 16)
    whole = analyse(path)
    assert whole[0]["turns"] == [i % 5 + 1 for i in range(250)] and set(whole[0]["retransmits"]) == {0}
    small = analyse(path, block_bytes=1 << 16)
    assert small[0] == whole[0] and small[1] == whole[1]


def test_a_retransmitted_syn_does_not_start_a_connection(tmp_path):
    packets = build.conversation("10.0.0.1", "10.0.0.2", 40000, 5432, [((10,), 100)] * 2)
    syn_time, syn = packets[0]
    packets.insert(1, (syn_time + 0.00005, syn.copy()))  # the same SYN again before the SYN-ACK
    flows, _, _ = analyse(build.write_pcap(tmp_path / "resyn.pcap", build.framed(packets)))
    assert flows["turns"] == [2] and flows["packets"] == [len(packets)]


def test_a_connection_seen_mid_way_then_a_new_one_on_its_tuple(tmp_path):
    first = build.conversation("10.0.0.1", "10.0.0.2", 40000, 5432, [((10,), 100)] * 2)[3:]  # no handshake
    second = build.conversation("10.0.0.1", "10.0.0.2", 40000, 5432, [((10,), 100)] * 3, start_s=0.05,
                                client_isn=9_000_000)
    flows, _, _ = analyse(build.write_pcap(tmp_path / "mid-then-new.pcap", build.framed(build.merged(first, second))))
    assert flows["turns"] == [2, 3]
    assert flows["handshake_rtt_ns"] == [None, 100_000]

def test_truncated_file_analyses_what_came_before_and_names_the_offset(tmp_path):
    path = build.write_pcap(tmp_path / "t.pcap", build.framed(two_flows()))
    data = path.read_bytes()
    path.write_bytes(data[:-30])  # cut inside the last record
    reader = CaptureReader(path)
    flows, _, summary = analyse_capture(reader)
    assert summary.partial
    last_record = len(data) - (16 + len(bytes(build.framed(two_flows())[-1])))
    assert summary.error_offset == last_record
    assert f"byte offset {last_record}" in summary.error
    assert sum(flows.column("packets").to_pylist()) == len(two_flows()) - 1


def test_corrupt_record_length_is_named(tmp_path):
    path = build.write_pcap(tmp_path / "c.pcap", build.framed(two_flows()))
    data = bytearray(path.read_bytes())
    first_length = struct.unpack_from("<I", data, 24 + 8)[0]
    second = 24 + 16 + first_length
    struct.pack_into("<I", data, second + 8, 0x7FFFFFFF)
    path.write_bytes(bytes(data))
    with pytest.raises(CaptureCorrupt) as raised:
        list(CaptureReader(path).blocks())
    assert raised.value.offset == second
    _, _, summary = analyse(path)
    assert summary.partial and summary.packets == 1


def test_truncated_pcapng(tmp_path):
    path = build.write_pcapng(tmp_path / "t.pcapng", build.framed(two_flows()))
    path.write_bytes(path.read_bytes()[:-10])
    _, _, summary = analyse(path)
    assert summary.partial and "truncated block at byte offset" in summary.error
    assert summary.packets == len(two_flows()) - 1


def test_unsupported_link_type_and_bad_magic_are_named(tmp_path):
    wifi = tmp_path / "wifi.pcap"
    wifi.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 105))
    with pytest.raises(BadInput, match=r"unsupported link type 105 \(IEEE 802.11\)"):
        CaptureReader(wifi)
    text = tmp_path / "notes.txt"
    text.write_text("hello world, not a capture")
    with pytest.raises(BadInput, match="not a pcap or pcapng file"):
        CaptureReader(text)
    empty = tmp_path / "empty.pcap"
    empty.write_bytes(b"")
    with pytest.raises(BadInput, match="empty"):
        CaptureReader(empty)


def test_non_tcp_packets_are_counted_not_analysed(tmp_path):
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import ARP

    pairs = two_flows() + [(0.0001, IP(src="10.0.0.9", dst="10.0.0.8") / UDP(sport=53, dport=53)),
                           (0.0002, ARP())]
    pairs.sort(key=lambda item: item[0])
    _, _, summary = analyse(build.write_pcap(tmp_path / "mixed.pcap", build.framed(pairs)))
    assert summary.other_packets == 2
    assert summary.tcp_packets == len(two_flows())


def test_findings_name_the_worst_flows_and_summarise_the_rest():
    import pyarrow as pa

    count = MAX_FLOW_FINDINGS + 5
    flows = pa.table({
        "client": [f"10.0.0.1:{40000 + i}" for i in range(count)], "server": ["10.0.0.2:5432"] * count,
        "client_packets": [100] * count, "server_packets": [100] * count,
        "retransmits": list(range(1, count + 1)), "resets": [0] * (count - 1) + [1],
    })
    findings = flows_findings(flows, "pcap").to_pylist()
    retransmit_rows = [row for row in findings if "retransmitted" in row["message"]]
    assert len(retransmit_rows) == MAX_FLOW_FINDINGS
    assert retransmit_rows[0]["subject"] == f"10.0.0.1:{40000 + count - 1} → 10.0.0.2:5432"
    assert retransmit_rows[0]["severity"] == "warning"  # 25 of 200 packets
    assert any(row["subject"] == "5 more flows" for row in findings)
    assert sum("reset" in row["message"] for row in findings) == 1


def test_ipv6_extension_headers_are_skipped(tmp_path):
    from scapy.layers.inet import TCP
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop

    pairs = []
    for time_s, packet in two_flows():
        if packet.version == 6:
            packet = (IPv6(src=packet.src, dst=packet.dst) / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt()
                      / packet[TCP])
        pairs.append((time_s, packet))
    flows, turns, summary = analyse(build.write_pcap(tmp_path / "ext.pcap", build.framed(pairs)))
    assert summary.other_packets == 0
    assert flows["turns"] == [5, 3] and flows["server_payload_bytes"] == [500, 900]


def test_turns_spilled_to_disk_match_the_in_memory_ones(tmp_path):
    conversations = [build.conversation(f"10.0.0.{i + 1}", "10.1.0.1", 30000 + i, 5432, [((40,), 400)] * 6,
                                        start_s=i * 0.0003) for i in range(20)]
    path = build.write_pcap(tmp_path / "s.pcap", build.framed(build.merged(*conversations)))
    flows, turns, _ = analyse_capture(CaptureReader(path, block_bytes=1 << 16))
    spill_dir = tmp_path / "spill"
    spilled_flows, spilled_turns, _ = analyse_capture(CaptureReader(path, block_bytes=1 << 16),
                                                      spill_dir=spill_dir, spill_rows=7)
    assert spilled_flows.equals(flows)
    assert spilled_turns.num_rows == turns.num_rows == 120
    # same rows, in completion order instead of flow order
    assert spilled_turns.sort_by([("flow", "ascending"), ("ts_ns", "ascending")]).equals(turns)
    assert list(spill_dir.iterdir()) == []  # the spill file is unlinked once mapped


def test_pcapng_link_types_are_checked_up_front_and_mid_file(tmp_path):
    from scapy.layers.dot11 import Dot11

    wifi_frames = [Dot11()]
    wifi_frames[0].time = build.BASE_TIME_S
    wifi = build.write_pcapng(tmp_path / "wifi.pcapng", wifi_frames)
    with pytest.raises(BadInput, match=r"unsupported link type 105"):
        CaptureReader(wifi)
    # an Ethernet section followed by an 802.11 section: the first is analysed, the 802.11
    # packet is skipped and counted (not a reason to stop reading)
    ethernet = build.write_pcapng(tmp_path / "eth.pcapng", build.framed(two_flows()))
    mixed = tmp_path / "mixed.pcapng"
    mixed.write_bytes(ethernet.read_bytes() + wifi.read_bytes())
    flows, _, summary = analyse(mixed)
    assert not summary.partial and summary.error == ""
    assert summary.not_decoded == {"link type 105 (IEEE 802.11), not supported": 1}
    assert flows["turns"] == [5, 3]
