"""Block-wise pcap / pcapng reader that decodes TCP/IP headers with vectorised numpy code.

Why not dpkt or scapy: both build a Python object per packet (measured here: dpkt 105k
packets/s, scapy 6.7k), and the pcap analysis must do >= 1M packets/s per core. Record
boundaries in pcap/pcapng form a chain (each length says where the next record starts), so the
one per-packet Python step is a tight walk over that chain collecting offsets (~8M records/s);
every header field is then gathered for all packets at once through unaligned strided views
(`np.ndarray(..., strides=(1,))`), one numpy fancy-index per field.

The file is read in blocks (default 32 MiB); a record cut by a block edge is carried into the
next block, so memory stays bounded on multi-GB captures. A record that runs past the end of
the file, or a length that cannot be right, raises CaptureCorrupt naming the byte offset after
every complete block before it has been yielded.

What a file says that cannot be taken literally is clamped and counted in `CaptureReader.clamps`
(said by `clamp_findings`): frame check sequences are stripped, sub-second fields of a second or
more and timestamps going backwards are clamped. Tunnels are unwrapped by probes/pcap_decap.py.
"""

from __future__ import annotations

import array
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from core.errors import BadInput
from probes.pcap_decap import (CATEGORY_ADDRESS_FAMILY, CATEGORY_IP_VERSION, ETHERTYPE_IPV4, ETHERTYPE_IPV6, Views,
                                count_reasons, ethernet_payload, ipv6_upper_layer, reason_keys,
                                unsupported_link_state, unwrap, wrapped_rows)

PCAP_MAGIC_USEC = 0xA1B2C3D4
PCAP_MAGIC_NSEC = 0xA1B23C4D
PCAPNG_SHB = 0x0A0D0D0A
PCAPNG_BYTE_ORDER_MAGIC = 0x1A2B3C4D
PCAPNG_IDB = 1
PCAPNG_SPB = 3
PCAPNG_EPB = 6

LINKTYPE_NULL = 0
LINKTYPE_ETHERNET = 1
LINKTYPE_LOOP = 108
LINKTYPE_LINUX_SLL = 113
LINKTYPE_IPV4 = 228
LINKTYPE_IPV6 = 229
LINKTYPE_LINUX_SLL2 = 276
SUPPORTED_LINKTYPES = {
    LINKTYPE_NULL: "BSD loopback",
    LINKTYPE_ETHERNET: "Ethernet",
    12: "raw IP",  # DLT_RAW differs between platforms; 101 is LINKTYPE_RAW
    14: "raw IP",
    101: "raw IP",
    LINKTYPE_LOOP: "OpenBSD loopback",
    LINKTYPE_LINUX_SLL: "Linux cooked (SLL)",
    LINKTYPE_IPV4: "raw IPv4",
    LINKTYPE_IPV6: "raw IPv6",
    LINKTYPE_LINUX_SLL2: "Linux cooked v2 (SLL2)",
}
KNOWN_UNSUPPORTED = {105: "IEEE 802.11", 127: "802.11 radiotap", 9: "PPP", 192: "PPI", 220: "USB"}

# Largest record we believe: libpcap's own MAXIMUM_SNAPLEN. A bigger length means corruption.
MAXIMUM_SNAPLEN = 262144
DEFAULT_BLOCK_BYTES = 8 << 20
# Largest frame an original length may claim: IPv6 BIG TCP GSO frames reach 512 KiB (Linux 6.3
# gso_max_size); anything beyond 16 MiB is a corrupt record, not a frame.
MAXIMUM_WIRE_BYTES = 16 << 20
# Largest pcapng block we accept (a packet block holds at most one MAXIMUM_SNAPLEN packet plus
# options); anything bigger is treated as corruption rather than buffered.
MAXIMUM_BLOCK_BYTES = 4 << 20
# Zero padding after each block so header gathers near the end never index past the buffer.
GATHER_PADDING = 4096


class CaptureCorrupt(BadInput):
    """A truncated or corrupt capture; `offset` is the byte offset of the first bad record."""

    def __init__(self, message: str, offset: int):
        super().__init__(message)
        self.offset = offset


@dataclass
class PacketBlock:
    """The packets of one block of the file: header fields as parallel arrays."""

    data: np.ndarray  # uint8, the block's bytes plus zero padding
    data_offset: np.ndarray  # int64, where each packet's link-layer header starts in `data`
    captured_bytes: np.ndarray  # int64
    wire_bytes: np.ndarray  # int64 (original length)
    ts_ns: np.ndarray  # int64 epoch nanoseconds
    linktype: np.ndarray  # int32 per packet
    first_packet_number: int  # 0-based index of the block's first packet in the file
    end_file_offset: int  # bytes of the file consumed so far

    def __len__(self) -> int:
        return len(self.data_offset)


def unaligned_view(buffer: bytes | np.ndarray, dtype: str) -> np.ndarray:
    """A view with one element starting at every byte offset: view[p] reads dtype at byte p."""
    raw = np.frombuffer(buffer, dtype=np.uint8)
    size = np.dtype(dtype).itemsize
    return np.ndarray(shape=(max(0, len(raw) - size + 1),), dtype=dtype, buffer=raw, strides=(1,))


