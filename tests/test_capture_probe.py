"""capture probe: pure pieces (tcpdump statistics, ring merge) and its availability checks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from core.errors import BadInput, Unavailable
from probes.base import ProbeConfig
from probes.capture import (HEADERS_SNAPLEN_BYTES, CaptureProbe, capture_findings, merge_ring, pick_timestamp_type,
                            tcpdump_command, tcpdump_counters)
from probes.pcap_reader import CaptureReader

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "pcap"))
import build  # noqa: E402

TCPDUMP_EXIT = """tcpdump: listening on lo, link-type EN10MB (Ethernet), snapshot length 128 bytes
1187 packets captured
2374 packets received by filter
13 packets dropped by kernel
"""


def test_tcpdump_counters_are_parsed_and_missing_ones_are_unknown():
    counters = tcpdump_counters(TCPDUMP_EXIT)
    assert counters == {"packets_captured": 1187, "packets_received_by_filter": 2374,
                        "packets_dropped_by_kernel": 13, "packets_dropped_by_interface": -1}
    assert tcpdump_counters("tcpdump: killed")["packets_dropped_by_kernel"] == -1


def test_timestamp_type_prefers_adapter_then_host():
    listing = "Time stamp types for eth0 (use option -j to set):\n  host (Host)\n  adapter (Adapter)\n"
    assert pick_timestamp_type(listing) == "adapter"
    assert pick_timestamp_type("Time stamp types for lo (use option -j to set):\n  host (Host)\n") == "host"
    assert pick_timestamp_type("tcpdump: lo: no time stamp types") is None


def test_command_is_headers_only_nanosecond_and_bounded(tmp_path):
    command = tcpdump_command("tcpdump", "lo", "tcp port 5432", HEADERS_SNAPLEN_BYTES, tmp_path / "ring.pcap",
                              32, "host")
    assert command[command.index("-s") + 1] == str(HEADERS_SNAPLEN_BYTES)
    assert "--time-stamp-precision=nano" in command
    assert command[command.index("-C") + 1] == "32" and command[command.index("-W") + 1] == "8"
    assert command[-1] == "tcp port 5432" and command[command.index("-j") + 1] == "host"


def test_merge_ring_keeps_the_newest_packets_oldest_file_first(tmp_path):
    files = []
    for index in range(3):
        packets = build.conversation("10.0.0.1", "10.0.0.2", 40000 + index, 5432, [((10,), 100)] * 2,
                                     start_s=index * 1.0)
        files.append(build.write_pcap(tmp_path / f"ring.pcap{index}", build.framed(packets), nano=True))
    per_file = len(build.conversation("10.0.0.1", "10.0.0.2", 1, 2, [((10,), 100)] * 2))
    # tcpdump stopped mid-write: a partial record at the end of the newest file is dropped
    newest = files[2].read_bytes()
    files[2].write_bytes(newest + newest[24:40])
    target = tmp_path / "capture.pcap"
    keep = per_file * 2 + 3
    written, size, discarded = merge_ring([files[2], files[0], files[1]], target, keep)
    assert (written, discarded) == (keep, per_file * 3 - keep)
    assert size == target.stat().st_size
    times = []
    for block in CaptureReader(target).blocks():
        times.extend(block.ts_ns.tolist())
    assert len(times) == keep and times == sorted(times)
    second = 1_000_000_000
    base = int(build.BASE_TIME_S) * second
    # the 3 newest packets of the oldest file, then the two newer files whole
    assert all(base <= t < base + second for t in times[:3])
    assert all(t >= base + second for t in times[3:])
    assert times[-1] >= base + 2 * second


def test_merge_of_an_empty_ring_is_a_valid_empty_capture(tmp_path):
    target = tmp_path / "capture.pcap"
    assert merge_ring([], target, 100) == (0, 24, 0)
    assert sum(len(block) for block in CaptureReader(target).blocks()) == 0


def test_check_names_what_is_missing():
    with pytest.raises(Unavailable, match="--iface"):
        CaptureProbe(ProbeConfig(options={})).check()
    with pytest.raises(BadInput, match="no such interface"):
        CaptureProbe(ProbeConfig(options={"iface": "no-such-if0"})).check()


def test_kernel_drops_and_ring_discards_become_findings():
    row = {"iface": "eth0", "packets_dropped_by_kernel": 13, "packets_dropped_by_interface": -1,
           "packets_discarded_by_ring": 0, "packets_in_file": 1000}
    findings = capture_findings(row)
    assert [(f["severity"], f["subject"]) for f in findings] == [("warning", "capture on eth0")]
    assert findings[0]["message"].startswith("13 packets dropped")
    clean = dict(row, packets_dropped_by_kernel=0)
    assert capture_findings(clean) == []
    wrapped = dict(clean, packets_discarded_by_ring=500)
    assert "500 older ones were discarded" in capture_findings(wrapped)[0]["message"]
