"""What a capture file says that cannot be taken literally: frame check sequences at the end of
frames, interfaces of link types we do not read, pcapng blocks whose two lengths disagree,
sub-second timestamps of a second or more, timestamps going backwards; and input paths the user
cannot read. Each is stripped, clamped and counted, or refused in one line, never a silent wrong
number."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from probes.pcap_analysis import analyse_capture, capture_findings
from probes.pcap_reader import CaptureReader

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "pcap"))
import build  # noqa: E402

pytest.importorskip("scapy", reason="scapy not installed (it is in pyproject.toml): run `make setup`")

ETHERNET_BYTES = 14
FCS = b"\xde\xad\xbe\xef"


def frames_and_times(turns: int = 4):
    """(microsecond timestamp, Ethernet frame bytes) with IPv4 total length 0 on data packets
    (as TSO frames captured at the sender): their payload is sized from the wire length, so a
    frame check sequence left in would add 4 bytes to every one."""
    pairs = build.conversation("10.0.0.1", "10.0.0.2", 40000, 5432, [((100,), 400)] * turns)
    result = []
    for frame in build.framed(pairs):
        data = bytearray(bytes(frame))
        if len(data) > 80:
            data[ETHERNET_BYTES + 2:ETHERNET_BYTES + 4] = b"\0\0"
        result.append((int(round(float(frame.time) * 1e6)), bytes(data)))
    return result


def analysed(tmp_path: Path, name: str, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    flows, turns, summary = analyse_capture(CaptureReader(path))
    return flows.to_pylist(), turns, summary


def test_fcs_is_stripped_and_unused_foreign_interfaces_do_not_stop_reading(tmp_path):
    records = frames_and_times()
    plain, _, _ = analysed(tmp_path, "plain.pcap", build.pcap_bytes([(ts, f, len(f)) for ts, f in records]))
    assert plain[0]["client_payload_bytes"] == 400 and plain[0]["server_payload_bytes"] == 1600
    with_fcs = [(ts, frame + FCS, len(frame) + 4) for ts, frame in records]
    # pcap: FCS length present (bit 26), two 16-bit words (top bits), Ethernet.
    flows, _, summary = analysed(tmp_path, "fcs.pcap", build.pcap_bytes(with_fcs, 0x24000001))
    assert flows == plain and summary.clamped["fcs_stripped_packets"] == len(records)
    # Without the FCS bits the same frames are taken as they are (4 more bytes each).
    unflagged, _, _ = analysed(tmp_path, "unflagged.pcap", build.pcap_bytes(with_fcs, 1))
    assert unflagged[0]["bytes"] == plain[0]["bytes"] + 4 * len(records)

    # pcapng: an unused 802.11 interface first, then Ethernet with if_fcslen 32 (bits), and
    # Ethernet with if_fcslen 4 (bytes, as some writers put it); two 802.11 packets on the way.
    interfaces = [(105, b""), (1, build.pcapng_option(13, b"\x20") + build.pcapng_option(0, b"")),
                  (1, build.pcapng_option(13, b"\x04") + build.pcapng_option(0, b""))]
    packets = [(1 + index % 2, ts, frame, wire) for index, (ts, frame, wire) in enumerate(with_fcs)]
    packets[3:3] = [(0, packets[2][1], b"\x08\x00" + b"w" * 30, 32)] * 2
    flows, _, summary = analysed(tmp_path, "fcs.pcapng", build.pcapng_bytes(interfaces, packets))
    assert not summary.partial and flows == plain
    assert summary.not_decoded == {"link type 105 (IEEE 802.11), not supported": 2}
    assert summary.clamped["fcs_stripped_packets"] == len(records)
    # Every interface of a link type we do not read: refused up front.
    from core.errors import BadInput

    foreign = tmp_path / "foreign.pcapng"
    foreign.write_bytes(build.pcapng_bytes([(105, b"")], [(0, 1, b"w" * 30, 30)]))
    with pytest.raises(BadInput, match="unsupported link type 105"):
        CaptureReader(foreign)


def epb_positions(data: bytes) -> list[int]:
    positions, position = [], 0
    while position < len(data):
        block_type, length = struct.unpack_from("<II", data, position)
        if block_type == 6:
            positions.append(position)
        position += length
    return positions


def test_disagreeing_block_lengths_stop_after_the_good_packets(tmp_path, cli_runner):
    packets = [(0, ts, frame, len(frame)) for ts, frame in frames_and_times()]
    data = bytearray(build.pcapng_bytes([(1, b"")], packets))
    positions = epb_positions(bytes(data))
    seventh = positions[6]
    length = struct.unpack_from("<I", data, seventh + 4)[0]
    struct.pack_into("<I", data, seventh + length - 4, length + 8)
    _, _, summary = analysed(tmp_path, "trailer.pcapng", bytes(data))
    assert summary.partial and summary.packets == 6 and summary.error_offset == seventh
    assert f"trailing length {length + 8} disagrees with its leading length {length}" in summary.error
    # The same on a block that is not a packet (an unknown block after the third packet).
    good = build.pcapng_bytes([(1, b"")], packets)
    third_end = epb_positions(good)[3]
    unknown = struct.pack("<II", 0x0BAD, 16) + b"abcd" + struct.pack("<I", 20)
    _, _, summary = analysed(tmp_path, "unknown.pcapng", good[:third_end] + unknown + good[third_end:])
    assert summary.partial and summary.packets == 3 and "trailing length 20" in summary.error
    path = tmp_path / "cli.pcapng"
    path.write_bytes(bytes(data))
    result = cli_runner.invoke(["pcap", str(path), "--out", str(tmp_path / "bundle")])
    assert result.exit_code == 2 and "disagrees" in result.output and "Traceback" not in result.output


def test_invalid_and_backwards_timestamps_are_clamped_and_counted(tmp_path):
    records = [(ts, frame, len(frame)) for ts, frame in frames_and_times()]
    clean, clean_turns, _ = analysed(tmp_path, "clean.pcap", build.pcap_bytes(records))
    # A microsecond fraction of 1.5 s on the last packet: kept within its own second.
    invalid = records[:-1] + [(*records[-1], 1_500_000)]
    flows, _, summary = analysed(tmp_path, "usec.pcap", build.pcap_bytes(invalid))
    assert summary.clamped["timestamps_invalid_subsecond"] == 1
    last_second = records[-1][0] // 1_000_000
    assert flows[0]["last_ts"].timestamp() == pytest.approx(last_second + 0.999999, abs=1e-6)
    # Nanosecond files: 1e9 or more is as invalid.
    nano = bytearray(build.pcap_bytes(records))
    struct.pack_into("<I", nano, 0, 0xA1B23C4D)
    struct.pack_into("<I", nano, 24 + 4, 1_000_000_007)
    _, _, summary = analysed(tmp_path, "nsec.pcap", bytes(nano))
    assert summary.clamped["timestamps_invalid_subsecond"] == 1

    # The second response stamped 3 ms before its request: no negative latency, said.
    responses = [index for index, (_, frame, _) in enumerate(records) if len(frame) > 400]
    request_ts = records[responses[1] - 1][0]
    backwards = list(records)
    backwards[responses[1]] = (request_ts - 3000, *records[responses[1]][1:])
    flows, turns, summary = analysed(tmp_path, "backwards.pcap", build.pcap_bytes(backwards))
    latencies = turns.column("latency_ns").to_pylist()
    assert min(latencies) == 0 and len(latencies) == len(clean_turns) == 4
    assert latencies[0] == clean_turns.column("latency_ns").to_pylist()[0]
    assert summary.clamped["timestamps_backwards"] == 1
    assert summary.clamped["timestamps_backwards_max_ns"] == 3_000_000
    messages = capture_findings(summary, "pcap").column("message").to_pylist()
    assert any("1 packets are stamped earlier" in message and "3.000 ms" in message for message in messages)


UNREADABLE_SCRIPT = """
import json, sys
from click.testing import CliRunner
import click
from agent.cli import main
results = []
for args in json.loads(sys.argv[1]):
    command = click.Command("guardian-agent", callback=lambda: main(args))
    result = CliRunner().invoke(command, [], catch_exceptions=False)
    results.append([result.exit_code, result.stderr])
