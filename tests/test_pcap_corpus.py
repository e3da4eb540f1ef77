"""A corpus of captures the tests generate (truncated, bit-flipped, odd link types, pcapng with
unknown blocks, a FIFO): the pcap command never shows a traceback or an internal error, and
exits 0 (read) or 2 (bad input, one line) — never 1."""

from __future__ import annotations

import os
import random
import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fixtures" / "pcap"))
import build  # noqa: E402

pytest.importorskip("scapy", reason="scapy not installed (it is in pyproject.toml): run `make setup`")


def base_captures(tmp_path: Path) -> dict[str, bytes]:
    packets = build.merged(
        build.conversation("10.0.0.1", "10.0.0.2", 40000, 5432, [((10,), 100)] * 4),
        build.conversation("fd00::1", "fd00::2", 40001, 8080, [((20,), 300)] * 3, start_s=0.004))
    captures = {}
    for link in ("ether", "sll", "raw"):
        captures[f"{link}.pcap"] = build.write_pcap(tmp_path / f"base-{link}.pcap", build.framed(packets, link), link).read_bytes()
    captures["ng.pcapng"] = build.write_pcapng(tmp_path / "base.pcapng", build.framed(packets)).read_bytes()
    # Every encapsulation pcap_decap unwraps, one flow each: cut and bit-flipped below too.
    tunnelled = [frame for index, kind in enumerate(build.ENCAPSULATIONS) for frame in build.encapsulated(
        build.conversation("10.0.0.1", "10.0.0.2", 41000 + index, 5432, [((10,), 100)], start_s=index * 0.01),
        kind)]
    tunnelled.sort(key=lambda frame: float(frame.time))
    captures["tunnels.pcap"] = build.write_pcap(tmp_path / "tunnels.pcap", tunnelled).read_bytes()
    records = [(int(float(frame.time) * 1e6), bytes(frame), len(frame)) for frame in build.framed(packets)]
    # Frames with a frame check sequence, said in the pcap header; a pcapng with an unused
    # 802.11 interface before the Ethernet one (if_fcslen 32 bits).
    with_fcs = [(ts, frame + b"\xfc\x5c\xfc\x5c", wire + 4) for ts, frame, wire in records]
    captures["fcs.pcap"] = build.pcap_bytes(with_fcs, 0x24000001)
    fcs_option = build.pcapng_option(13, b"\x20") + build.pcapng_option(0, b"")
    captures["interfaces.pcapng"] = build.pcapng_bytes([(105, b""), (1, fcs_option)],
                                                       [(1, *record) for record in with_fcs])
    return captures


