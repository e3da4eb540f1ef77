"""capture probe: headers-only packet capture on --iface, written into the bundle as pcap.

Why tcpdump rather than scapy or a raw AF_PACKET socket: tcpdump drives libpcap's TPACKET_V3
ring in C (no Python per packet, so the probe keeps up at line rate on a busy host), applies the
BPF filter in the kernel, gives nanosecond timestamps (--time-stamp-precision=nano), rotates a
bounded ring of files (-C/-W: the newest packets are kept), and reports the kernel's drop
counters when it exits. A Python capture loop would itself become the cause of drops.

Headers only by default: the snap length keeps L2 (with one VLAN tag) + IPv6 + the largest TCP
header + a few payload bytes; payloads can hold orders and account data, so the full payload is
captured only with --capture-payload.

After the window the ring is merged, oldest file first, into one `capture.pcap` holding at most
`capture_max_packets` of the newest packets, and the same flow/turn analysis as `guardian-agent
pcap` runs on it (tables `flows` and `turns`). Kernel drops are a table column and a finding.
"""

from __future__ import annotations

import re
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import pyarrow as pa

from core import children
from core.atomic import atomic_path
from core.errors import BadInput, Unavailable, WorkFailed
from probes.base import ProbeBase, Window, finding, findings_table, require_root, rows_to_table
from probes.pcap_analysis import FLOWS_SCHEMA, TURNS_SCHEMA, analyse_capture, flows_findings, flows_headlines
# The analyser's own findings: what was not decoded, clamps, flows folded beyond the cap.
from probes.pcap_analysis import capture_findings as decoding_findings

# 14 Ethernet + 4 VLAN + 40 IPv6 + 60 TCP (with options) + 10 payload bytes
HEADERS_SNAPLEN_BYTES = 128
FULL_SNAPLEN_BYTES = 262144
# The byte and packet caps are the options capture_max_bytes/_packets (probes/options.py).
RING_FILES = 8
PREFERRED_TIMESTAMP_TYPES = ("adapter", "host_hiprec", "host")

CAPTURE_SCHEMA = pa.schema([
    pa.field("iface", pa.string()),
    pa.field("filter", pa.string()),
    pa.field("snaplen_bytes", pa.int64()),
    pa.field("timestamp_type", pa.string()),
    pa.field("packets_captured", pa.int64()),
    pa.field("packets_received_by_filter", pa.int64()),
    pa.field("packets_dropped_by_kernel", pa.int64()),
    pa.field("packets_dropped_by_interface", pa.int64()),
    pa.field("packets_in_file", pa.int64()),
    pa.field("bytes_in_file", pa.int64()),
    pa.field("packets_discarded_by_ring", pa.int64()),
    pa.field("payload_captured", pa.bool_()),
])

_COUNTER_PATTERNS = {
    "packets_captured": re.compile(r"(\d+) packets? captured"),
    "packets_received_by_filter": re.compile(r"(\d+) packets? received by filter"),
    "packets_dropped_by_kernel": re.compile(r"(\d+) packets? dropped by kernel"),
    "packets_dropped_by_interface": re.compile(r"(\d+) packets? dropped by interface"),
}


def tcpdump_counters(stderr_text: str) -> dict[str, int]:
    """Parse tcpdump's exit statistics; a counter it did not print is -1 (unknown), not 0."""
    counters = {}
    for name, pattern in _COUNTER_PATTERNS.items():
        match = pattern.search(stderr_text)
        counters[name] = int(match.group(1)) if match else -1
    return counters


def pick_timestamp_type(tcpdump_j_output: str) -> str | None:
    offered = set(re.findall(r"^\s+(\S+)\s+\(", tcpdump_j_output, flags=re.MULTILINE))
    for name in PREFERRED_TIMESTAMP_TYPES:
        if name in offered:
            return name
    return None


def tcpdump_command(tcpdump: str, iface: str, capture_filter: str | None, snaplen_bytes: int,
                    ring_prefix: Path, file_megabytes: int, timestamp_type: str | None) -> list[str]:
    command = [tcpdump, "-i", iface, "-n", "-p", "-U", "-s", str(snaplen_bytes),
               "--time-stamp-precision=nano", "-B", "8192", "-Z", "root",
               "-C", str(file_megabytes), "-W", str(RING_FILES), "-w", str(ring_prefix)]
    if timestamp_type:
        command[1:1] = ["-j", timestamp_type]
    if capture_filter:
        command.append(capture_filter)
    return command