print(json.dumps(results))
"""


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="SKIPPED: setpriv missing (util-linux)")
def test_unreadable_inputs_are_one_line_exit_2_for_pcap_and_pg_log(tmp_path):
    # Root reads everything: the cases run as nobody, in a directory nobody can reach.
    base = Path(tempfile.mkdtemp(prefix="guardian-unreadable-"))
    try:
        base.chmod(0o755)
        locked = base / "locked"
        locked.mkdir(mode=0o700)
        (locked / "inside.log").write_text("x\n")
        (base / "private.log").write_text("x\n")
        (base / "private.log").chmod(0o600)
        cases = {"locked/inside.log": "cannot be entered", "private.log": "not readable", ".": "is a directory"}
        arguments = [[command, str(base / name), "--out", str(base / "out")]
                     for command in ("pcap", "pg-log") for name in cases]
        project = Path(__file__).resolve().parent.parent
        completed = subprocess.run(
            ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", UNREADABLE_SCRIPT,
             json.dumps(arguments)], capture_output=True, text=True, timeout=60, cwd="/",
            env={**os.environ, "PYTHONPATH": str(project)})
        assert completed.returncode == 0, completed.stderr
        for (exit_code, stderr), args in zip(json.loads(completed.stdout), arguments):
            expected = cases[Path(args[1]).relative_to(base).as_posix()]
            assert exit_code == 2, (args, stderr)
            assert len(stderr.strip().splitlines()) == 1 and expected in stderr, (args, stderr)
            assert "Traceback" not in stderr and "internal error" not in stderr
        assert not (base / "out").exists()
    finally:
        shutil.rmtree(base)
