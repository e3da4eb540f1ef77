"""`guardian-agent pcap FILE --out DIR` end to end (real console entry point in a subprocess)."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from reports.bundle import Bundle
from tests.conftest import run_agent

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "pcap"))
import build  # noqa: E402

pytest.importorskip("scapy", reason="scapy not installed (it is in pyproject.toml): run `make setup`")


def mixed_capture(tmp_path: Path) -> Path:
    conversations = [
        build.conversation("10.0.0.1", "10.0.0.2", 40000 + i, 5432, [((10,), 100)] * (i + 1),
                           start_s=i * 0.01, retransmit_turns=(0,) if i == 2 else ())
        for i in range(4)
    ]
    conversations.append(build.conversation("fd00::1", "fd00::2", 41000, 9100, [((30,), 40)] * 3,
                                           start_s=0.05))
    return build.write_pcap(tmp_path / "mixed.pcap", build.framed(build.merged(*conversations)))


def test_pcap_command_writes_a_bundle(tmp_path):
    capture = mixed_capture(tmp_path)
    result = run_agent("pcap", str(capture), "--out", str(tmp_path / "bundle"))
    assert result.returncode == 0, result.stderr
    assert "5 TCP flows, 13 request→response turns" in result.stdout
    bundle = Bundle(tmp_path / "bundle")
    assert {"flows", "turns", "findings"} <= set(bundle.table_names())
    flows = bundle.table("flows").to_pydict()
    assert flows["turns"] == [1, 2, 3, 4, 3]
    assert flows["retransmits"] == [0, 0, 1, 0, 0]
    assert bundle.manifest["partial"] is False
    assert bundle.manifest["source"]["packets"] == bundle.manifest["source"]["tcp_packets"]
    findings = bundle.table("findings").to_pydict()
    assert findings["subject"] == ["10.0.0.1:40002 → 10.0.0.2:5432"]


def test_truncated_capture_writes_partial_bundle_and_exits_2(tmp_path):
    capture = mixed_capture(tmp_path)
    data = capture.read_bytes()
    capture.write_bytes(data[:-7])
    result = run_agent("pcap", str(capture), "--out", str(tmp_path / "bundle"))
    assert result.returncode == 2
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 1 and "truncated record at byte offset" in errors[0], result.stderr
    offset = int(re.search(r"byte offset (\d+)", errors[0]).group(1))
    assert 24 < offset < len(data)
    bundle = Bundle(tmp_path / "bundle")  # complete manifest, flagged partial
    assert bundle.manifest["partial"] is True
    assert bundle.probe("pcap")["status"] == "failed"
    assert bundle.table("flows").num_rows == 5


def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path):
    wifi = tmp_path / "wifi.pcap"
    wifi.write_bytes(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 127))
    for args in (["pcap", str(wifi), "--out", str(tmp_path / "a")],
                 ["pcap", str(tmp_path / "missing.pcap"), "--out", str(tmp_path / "b")]):
        result = run_agent(*args)
        assert result.returncode == 2
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr
    assert "unsupported link type 127" in run_agent("pcap", str(wifi), "--out", str(tmp_path / "c")).stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "x").write_text("x")
    result = run_agent("pcap", str(mixed_capture(tmp_path)), "--out", str(occupied))
    assert result.returncode == 2 and "not empty" in result.stderr


def tshark_conversations(capture: Path) -> dict[tuple[str, str], int]:
    output = subprocess.run(["tshark", "-r", str(capture), "-q", "-z", "conv,tcp"], capture_output=True,
                            text=True, timeout=60, check=True).stdout
    conversations = {}
    for line in output.splitlines():
        match = re.match(r"^(\S+)\s+<->\s+(\S+)\s+\d+\s+\S+\s+\S+\s+\d+\s+\S+\s+\S+\s+(\d+)\s", line)
        if match:
            conversations[tuple(sorted((match.group(1), match.group(2))))] = int(match.group(3))
    return conversations


@pytest.mark.skipif(shutil.which("tshark") is None, reason="TSHARK NOT INSTALLED: agreement with tshark not checked")
def test_flow_and_packet_counts_agree_with_tshark(tmp_path):
    capture = mixed_capture(tmp_path)
    result = run_agent("pcap", str(capture), "--out", str(tmp_path / "bundle"))
    assert result.returncode == 0, result.stderr
    flows = Bundle(tmp_path / "bundle").table("flows").to_pydict()

    def plain(endpoint: str) -> str:  # tshark writes IPv6 endpoints without brackets
        return endpoint.replace("[", "").replace("]", "")

    ours = {tuple(sorted((plain(c), plain(s)))): packets
            for c, s, packets in zip(flows["client"], flows["server"], flows["packets"])}
    assert ours == tshark_conversations(capture)