def merge_ring(ring_files: list[Path], target: Path, max_packets: int) -> tuple[int, int, int]:
    """Concatenate a tcpdump ring (pcap files, all with the same header) oldest first into
    `target`, keeping only the newest `max_packets`. Byte copies only: no per-packet objects.
    Returns (packets written, bytes written, packets discarded)."""
    parts: list[tuple[int, Path]] = []
    for path in ring_files:
        with open(path, "rb") as handle:
            header = handle.read(40)
        if len(header) < 40:
            continue  # no complete record
        endian = "<" if struct.unpack("<I", header[:4])[0] in (0xA1B2C3D4, 0xA1B23C4D) else ">"
        first_seconds, first_fraction = struct.unpack(endian + "II", header[24:32])
        parts.append(((first_seconds << 32) | first_fraction, path))
    parts.sort()
    counts = [sum(len(block) for block in _complete_blocks(path)) for _, path in parts]
    skip = discarded = max(0, sum(counts) - max_packets)
    written_packets = 0
    with atomic_path(target) as temp, open(temp, "wb") as out:
        if parts:
            with open(parts[0][1], "rb") as handle:
                out.write(handle.read(24))
        else:
            out.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, HEADERS_SNAPLEN_BYTES, 1))
        for _, path in parts:
            for block in _complete_blocks(path):
                if skip >= len(block):
                    skip -= len(block)
                    continue
                start = int(block.data_offset[skip]) - 16
                end = int(block.data_offset[-1] + block.captured_bytes[-1])
                out.write(memoryview(block.data[start:end]))
                written_packets += len(block) - skip
                skip = 0
    return written_packets, target.stat().st_size, discarded


def _complete_blocks(path: Path):
    """The blocks of one ring file; tcpdump stopped mid-write can leave a partial last record,
    which is dropped quietly (it holds no complete packet)."""
    from probes.pcap_reader import CaptureCorrupt, CaptureReader

    try:
        yield from CaptureReader(path).blocks()
    except CaptureCorrupt:
        return


def capture_findings(row: dict) -> list[dict]:
    """Capture drops and ring discards, from the `capture` row: never hidden."""
    findings = []
    subject = f"capture on {row['iface']}"
    dropped = max(row["packets_dropped_by_kernel"], 0) + max(row["packets_dropped_by_interface"], 0)
    if dropped:
        findings.append(finding(
            "capture", "warning", subject,
            f"{dropped} packets dropped by the kernel/interface during capture: flows and turns are "
            "missing those packets",
            "narrow --capture-filter, or raise the capture buffer; drops here are capture drops, "
            "not network loss"))
    if row["packets_discarded_by_ring"]:
        findings.append(finding(
            "capture", "info", subject,
            f"ring kept the newest {row['packets_in_file']} packets; {row['packets_discarded_by_ring']} "
            "older ones were discarded",
            "shorten --duration or narrow --capture-filter to keep the whole window"))
    return findings


