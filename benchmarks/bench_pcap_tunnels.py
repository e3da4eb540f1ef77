"""Benchmark: the pcap analysis on the same traffic plain, inside VXLAN and inside GRE+MPLS.

The loopback capture is made as in bench_pcap.py (tcpdump, headers only; 200k packets by
default). Each record is then wrapped here in an outer Ethernet/IPv4/UDP/VXLAN header, or in
Ethernet/IPv4/GRE/MPLS (the inner Ethernet header dropped), with correct outer lengths and
checksums, so tshark reads the copies too. Reported: analysis CPU seconds on one core (best of
3) for each file, whether the tunnelled flows equal the plain ones (inner columns), and tshark's
TCP conversation count on each copy. Writes benchmarks/results/pcap_tunnels.json.

    python benchmarks/bench_pcap_tunnels.py [--packets N] [--keep FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_pcap import make_capture  # noqa: E402

from probes.pcap_analysis import analyse_capture  # noqa: E402
from probes.pcap_reader import CaptureReader  # noqa: E402

OUTER_MACS = bytes.fromhex("020000000002" "020000000001")


def ipv4_checksum(header: bytes) -> int:
    total = sum(struct.unpack(f">{len(header) // 2}H", header))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def outer_ipv4(protocol: int, payload_bytes: int) -> bytes:
    header = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + payload_bytes, 0, 0, 64, protocol, 0,
                         bytes([192, 0, 2, 1]), bytes([192, 0, 2, 2]))
    return header[:10] + struct.pack(">H", ipv4_checksum(header)) + header[12:]


def inner_ip_total(frame: bytes) -> int:
    """The inner IPv4 total length: the capture is headers only, the outer lengths must say
    what was on the wire."""
    return struct.unpack_from(">H", frame, 16)[0]


def vxlan(frame: bytes) -> tuple[bytes, int]:
    inner_bytes = 14 + inner_ip_total(frame)
    udp_bytes = 8 + 8 + inner_bytes
    head = (OUTER_MACS + b"\x08\x00" + outer_ipv4(17, udp_bytes) + struct.pack(">HHHH", 49152, 4789, udp_bytes, 0)
            + b"\x08\x00\x00\x00\x00\x00\x07\x00")
    return head + frame, len(head) + inner_bytes


def gre_mpls(frame: bytes) -> tuple[bytes, int]:
    inner_bytes = inner_ip_total(frame)
    tunnel = b"\x00\x00\x88\x47" + ((16 << 12) | (1 << 8) | 64).to_bytes(4, "big")
    head = OUTER_MACS + b"\x08\x00" + outer_ipv4(47, len(tunnel) + inner_bytes) + tunnel
    return head + frame[14:], len(head) + inner_bytes


def rewrite(source: Path, target: Path, wrap) -> None:
    data = source.read_bytes()
    out = bytearray(data[:24])
    position = 24
    while position + 16 <= len(data):
        seconds, fraction, captured, _wire = struct.unpack_from("<IIII", data, position)
        frame = data[position + 16:position + 16 + captured]
        wrapped, wire = wrap(frame)
        out += struct.pack("<IIII", seconds, fraction, len(wrapped), wire) + wrapped
        position += 16 + captured
    target.write_bytes(bytes(out))


def analysis_cpu_s(path: Path):
    best, result = None, None
    for _ in range(3):
        started = time.process_time()
        result = analyse_capture(CaptureReader(path))
        elapsed = time.process_time() - started
        best = elapsed if best is None else min(best, elapsed)
    return best, result


def tshark_conversations(path: Path) -> int | None:
    tshark = shutil.which("tshark")
    if not tshark:
        return None
    output = subprocess.run([tshark, "-r", str(path), "-q", "-z", "conv,tcp"], capture_output=True, text=True,
                            timeout=600, check=True).stdout
    return sum(1 for line in output.splitlines() if re.match(r"^\S+\s+<->\s+\S+", line))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--packets", type=int, default=200_000, help="target packet count (default 200k)")
    parser.add_argument("--keep", type=Path, help="reuse/keep the plain capture at this path")
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("tcpdump") is None:
        print("bench_pcap_tunnels: needs root and tcpdump (make setup) to capture loopback traffic", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-pcap-tunnels-"))
    try:
        plain = args.keep or work / "plain.pcap"
        if not plain.exists():
            make_capture(plain, args.packets)
        files = {"plain": plain, "vxlan": work / "vxlan.pcap", "gre+mpls": work / "gre-mpls.pcap"}
        rewrite(plain, files["vxlan"], vxlan)
        rewrite(plain, files["gre+mpls"], gre_mpls)
        row = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
               "machine": f"{platform.node()} {platform.processor() or platform.machine()} "
                          f"{os.cpu_count()} cpus, kernel {platform.release()}"}
        plain_flows = None
        for name, path in files.items():
            seconds, (flows, _turns, summary) = analysis_cpu_s(path)
            inner = flows.drop_columns(["bytes", "encapsulation"])
            if plain_flows is None:
                plain_flows = inner
            row[name] = {
                "packets": summary.packets,
                "analysis_cpu_s": round(seconds, 4),
                "analysis_packets_per_s_per_core": round(summary.packets / seconds),
                "flows": summary.flows,
                "flows_equal_plain": inner.equals(plain_flows),
                "encapsulations": summary.encapsulations,
                "not_decoded": summary.not_decoded,
                "tshark_tcp_conversations": tshark_conversations(path),
            }
            print(f"{name}: {summary.packets} packets, analysis {seconds:.3f} s CPU = "
                  f"{summary.packets / seconds / 1e6:.2f}M packets/s per core; {summary.flows} flows "
                  f"(equal to plain: {row[name]['flows_equal_plain']}; tshark: {row[name]['tshark_tcp_conversations']})")
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "pcap_tunnels.json").write_text(json.dumps(row, indent=2) + "\n")
        print(f"results: {HERE / 'results' / 'pcap_tunnels.json'}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