def variants(captures: dict[str, bytes]):
    rng = random.Random(15)
    for name, data in captures.items():
        yield f"{name}-whole", data
        for cut in (10, 24, 40, len(data) // 2, len(data) - 7):
            yield f"{name}-cut{cut}", data[:cut]
        for flip in range(6):
            flipped = bytearray(data)
            for _ in range(1 + flip):
                position = rng.randrange(len(flipped))
                flipped[position] ^= 1 << rng.randrange(8)
            yield f"{name}-flip{flip}", bytes(flipped)
    pcap = captures["ether.pcap"]
    for linktype in (105, 127, 9, 147, 65000):
        yield f"linktype{linktype}", pcap[:20] + struct.pack("<I", linktype) + pcap[24:]
    ng = captures["ng.pcapng"]
    # An unknown block type (0x0BAD) after the section and interface blocks, then the packets.
    section_length = struct.unpack_from("<I", ng, 4)[0]
    idb_length = struct.unpack_from("<I", ng, section_length + 4)[0]
    head = section_length + idb_length
    unknown = struct.pack("<II", 0x0BAD, 16) + b"abcd" + struct.pack("<I", 16)
    yield "ng-unknown-block", ng[:head] + unknown + ng[head:]
    bad_trailer = struct.pack("<II", 0x0BAD, 16) + b"abcd" + struct.pack("<I", 24)
    yield "ng-unknown-block-bad-trailer", ng[:head] + bad_trailer + ng[head:]
    first_packet_length = struct.unpack_from("<I", ng, head + 4)[0]
    yield "ng-packet-bad-trailer", (ng[:head + first_packet_length - 4] + struct.pack("<I", first_packet_length + 4)
                                    + ng[head + first_packet_length:])
    # Sub-second fields of a whole second or more, and a capture whose timestamps run backwards.
    ether = bytearray(pcap)
    struct.pack_into("<I", ether, 24 + 4, 1_000_000)
    yield "usec-invalid", bytes(ether)
    backwards = bytearray(pcap)
    offset = 24
    for _ in range(9):  # the tenth record is stamped in 1970
        offset += 16 + struct.unpack_from("<I", backwards, offset + 8)[0]
    struct.pack_into("<I", backwards, offset, 1)
    yield "time-backwards", bytes(backwards)
    yield "empty", b""
    yield "text", b"this is not a capture\n" * 10


def test_corpus_never_tracebacks(tmp_path, cli_runner):
    captures = base_captures(tmp_path)
    codes = {}
    for index, (name, data) in enumerate(variants(captures)):
        path = tmp_path / f"{index}-{name}"
        path.write_bytes(data)
        # The HTML report is rendered for the whole captures only: it reads the bundle, not the
        # capture, and would double the corpus' time.
        html = [] if name.endswith("-whole") else ["--no-html"]
        result = cli_runner.invoke(["pcap", str(path), "--out", str(tmp_path / f"out{index}"), *html])
        output = result.output
        assert "Traceback" not in output and "internal error" not in output, (name, output)
        assert result.exit_code in (0, 2), (name, result.exit_code, output)
        if result.exit_code == 2:
            assert output.strip().count("\n") <= 1 or "partial" in output, (name, output)
        codes[name] = result.exit_code
    assert codes["ether.pcap-whole"] == 0 and codes["ng.pcapng-whole"] == 0 and codes["ng-unknown-block"] == 0
    assert codes["ether.pcap-cut10"] == 2 and codes["linktype105"] == 2 and codes["text"] == 2
    for name in ("tunnels.pcap-whole", "fcs.pcap-whole", "interfaces.pcapng-whole", "usec-invalid", "time-backwards"):
        assert codes[name] == 0, name
    assert codes["ng-unknown-block-bad-trailer"] == 2 and codes["ng-packet-bad-trailer"] == 2


def test_fifo_is_refused_without_hanging(tmp_path, agent_cli):
    fifo = tmp_path / "capture.fifo"
    os.mkfifo(fifo)
    result = agent_cli("pcap", str(fifo), "--out", str(tmp_path / "out"), timeout=30)
    assert result.returncode == 2
    assert "not a regular file" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("resolution", [0xFF, 0x7F, 0xBF, 19])
def test_extreme_if_tsresol_is_one_line_exit_2(tmp_path, cli_runner, resolution):
    packets = build.conversation("10.0.0.1", "10.0.0.2", 40000, 5432, [((10,), 100)] * 2)
    data = build.write_pcapng(tmp_path / "base.pcapng", build.framed(packets)).read_bytes()
    section_length = struct.unpack_from("<I", data, 4)[0]
    # An interface block with an if_tsresol option, replacing scapy's plain one.
    options = struct.pack("<HHB3x", 9, 1, resolution) + struct.pack("<HH", 0, 0)
    body = struct.pack("<HHI", 1, 0, 65535) + options
    interface = struct.pack("<II", 1, 12 + len(body)) + body + struct.pack("<I", 12 + len(body))
    old_length = struct.unpack_from("<I", data, section_length + 4)[0]
    path = tmp_path / "tsresol.pcapng"
    path.write_bytes(data[:section_length] + interface + data[section_length + old_length:])
    result = cli_runner.invoke(["pcap", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert "if_tsresol" in result.output and "Traceback" not in result.output


def test_corrupt_pcapng_block_keeps_the_good_packets_before_it(tmp_path):
    from probes.pcap_analysis import analyse_capture
    from probes.pcap_reader import CaptureReader

    packets = build.conversation("10.0.0.1", "10.0.0.2", 40000, 5432, [((10,), 100)] * 20)
    data = bytearray(build.write_pcapng(tmp_path / "base.pcapng", build.framed(packets)).read_bytes())
    # Walk to the 30th packet block and break its length; one read block holds the whole file.
    position, seen = 0, 0
    while seen < 30:
        block_type, length = struct.unpack_from("<II", data, position)
        seen += block_type == 6
        if seen < 30:
            position += length
    struct.pack_into("<I", data, position + 4, 13)
    path = tmp_path / "corrupt.pcapng"
    path.write_bytes(bytes(data))
    _, _, summary = analyse_capture(CaptureReader(path, block_bytes=64 << 20))
    assert summary.partial and summary.error_offset == position
    assert summary.packets == 29
    assert "29 packets before it" in summary.error