class CaptureProbe(ProbeBase):
    name = "capture"
    schema = CAPTURE_SCHEMA
    description = "Headers-only packet capture on --iface (tcpdump), flows and request→response turns"
    extra_schemas = {"flows": FLOWS_SCHEMA, "turns": TURNS_SCHEMA}
    extras = ("capture.pcap",)
    finish_grace_s = 60.0

    def __init__(self, config=None):
        super().__init__(config)
        self.process: subprocess.Popen | None = None
        self.ring_dir: Path | None = None
        # collect() merges the ring and removes ring_dir itself; abandon() before it does.
        self.process_is_collecting = False
        self.timestamp_type: str | None = None

    @property
    def iface(self) -> str | None:
        return self.option("iface")

    @property
    def snaplen_bytes(self) -> int:
        return FULL_SNAPLEN_BYTES if self.option("capture_payload") else HEADERS_SNAPLEN_BYTES

    def check(self) -> None:
        if not self.iface:
            raise Unavailable("no interface: pass --iface IFACE (and --capture-filter 'tcp port 5432')")
        if shutil.which("tcpdump") is None:
            raise Unavailable("tcpdump not installed: apt-get install tcpdump (or run `make setup`)")
        require_root("packet capture needs CAP_NET_RAW")
        # --iface and --capture-filter are the user's words: a typo in either is bad input,
        # refused before the window rather than found as an empty capture after it.
        if self.config.host.is_real and not Path(f"/sys/class/net/{self.iface}").exists() and self.iface != "any":
            raise BadInput(f"--iface {self.iface}: no such interface (see `ip link`)")
        if self.option("capture_filter") and self.config.host.is_real:
            self._compile_filter(shutil.which("tcpdump"))

    def _compile_filter(self, tcpdump: str) -> None:
        """`tcpdump -d` compiles the filter for the interface's link type and exits."""
        capture_filter = self.option("capture_filter")
        try:
            result = children.run([tcpdump, "-d", "-i", self.iface, "-s", str(self.snaplen_bytes), capture_filter],
                                  capture_output=True, text=True, timeout=10)
        except subprocess.TimeoutExpired:
            raise Unavailable("tcpdump -d did not compile --capture-filter within 10 s") from None
        if result.returncode != 0:
            reason = [line.removeprefix("tcpdump: ") for line in result.stderr.splitlines() if line.strip()]
            raise BadInput(f"--capture-filter {capture_filter!r}: {reason[-1] if reason else 'tcpdump refused it'}")

    def prepare(self) -> None:
        tcpdump = shutil.which("tcpdump")
        listing = children.run([tcpdump, "-J", "-i", self.iface], capture_output=True, text=True, timeout=10)
        self.timestamp_type = pick_timestamp_type(listing.stdout + listing.stderr)
        self.ring_dir = children.private_temp_dir("capture")
        max_bytes = int(self.option("capture_max_bytes"))
        file_megabytes = max(1, max_bytes // RING_FILES // 1_000_000)
        command = tcpdump_command(tcpdump, self.iface, self.option("capture_filter"),
                                  self.snaplen_bytes, self.ring_dir / "ring.pcap", file_megabytes,
                                  self.timestamp_type)
        self.stderr_path = self.ring_dir / "tcpdump.stderr"
        self.stderr_file = open(self.stderr_path, "w+")
        self.process = children.spawn(command, stdout=subprocess.DEVNULL, stderr=self.stderr_file,
                                      start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = self.stderr_path.read_text()
            if "listening on" in text:
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.02)
        self._stop_tcpdump()
        reason = self.stderr_path.read_text().strip().splitlines()
        raise WorkFailed(f"tcpdump did not start: {reason[-1] if reason else 'no output'}")

    def _stop_tcpdump(self) -> str:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.stderr_file.close()
        return self.stderr_path.read_text()

    def abandon(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        if self.ring_dir is not None and not self.process_is_collecting:
            shutil.rmtree(self.ring_dir, ignore_errors=True)

    def collect(self, window: Window) -> dict[str, pa.Table]:
        from probes.pcap_reader import CaptureReader

        self.process_is_collecting = True
        try:
            while not window.wait(0.5):
                if self.process.poll() is not None:
                    break
            exited_early = self.process.poll() is not None
            stderr_text = self._stop_tcpdump()
            if exited_early:
                last = [line for line in stderr_text.splitlines() if line.strip()]
                self.status_reason = f"tcpdump exited during the window: {last[-1] if last else 'no output'}"
            counters = tcpdump_counters(stderr_text)
            ring_files = sorted(self.ring_dir.glob("ring.pcap*"))
            target = window.extra_path("capture.pcap")
            max_packets = int(self.option("capture_max_packets"))
            packets_in_file, bytes_in_file, discarded = merge_ring(ring_files, target, max_packets)
        finally:
            if self.ring_dir is not None:
                shutil.rmtree(self.ring_dir, ignore_errors=True)
        row = {
            "iface": self.iface, "filter": self.option("capture_filter") or "",
            "snaplen_bytes": self.snaplen_bytes, "timestamp_type": self.timestamp_type or "default",
            "packets_in_file": packets_in_file, "bytes_in_file": bytes_in_file,
            "packets_discarded_by_ring": discarded,
            "payload_captured": bool(self.option("capture_payload")), **counters,
        }
        flows, turns, summary = analyse_capture(CaptureReader(target), spill_dir=window.bundle_dir)
        findings = (capture_findings(row) + flows_findings(flows, self.name).to_pylist()
                    + decoding_findings(summary, self.name).to_pylist())
        if summary.partial:
            self.status_reason = summary.error
        return {
            "capture": rows_to_table([row], CAPTURE_SCHEMA),
            "flows": flows,
            "turns": turns,
            "findings": findings_table(findings),
        }

    @staticmethod
    def headlines(tables: dict[str, pa.Table]) -> list[str]:
        lines = flows_headlines(tables)
        capture = tables.get("capture")
        if capture is not None and capture.num_rows:
            row = capture.to_pylist()[0]
            lines.append(f"capture: {row['packets_in_file']} packets kept, "
                         f"{max(row['packets_dropped_by_kernel'], 0)} dropped by the kernel")
        return lines