def linktype_name(linktype: int) -> str:
    return SUPPORTED_LINKTYPES.get(linktype) or KNOWN_UNSUPPORTED.get(linktype) or "unknown"


def check_linktype(linktype: int, where: str) -> None:
    if linktype not in SUPPORTED_LINKTYPES:
        raise BadInput(
            f"{where}: unsupported link type {linktype} ({linktype_name(linktype)}); supported: "
            "Ethernet, Linux cooked (SLL/SLL2), raw IP, loopback")


UNIFORM_RUN_RECORDS = 4096


def uniform_run(u32: np.ndarray, offsets: array.array, position: int, length: int, valid: int) -> int:
    """Append the records from `position` on that all have captured length `length` (so each
    starts exactly 16 + length after the previous one); return how many. Exact, not a guess:
    a record's length fixes where the next one starts."""
    stride = 16 + length
    count = min(UNIFORM_RUN_RECORDS, (valid - position) // stride)
    if count < 8:
        return 0
    candidates = position + stride * np.arange(count, dtype=np.int64)
    differs = np.flatnonzero(u32[candidates + 8] != length)
    accepted = int(differs[0]) if len(differs) else count
    offsets.frombytes(candidates[:accepted].tobytes())
    return accepted


class CaptureReader:
    """Iterate a pcap or pcapng file as PacketBlocks. Open it first: the header is validated
    (format, link type) before anything is written anywhere."""

    def __init__(self, path: Path, block_bytes: int = DEFAULT_BLOCK_BYTES,
                 progress: Callable[[int, int], None] | None = None):
        self.path = Path(path)
        self.block_bytes = max(1 << 16, int(block_bytes))
        self.progress = progress
        try:
            self.size_bytes = os.path.getsize(self.path)
            with open(self.path, "rb") as handle:
                head = handle.read(64)
        except IsADirectoryError:
            raise BadInput(f"{self.path}: is a directory, not a capture file") from None
        except OSError as error:
            raise BadInput(f"{self.path}: cannot read ({error.strerror or error})") from None
        if len(head) < 4:
            raise BadInput(f"{self.path}: empty or too short to be a pcap/pcapng file")
        little = struct.unpack("<I", head[:4])[0]
        big = struct.unpack(">I", head[:4])[0]
        self.nanosecond = False
        if little == PCAPNG_SHB:
            self.format = "pcapng"
            if len(head) < 28:
                raise CaptureCorrupt(f"{self.path}: pcapng section header truncated at byte offset 0", 0)
            self._check_first_interfaces()
        elif little in (PCAP_MAGIC_USEC, PCAP_MAGIC_NSEC) or big in (PCAP_MAGIC_USEC, PCAP_MAGIC_NSEC):
            self.format = "pcap"
            self.endian = "<" if little in (PCAP_MAGIC_USEC, PCAP_MAGIC_NSEC) else ">"
            self.nanosecond = (little if self.endian == "<" else big) == PCAP_MAGIC_NSEC
            if len(head) < 24:
                raise CaptureCorrupt(f"{self.path}: pcap file header truncated at byte offset {len(head)}",
                                     len(head))
            _major, _minor, _zone, _sigfigs, self.snaplen, linktype_field = struct.unpack(
                self.endian + "HHiIII", head[4:24])
            self.pcap_linktype, self.pcap_fcs_bytes = pcap_linktype_and_fcs(linktype_field)
            check_linktype(self.pcap_linktype, str(self.path))
        else:
            raise BadInput(f"{self.path}: not a pcap or pcapng file (magic 0x{big:08x})")
        self.packets_read = 0
        # What the reader clamped instead of passing on a wrong number (see clamp_findings).
        self.clamps = {"timestamps_backwards": 0, "timestamps_backwards_max_ns": 0,
                       "timestamps_invalid_subsecond": 0, "fcs_stripped_packets": 0}
        self._latest_ts_ns = np.int64(np.iinfo(np.int64).min)

    def _check_first_interfaces(self) -> None:
        """Refuse a pcapng whose interfaces before the first packet all have a link type we do
        not read, before anything is written (packets of such an interface next to a supported
        one are counted as not decoded)."""
        with open(self.path, "rb") as handle:
            head = handle.read(1 << 16)
        endian = "<" if struct.unpack_from("<I", head, 8)[0] == PCAPNG_BYTE_ORDER_MAGIC else ">"
        position, linktypes = 0, []
        while position + 12 <= len(head):
            block_type, block_length = struct.unpack_from(endian + "II", head, position)
            if block_type == PCAPNG_EPB or block_length < 12:
                break
            if block_type == PCAPNG_IDB and position + 10 <= len(head):
                linktypes.append(struct.unpack_from(endian + "H", head, position + 8)[0])
            position += block_length
        if linktypes and not any(linktype in SUPPORTED_LINKTYPES for linktype in linktypes):
            check_linktype(linktypes[0], str(self.path))

    # -- iteration ------------------------------------------------------------------------
    def blocks(self) -> Iterator[PacketBlock]:
        """Yield the packets block by block. A block's `data` is a view of one reused buffer:
        it is valid until the next block is requested (consume each block before the next)."""
        if self.format == "pcap":
            yield from self._pcap_blocks()
        else:
            yield from self._pcapng_blocks()

    def _buffer(self) -> tuple[bytearray, memoryview]:
        # One buffer for the whole file: a block, the carried partial record, and zero padding.
        # Reusing it (readinto) avoids a fresh allocation + page faults per block.
        storage = bytearray(self.block_bytes + MAXIMUM_BLOCK_BYTES + GATHER_PADDING)
        return storage, memoryview(storage)

    def _refill(self, handle, storage: bytearray, view: memoryview, state: list, what: str) -> bool:
        """state = [file offset of storage[0], consumed bytes, valid bytes]. Moves the unconsumed
        tail to the front and reads a block after it; False at the end of the file. A tail left
        at the end of the file is a cut record: CaptureCorrupt naming its offset."""
        base_offset, position, valid = state
        base_offset += position
        leftover = valid - position
        if leftover:
            storage[:leftover] = storage[position:valid]
        got = handle.readinto(view[leftover:leftover + self.block_bytes]) or 0
        state[:] = [base_offset, 0, leftover + got]
        if got:
            return True
        if leftover:
            raise CaptureCorrupt(
                f"{self.path}: truncated {what} at byte offset {base_offset} ({leftover} bytes left, "
                f"{what} incomplete); {self.packets_read} packets before it were analysed", base_offset)
        return False

    def _pcap_blocks(self) -> Iterator[PacketBlock]:
        length_limit = min(max(MAXIMUM_SNAPLEN, self.snaplen), MAXIMUM_BLOCK_BYTES)
        unpack_length = struct.Struct(self.endian + "I").unpack_from
        storage, view = self._buffer()
        data = np.frombuffer(storage, dtype=np.uint8)
        u32 = unaligned_view(storage, self.endian + "u4")
        state = [24, 0, 0]
        with open(self.path, "rb") as handle:
            handle.seek(24)
            while self._refill(handle, storage, view, state, "record"):
                base_offset, _, valid = state
                offsets = array.array("q")
                append = offsets.append
                position = 0
                corrupt_at = -1
                # The one per-record Python loop (see module docstring): offsets only.
                last_length, same = -1, 0
                while position + 16 <= valid:
                    length = unpack_length(storage, position + 8)[0]
                    if length > length_limit:
                        corrupt_at = position
                        break
                    following = position + 16 + length
                    if following > valid:
                        break
                    append(position)
                    position = following
                    if length != last_length:
                        last_length, same = length, 0
                        continue
                    same += 1
                    if same == 32:
                        # Headers-only captures are mostly records cut to the snap length: after
                        # 32 equal lengths, check a long stretch at a fixed stride in one go.
                        accepted = uniform_run(u32, offsets, position, length, valid)
                        position += accepted * (16 + length)
                        same = 0 if accepted >= 64 else -512  # back off when it did not pay
                if offsets:
                    yield self._pcap_block(data, u32, np.frombuffer(offsets, dtype=np.int64),
                                           base_offset + position)
                if corrupt_at >= 0:
                    at = base_offset + corrupt_at
                    raise CaptureCorrupt(
                        f"{self.path}: corrupt record at byte offset {at} (captured length "
                        f"{unpack_length(storage, corrupt_at + 8)[0]} > {length_limit}); "
                        f"{self.packets_read} packets before it were analysed", at)
                state[1] = position
                if self.progress:
                    self.progress(base_offset + position, self.size_bytes)

    def _pcap_block(self, data: np.ndarray, u32: np.ndarray, offsets: np.ndarray,
                    end_file_offset: int) -> PacketBlock:
        seconds = u32[offsets].astype(np.int64)
        fraction = u32[offsets + 4].astype(np.int64)
        # A fraction of a second of 1e6 us / 1e9 ns or more is no time at all: taken as the
        # last instant of its second (and counted) rather than spilling into the next ones.
        units_per_second = 1_000_000_000 if self.nanosecond else 1_000_000
        invalid = fraction >= units_per_second
        if invalid.any():
            self.clamps["timestamps_invalid_subsecond"] += int(invalid.sum())
            fraction = np.minimum(fraction, units_per_second - 1)
        ts_ns = seconds * 1_000_000_000 + (fraction if self.nanosecond else fraction * 1000)
        captured, wire = self._strip_fcs(u32[offsets + 8].astype(np.int64), u32[offsets + 12].astype(np.int64),
                                         self.pcap_fcs_bytes)
        block = PacketBlock(
            data=data,
            data_offset=offsets + 16,
            captured_bytes=captured,
            wire_bytes=wire,
            ts_ns=self._in_time_order(ts_ns),
            linktype=np.full(len(offsets), self.pcap_linktype, dtype=np.int32),
            first_packet_number=self.packets_read,
            end_file_offset=end_file_offset,
        )
        self.packets_read += len(offsets)
        return block

    def _strip_fcs(self, captured: np.ndarray, wire: np.ndarray, fcs_bytes) -> tuple[np.ndarray, np.ndarray]:
        """Drop the frame check sequence at the end of each frame (fcs_bytes: an int or one per
        packet): it is not part of the frame the analysis counts, and a capture cut by its snap
        length may not hold it at all."""
        if not np.any(fcs_bytes):
            return captured, wire
        stripped_wire = np.maximum(wire - fcs_bytes, 0)
        self.clamps["fcs_stripped_packets"] += int(np.count_nonzero(wire != stripped_wire))
        return np.minimum(captured, stripped_wire), stripped_wire

    def _in_time_order(self, ts_ns: np.ndarray) -> np.ndarray:
        """Timestamps never go backwards: a packet stamped before the latest one seen is given
        that latest time (counted, with the largest step back), so no turn or handshake comes
        out negative."""
        if not len(ts_ns):
            return ts_ns
        ordered = np.maximum(np.maximum.accumulate(ts_ns), self._latest_ts_ns)
        behind = ordered - ts_ns
        if behind.any():
            self.clamps["timestamps_backwards"] += int(np.count_nonzero(behind))
            self.clamps["timestamps_backwards_max_ns"] = max(self.clamps["timestamps_backwards_max_ns"],
                                                             int(behind.max()))
        self._latest_ts_ns = ordered[-1]
        return ordered

    def _pcapng_blocks(self) -> Iterator[PacketBlock]:
        # Interfaces are numbered per section; each maps to (linktype, multiplier, divisor) that
        # turn its timestamp units into nanoseconds.
        self._interfaces: list[tuple[int, int, int, int]] = []
        self._endian = "<"
        storage, view = self._buffer()
        data = np.frombuffer(storage, dtype=np.uint8)
        state = [0, 0, 0]
        with open(self.path, "rb") as handle:
            while self._refill(handle, storage, view, state, "block"):
                base_offset, _, valid = state
                position = 0
                while True:
                    position, packet_offsets, interface_ids, stop_reason = self._walk_pcapng(
                        storage, position, valid, base_offset)
                    if len(packet_offsets):
                        block, bad = self._pcapng_block(data, storage, packet_offsets, interface_ids, base_offset,
                                                        base_offset + position)
                        if len(block):
                            yield block
                        if bad is not None:
                            stop_reason = ("corrupt", *bad)
                    if isinstance(stop_reason, tuple):
                        _, bad_position, why = stop_reason
                        raise self._corrupt(bad_position, base_offset, why)
                    following = None
                    if stop_reason == "section":
                        following = self._read_section_header(storage, position, valid, base_offset)
                    elif stop_reason == "interface":
                        following = self._read_interface(storage, position, base_offset)
                    if following is None:
                        break
                    position = following
                state[1] = position
                if self.progress:
                    self.progress(base_offset + position, self.size_bytes)

    def _walk_pcapng(self, buffer: bytearray, position: int, end: int, base_offset: int):
        """Walk blocks from `position`; stop before a section or interface block (handled in
        Python, rarely) or at the first incomplete block. Returns EPB offsets + interface ids;
        at a corrupt block the stop reason is ("corrupt", position, why), raised by the caller
        only after the good packets before it were yielded."""
        header = struct.Struct(self._endian + "II").unpack_from
        offsets = array.array("q")
        interface_ids = array.array("q")
        append = offsets.append
        append_interface = interface_ids.append
        interface_count = len(self._interfaces)
        stop = "incomplete"
        while position + 12 <= end:
            block_type, block_length = header(buffer, position)
            if block_type == PCAPNG_SHB:
                stop = "section"
                break
            if block_length < 12 or block_length & 3:
                stop = ("corrupt", position, f"bad block length {block_length}")
                break
            if position + block_length > end:
                if block_length > MAXIMUM_BLOCK_BYTES:
                    stop = ("corrupt", position, f"block length {block_length} too large")
                break
            if block_type != PCAPNG_EPB and header(buffer, position + block_length - 4)[0] != block_length:
                # Packet blocks are checked the same way, all at once, in _pcapng_block.
                stop = ("corrupt", position, trailing_length_message(
                    header(buffer, position + block_length - 4)[0], block_length))
                break
            if block_type == PCAPNG_EPB:
                interface = header(buffer, position + 8)[0]
                if interface >= interface_count:
                    stop = ("corrupt", position, f"packet names undefined interface {interface}")
                    break
                append(position)
                append_interface(interface)
            elif block_type == PCAPNG_IDB:
                stop = "interface"
                break
            # Other blocks (name resolution, statistics, custom, SPB without timestamps) carry
            # nothing the flow analysis uses.
            position += block_length
        return (position, np.frombuffer(offsets, dtype=np.int64),
                np.frombuffer(interface_ids, dtype=np.int64), stop)

    def _corrupt(self, position: int, base_offset: int, why: str) -> CaptureCorrupt:
        at = base_offset + position
        return CaptureCorrupt(f"{self.path}: corrupt block at byte offset {at} ({why}); "
                              f"{self.packets_read} packets before it were analysed", at)

    def _read_section_header(self, buffer: bytearray, position: int, end: int, base_offset: int) -> int | None:
        """Returns the next block's position, or None when the block is not complete yet."""
        if position + 12 > end:
            return None
        magic = struct.unpack_from("<I", buffer, position + 8)[0]
        if magic == PCAPNG_BYTE_ORDER_MAGIC:
            self._endian = "<"
        elif magic == 0x4D3C2B1A:
            self._endian = ">"
        else:
            raise self._corrupt(position, base_offset, f"bad byte-order magic 0x{magic:08x}")
        block_length = struct.unpack_from(self._endian + "I", buffer, position + 4)[0]
        if block_length < 28 or block_length & 3 or block_length > MAXIMUM_BLOCK_BYTES:
            raise self._corrupt(position, base_offset, f"bad section header length {block_length}")
        if position + block_length > end:
            return None
        trailing = struct.unpack_from(self._endian + "I", buffer, position + block_length - 4)[0]
        if trailing != block_length:
            raise self._corrupt(position, base_offset, trailing_length_message(trailing, block_length))
        self._interfaces = []
        return position + block_length

    def _read_interface(self, buffer: bytearray, position: int, base_offset: int) -> int | None:
        # Only reached for a complete block (the walk checked its length).
        block_length = struct.unpack_from(self._endian + "I", buffer, position + 4)[0]
        if block_length < 20:
            raise self._corrupt(position, base_offset, f"bad interface block length {block_length}")
        # An interface of a link type we do not read is kept: its packets are counted as not
        # decoded, the other interfaces' packets are analysed.
        linktype = struct.unpack_from(self._endian + "H", buffer, position + 8)[0]
        # Options: if_tsresol (code 9) sets the timestamp unit; default microseconds.
        multiplier, divisor, fcs_bytes = 1000, 1, 0
        option = position + 16
        option_end = position + block_length - 4
        while option + 4 <= option_end:
            code, length = struct.unpack_from(self._endian + "HH", buffer, option)
            if code == 0:
                break
            if code == 9 and length >= 1:
                resolution = buffer[option + 4]
                # Units finer than 2^-62 s or 10^-18 s would overflow the int64 arithmetic below
                # and no clock ticks that fast: a corrupt or hostile option, said as such.
                if (resolution & 0x80 and resolution & 0x7F > 62) or (not resolution & 0x80 and resolution > 18):
                    raise self._corrupt(position, base_offset, f"unsupported if_tsresol {resolution:#04x}")
                if resolution & 0x80:  # power of two
                    multiplier, divisor = 1_000_000_000, 1 << (resolution & 0x7F)
                elif resolution <= 9:
                    multiplier, divisor = 10 ** (9 - resolution), 1
                else:
                    multiplier, divisor = 1, 10 ** (resolution - 9)
            if code == 13 and length >= 1:
                fcs_bytes = pcapng_fcs_bytes(buffer[option + 4])
            option += 4 + ((length + 3) & ~3)
        self._interfaces.append((linktype, multiplier, divisor, fcs_bytes))
        return position + block_length

    def _pcapng_block(self, data: np.ndarray, storage: bytearray, offsets: np.ndarray,
                      interface_ids: np.ndarray, base_offset: int, end_file_offset: int):
        """The packets at `offsets` as a PacketBlock, cut before the first bad packet block;
        plus (position, why) of that block, or None."""
        u32 = unaligned_view(storage, self._endian + "u4")
        captured = u32[offsets + 20].astype(np.int64)
        block_lengths = u32[offsets + 4].astype(np.int64)
        trailing = u32[offsets + block_lengths - 4].astype(np.int64)
        too_long = captured + 32 > block_lengths
        bad = too_long | (trailing != block_lengths)
        problem = None
        if bad.any():
            first = int(np.argmax(bad))
            position = int(offsets[first])
            why = ("captured length exceeds its block" if too_long[first]
                   else trailing_length_message(int(trailing[first]), int(block_lengths[first])))
            problem = (position, why)
            offsets, interface_ids, captured = offsets[:first], interface_ids[:first], captured[:first]
            end_file_offset = base_offset + position
        high = u32[offsets + 12].astype(np.int64)
        low = u32[offsets + 16].astype(np.int64)
        units = (high << 32) | low
        interfaces = np.array(self._interfaces, dtype=np.int64).reshape(-1, 4)
        linktype, multiplier, divisor, fcs_bytes = (interfaces[interface_ids, column] for column in range(4))
        # Split the product so units * 1e9 never leaves int64 (tsresol can be 2^-30 etc.).
        ts_ns = (units // divisor) * multiplier + ((units % divisor) * multiplier) // divisor
        captured, wire = self._strip_fcs(captured, u32[offsets + 24].astype(np.int64), fcs_bytes)
        block = PacketBlock(
            data=data,
            data_offset=offsets + 28,
            captured_bytes=captured,
            wire_bytes=wire,
            ts_ns=self._in_time_order(ts_ns),
            linktype=linktype.astype(np.int32),
            first_packet_number=self.packets_read,
            end_file_offset=end_file_offset,
        )
        self.packets_read += len(offsets)
        return block, problem


def trailing_length_message(trailing: int, leading: int) -> str:
    return (f"its trailing length {trailing} disagrees with its leading length {leading}; reading "
            "stopped there (the blocks after it cannot be trusted)")


def pcap_linktype_and_fcs(field_value: int) -> tuple[int, int]:
    """pcap header link-type field: the link type is its low 16 bits; when bit 26 is set (the
    'FCS length present' bit of pcap-savefile(5) / libpcap LT_FCS_DATALINK_EXT), its top four
    bits give the FCS length in 16-bit words. Other bits are reserved and ignored."""
    fcs_bytes = ((field_value >> 28) & 0xF) * 2 if field_value & 0x04000000 else 0
    return field_value & 0xFFFF, fcs_bytes


def pcapng_fcs_bytes(value: int) -> int:
    """if_fcslen: the pcapng drafts say bits, some writers put bytes (pcapng/pcapng issue 60);
    an Ethernet FCS is 2 or 4 bytes, so 16/32 are bits and 2/4 are bytes. Anything else is
    not a length we can trust: nothing is stripped."""
    return {16: 2, 32: 4, 2: 2, 4: 4}.get(value, 0)


def clamp_findings(clamps: dict, subject: str, probe: str) -> list[dict]:
    """Findings for what the reader clamped (CaptureReader.clamps)."""
    from probes.base import finding

    rows = []
    if clamps.get("timestamps_backwards"):
        rows.append(finding(
            probe, "warning", subject,
            f"{clamps['timestamps_backwards']} packets are stamped earlier than a packet before them "
            f"(by up to {clamps['timestamps_backwards_max_ns'] / 1e6:.3f} ms); each was given the "
            "latest time seen, so no latency comes out negative",
            "the capture host's clock stepped (NTP, a VM migration) or files were merged out of "
            "order: latencies around those packets are lower bounds"))
    if clamps.get("timestamps_invalid_subsecond"):
        rows.append(finding(
            probe, "warning", subject,
            f"{clamps['timestamps_invalid_subsecond']} packets have a sub-second timestamp of a whole "
            "second or more; taken as the last instant of their second",
            "the capture is corrupt or was written by a broken tool: check how it was produced"))
    return rows


@dataclass
class TcpHeaders:
    """Decoded TCP/IP headers of the TCP packets of one block (all arrays the same length)."""

    packet_number: np.ndarray  # int64, index in the file
    ts_ns: np.ndarray
    wire_bytes: np.ndarray
    ip_version: np.ndarray  # uint8 4 or 6
    src_high: np.ndarray  # uint64 upper half of the 16-byte address (IPv4: 0)
    src_low: np.ndarray  # uint64 lower half (IPv4: ::ffff:a.b.c.d)
    dst_high: np.ndarray
    dst_low: np.ndarray
    src_port: np.ndarray  # int64
    dst_port: np.ndarray
    seq: np.ndarray  # int64 (uint32 values)
    ack: np.ndarray
    flags: np.ndarray  # int64
    payload_bytes: np.ndarray  # int64, from the IP length (snap length does not shorten it)
    other_packets: int  # packets that are not decodable TCP (ARP, UDP, fragments, cut headers)
    impossible_wire_lengths: int = 0  # original length beyond MAXIMUM_WIRE_BYTES: clamped
    ip_lengths_beyond_wire: int = 0  # IP length longer than the frame on the wire: clamped
    # Encapsulation chain per packet (pcap_decap.chain_name; 0 = plain TCP/IP).
    encapsulation: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    not_tcp: dict = field(default_factory=dict)  # packets that are something else, by kind
    not_decoded: dict = field(default_factory=dict)  # packets that may hide TCP, by reason


def _link_layer(block: PacketBlock, views: Views, be32: np.ndarray, le32: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per packet: ethertype-like protocol (0x0800 / 0x86DD / other) and network header offset."""
    start = block.data_offset
    linktypes = np.unique(block.linktype)
    if len(linktypes) == 1:
        return _link_layer_of(int(linktypes[0]), start, views, be32, le32)
    ethertype = np.zeros(len(start), dtype=np.int64)
    l3 = np.zeros(len(start), dtype=np.int64)
    for linktype in linktypes.tolist():
        rows = np.flatnonzero(block.linktype == linktype)
        ethertype[rows], l3[rows] = _link_layer_of(linktype, start[rows], views, be32, le32)
    return ethertype, l3


def _link_layer_of(linktype: int, base: np.ndarray, views: Views, be32, le32) -> tuple[np.ndarray, np.ndarray]:
    be16, u8 = views.be16, views.u8
    if linktype not in SUPPORTED_LINKTYPES:
        # Packets of a pcapng interface we cannot read: counted, never decoded.
        return np.full(len(base), unsupported_link_state(linktype), dtype=np.int64), base
    if linktype == LINKTYPE_ETHERNET:
        return ethernet_payload(views, base)
    if linktype == LINKTYPE_LINUX_SLL:
        return be16[base + 14].astype(np.int64), base + 16
    if linktype == LINKTYPE_LINUX_SLL2:
        return be16[base].astype(np.int64), base + 20
    if linktype in (LINKTYPE_NULL, LINKTYPE_LOOP):
        # The family is in the capturing host's byte order (NULL) or network order (LOOP).
        family = le32[base].astype(np.int64)
        family = np.where(family > 0xFFFF, be32[base].astype(np.int64), family)
        kind = np.where(family == 2, ETHERTYPE_IPV4,
                        np.where(np.isin(family, (10, 24, 28, 30)), ETHERTYPE_IPV6,
                                 (CATEGORY_ADDRESS_FAMILY << 32) | (family & 0xFFFFFFFF)))
        return kind, base + 4
    if linktype == LINKTYPE_IPV4:
        return np.full(len(base), ETHERTYPE_IPV4, dtype=np.int64), base
    if linktype == LINKTYPE_IPV6:
        return np.full(len(base), ETHERTYPE_IPV6, dtype=np.int64), base
    version = (u8[base] >> 4).astype(np.int64)  # raw IP: the version nibble says which
    return np.where(version == 4, ETHERTYPE_IPV4, np.where(version == 6, ETHERTYPE_IPV6,
                                                           (CATEGORY_IP_VERSION << 32) | version)), base


def decode_tcp(block: PacketBlock) -> TcpHeaders:
    """Decode L2-L4 headers of every packet of the block at once.

    Wide loads (one 32/64-bit gather covering several fields, split with shifts) keep the number
    of fancy-index passes over the packets small: ~7 for an IPv4/TCP packet.
    """
    data = block.data
    u8 = data
    be16 = unaligned_view(data, ">u2")
    be32 = unaligned_view(data, ">u4")
    le32 = unaligned_view(data, "<u4")
    be64 = unaligned_view(data, ">u8")
    limit = len(be64) - 1
    views = Views(u8, be16, be32, be64, limit)
    count = len(block)
    captured_end = block.data_offset + block.captured_bytes
    ethertype, l3 = _link_layer(block, views, be32, le32)

    # IPv4: version/IHL/total length in one load, fragment/TTL/protocol in another.
    word0 = be32[l3]
    word6 = be32[l3 + 6]
    # Tunnels and link encapsulations (probes/pcap_decap.py): only the packets that are not
    # plain TCP/IP are looked at; their inner headers then go through the decoding below.
    chain = None
    wrapped = wrapped_rows(ethertype, word6)
    if len(wrapped):
        inner = unwrap(views, ethertype, l3, captured_end, wrapped)
        ethertype, l3 = ethertype.astype(np.int64), l3.copy()
        ethertype[wrapped], l3[wrapped] = inner.state, inner.offset
        word0, word6 = word0.copy(), word6.copy()
        known, unknown = wrapped[inner.has_words], wrapped[~inner.has_words]
        word0[known], word6[known] = inner.word0[inner.has_words], inner.word6[inner.has_words]
        at = views.safe(l3[unknown])
        word0[unknown], word6[unknown] = be32[at], be32[at + 6]
        if inner.chain.any():
            chain = np.zeros(count, dtype=np.int64)
            chain[wrapped] = inner.chain
    is_v4 = (ethertype == ETHERTYPE_IPV4) & ((word0 >> 28) == 4)
    tcp_v4 = is_v4 & ((word6 & 0xFF) == 6) & (((word6 >> 16) & 0x1FFF) == 0) & (((word0 >> 24) & 0x0F) >= 5)
    is_v6 = (ethertype == ETHERTYPE_IPV6) & ((word0 >> 28) == 6)
    rows_v4 = np.flatnonzero(tcp_v4)
    rows_v6 = np.flatnonzero(is_v6) if is_v6.any() else np.zeros(0, dtype=np.int64)

    # -- IPv4 rows
    l3_v4 = l3[rows_v4]
    header_v4 = ((word0[rows_v4] >> 24) & 0x0F).astype(np.int64) * 4
    total_v4 = (word0[rows_v4] & 0xFFFF).astype(np.int64)
    # TSO/GSO frames captured at the sender can carry total length 0: use the wire length.
    zero_total = total_v4 == 0
    if zero_total.any():
        total_v4 = np.where(zero_total, block.wire_bytes[rows_v4] - (l3_v4 - block.data_offset[rows_v4]),
                            total_v4)
    addresses_v4 = be64[l3_v4 + 12]
    mapped = np.uint64(0xFFFF00000000)
    src_low_v4 = mapped | (addresses_v4 >> np.uint64(32))
    dst_low_v4 = mapped | (addresses_v4 & np.uint64(0xFFFFFFFF))
    l4_v4 = l3_v4 + header_v4
    ip_payload_v4 = total_v4 - header_v4

    # -- IPv6 rows, with up to three extension headers (hop-by-hop, routing, fragment, dest)
    if len(rows_v6):
        l3_v6 = l3[rows_v6]
        payload_v6 = be16[l3_v6 + 4].astype(np.int64)
        next_header, l4_v6, later_fragment = ipv6_upper_layer(views, l3_v6)
        keep_v6 = ~later_fragment & (next_header == 6)
        rows_v6, l3_v6, l4_v6 = rows_v6[keep_v6], l3_v6[keep_v6], l4_v6[keep_v6]
        payload_v6 = payload_v6[keep_v6]
        # IPv6 BIG TCP (Linux 5.19+): a GSO frame over 64 KiB says payload length 0 (with or
        # without the RFC 2675 jumbo option, depending on the kernel): its size is on the wire.
        jumbo = payload_v6 == 0
        if jumbo.any():
            wire_v6 = block.wire_bytes[rows_v6] - (l3_v6 - block.data_offset[rows_v6]) - 40
            payload_v6 = np.where(jumbo, np.maximum(wire_v6, 0), payload_v6)
        ip_payload_v6 = payload_v6 - (l4_v6 - l3_v6 - 40)
        src_high_v6, src_low_v6 = be64[l3_v6 + 8], be64[l3_v6 + 16]
        dst_high_v6, dst_low_v6 = be64[l3_v6 + 24], be64[l3_v6 + 32]

    if len(rows_v6) == 0:
        rows, l4, ip_payload, is_v4_row = rows_v4, l4_v4, ip_payload_v4, None
        src_low, dst_low = src_low_v4, dst_low_v4
        src_high = dst_high = np.zeros(len(rows_v4), dtype=np.uint64)
    else:
        rows = np.concatenate((rows_v4, rows_v6))
        order = np.argsort(rows, kind="stable")
        rows = rows[order]
        is_v4_row = np.concatenate((np.ones(len(rows_v4), bool), np.zeros(len(rows_v6), bool)))[order]
        l4 = np.concatenate((l4_v4, l4_v6))[order]
        ip_payload = np.concatenate((ip_payload_v4, ip_payload_v6))[order]
        zeros = np.zeros(len(rows_v4), dtype=np.uint64)
        src_low = np.concatenate((src_low_v4, src_low_v6))[order]
        dst_low = np.concatenate((dst_low_v4, dst_low_v6))[order]
        src_high = np.concatenate((zeros, src_high_v6))[order]
        dst_high = np.concatenate((zeros, dst_high_v6))[order]

    # TCP: ports in one load, seq+ack in one, data offset+flags in one; the fixed header must
    # be inside the captured bytes.
    whole = l4 + 14 <= captured_end[rows]
    if not whole.all():
        rows, l4, ip_payload = rows[whole], l4[whole], ip_payload[whole]
        src_low, dst_low, src_high, dst_high = src_low[whole], dst_low[whole], src_high[whole], dst_high[whole]
        is_v4_row = None if is_v4_row is None else is_v4_row[whole]
    wire_bytes = block.wire_bytes[rows]
    l4_at = l4 - block.data_offset[rows]
    # An original length no link can carry (0xFFFFFFFF...) is corruption: the frame is taken
    # as long as its IP header says, and counted so the report says so.
    impossible_wire = wire_bytes > MAXIMUM_WIRE_BYTES
    if impossible_wire.any():
        wire_bytes = np.where(impossible_wire, l4_at + np.maximum(ip_payload, 0), wire_bytes)
    # The frame's length on the wire bounds the payload: a bogus IP length cannot add bytes
    # that were never sent. Headers-only captures keep the IP length (the wire length is the
    # original one, not the snap length).
    on_wire = wire_bytes - l4_at
    length_beyond_wire = ip_payload > on_wire
    ip_payload = np.minimum(ip_payload, on_wire)
    ports = be32[l4]
    sequence = be64[l4 + 4]
    offset_flags = be16[l4 + 12]
    tcp_header = ((offset_flags >> 12) * 4).astype(np.int64)
    decoded = np.zeros(count, dtype=bool)
    decoded[rows] = True
    other = np.flatnonzero(~decoded)
    not_tcp, not_decoded = count_reasons(reason_keys(views, ethertype[other], l3[other], captured_end[other]))
    return TcpHeaders(
        packet_number=rows + block.first_packet_number,
        ts_ns=block.ts_ns[rows],
        wire_bytes=wire_bytes,
        ip_version=np.full(len(rows), 4, np.uint8) if is_v4_row is None else np.where(is_v4_row, 4, 6).astype(np.uint8),
        src_high=src_high,
        src_low=src_low,
        dst_high=dst_high,
        dst_low=dst_low,
        src_port=(ports >> 16).astype(np.int64),
        dst_port=(ports & 0xFFFF).astype(np.int64),
        seq=(sequence >> np.uint64(32)).astype(np.int64),
        ack=(sequence & np.uint64(0xFFFFFFFF)).astype(np.int64),
        flags=(offset_flags & 0xFF).astype(np.int64),
        payload_bytes=np.maximum(ip_payload - tcp_header, 0),
        other_packets=int(count - len(rows)),
        impossible_wire_lengths=int(impossible_wire.sum()),
        ip_lengths_beyond_wire=int(length_beyond_wire.sum()),
        encapsulation=np.zeros(len(rows), dtype=np.int64) if chain is None else chain[rows],
        not_tcp=not_tcp,
        not_decoded=not_decoded,
    )
