"""TCP flow and request→response turn analysis of a capture, vectorised per block.

Flow model (shared with the capture probe and `guardian-agent pcap`):
- A flow is one TCP connection: a 4-tuple, split again when the 4-tuple is reused (a SYN with a
  new initial sequence number after the tuple has carried packets starts a new flow; a
  retransmitted SYN does not). The client is the sender of the first SYN; failing that the
  receiver of a SYN-ACK; failing that (capture started mid-connection) the endpoint with the
  higher port.
- Handshake RTT is SYN → SYN-ACK as seen at the capture point (from a client-side capture this
  is the network round trip plus the server kernel's accept path).
- A retransmission is a data segment that starts below the highest sequence number already seen
  in its direction (TCP keep-alive probes excepted). Retransmitted segments do not open turns.
- A turn is a run of client payload packets followed by a run of server payload packets:
  latency = first server payload − first client payload after the previous server payload.
  Pipelined requests sent before any response therefore share one turn (their bytes add up).

Memory is flat in the number of packets: between blocks only per-live-flow state (counters,
sequence tracking, at most two pending runs) and bounded buffers are kept; the packets of a block
are dropped once analysed. Turns go to the output in batches; a flow's row is written once it is
finished (FIN both ways or RST, then a linger; a new connection on its tuple; idle too long; the
end of the capture), so the flows table comes out in finishing order. Per-flow latency p50/p99 are
exact nearest-rank values unless a flow holds more samples than the latency buffer allows, then
they come from a log-linear histogram (within 0.39%; see probes/latency_sketch.py). Beyond
`max_live_flows` new flows are folded into one "other" row (flow -1) and the summary counts them.
"""

from __future__ import annotations

import ipaddress
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from probes.base import finding, findings_table
from probes.flow_index import FOLDED, MISSING, FlowIndex, nonzero_hashes
from probes.latency_sketch import DEFAULT_BUFFER_SAMPLES, FlowLatencies
from probes.pcap_decap import add_counts, chain_name, count_chains, not_decoded_findings
from probes.pcap_reader import (MAXIMUM_WIRE_BYTES, CaptureCorrupt, CaptureReader, TcpHeaders, clamp_findings,
                                decode_tcp, linktype_name)

FLOWS_SCHEMA = pa.schema([
    pa.field("flow", pa.int64(), nullable=False),
    pa.field("client", pa.string()),
    pa.field("server", pa.string()),
    pa.field("client_addr", pa.string()),
    pa.field("client_port", pa.int32()),
    pa.field("server_addr", pa.string()),
    pa.field("server_port", pa.int32()),
    pa.field("ip_version", pa.int8()),
    pa.field("first_ts", pa.timestamp("us", tz="UTC")),
    pa.field("last_ts", pa.timestamp("us", tz="UTC")),
    pa.field("duration_ns", pa.int64()),
    pa.field("packets", pa.int64()),
    pa.field("bytes", pa.int64()),
    pa.field("client_packets", pa.int64()),
    pa.field("server_packets", pa.int64()),
    pa.field("client_payload_bytes", pa.int64()),
    pa.field("server_payload_bytes", pa.int64()),
    pa.field("handshake_rtt_ns", pa.int64()),
    pa.field("retransmits", pa.int64()),
    pa.field("client_retransmits", pa.int64()),
    pa.field("server_retransmits", pa.int64()),
    pa.field("resets", pa.int64()),
    pa.field("turns", pa.int64()),
    pa.field("unanswered_requests", pa.int64()),
    pa.field("latency_ns_p50", pa.int64()),
    pa.field("latency_ns_p99", pa.int64()),
    pa.field("latency_ns_max", pa.int64()),
    # Tunnels around the flow's first packet, outermost first ("vxlan", "mpls+gre"); null if none.
    pa.field("encapsulation", pa.string()),
])

TURNS_SCHEMA = pa.schema([
    pa.field("flow", pa.int64(), nullable=False),
    # `ts` in microseconds so every reader (to_pylist, datetime) takes it; `ts_ns` keeps the
    # capture's nanoseconds for those who need them.
    pa.field("ts", pa.timestamp("us", tz="UTC")),
    pa.field("ts_ns", pa.int64()),
    pa.field("latency_ns", pa.int64()),
    pa.field("request_bytes", pa.int64()),
    pa.field("response_bytes", pa.int64()),
    pa.field("request_packets", pa.int64()),
    pa.field("response_packets", pa.int64()),
    pa.field("response_duration_ns", pa.int64()),
])

SYN, ACK, RST, FIN = 0x02, 0x10, 0x04, 0x01
# Turns kept in memory before they go to the sink as one batch (~72 bytes each: 64k ≈ 4.6 MB;
# a Parquet row group each).
SPILL_ROWS = 1 << 16
TWO_32 = 1 << 32
HALF_32 = 1 << 31
# Multipliers for folding a flow key into one 64-bit value before the splitmix finaliser.
# Collisions are checked (and resolved exactly) after np.unique, so this only has to be fast.
_K1, _K2, _K3, _K4 = (np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F),
                      np.uint64(0x165667B19E3779F9), np.uint64(0x27D4EB2F165667C5))


def _splitmix(values: np.ndarray) -> np.ndarray:
    values = values ^ (values >> np.uint64(30))
    values = values * np.uint64(0xBF58476D1CE4E5B9)
    values = values ^ (values >> np.uint64(27))
    values = values * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def _group_starts(sorted_keys: np.ndarray) -> np.ndarray:
    if len(sorted_keys) == 0:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(([0], np.flatnonzero(sorted_keys[1:] != sorted_keys[:-1]) + 1))


def _factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(id per element in first-appearance order, index of each id's first element). Arrow's
    hash-based dictionary_encode is a factorize in that order: no sort (np.unique would sort
    every packet's key)."""
    import pyarrow.compute as pc

    ids = pc.dictionary_encode(pa.array(values)).indices.to_numpy(zero_copy_only=False).astype(np.int64)
    return ids, np.flatnonzero(np.diff(np.maximum.accumulate(ids), prepend=-1) > 0)


class _Columns:
    """Struct-of-arrays, one row per live flow slot (or per flow direction): typed numpy columns
    grown by half, compacted when flows retire (so memory follows the live flows)."""

    def __init__(self, spec: dict[str, tuple[type, int]]):
        self.spec = spec
        self.size = 0
        self.capacity = 0
        self.columns: dict[str, np.ndarray] = {name: np.zeros(0, dtype=dtype) for name, (dtype, _) in spec.items()}

    def ensure(self, size: int) -> None:
        # Half again, not double: at a million flows doubling left up to 2x idle capacity
        # (~220 MB) and a 3x transient while copying.
        if size > self.capacity:
            self._reallocate(max(size + size // 4, self.capacity + self.capacity // 2, 1024))

    def _reallocate(self, capacity: int) -> None:
        for name, column in self.columns.items():
            dtype, default = self.spec[name]
            grown = np.full(capacity, default, dtype=dtype)
            grown[: self.size] = column[: self.size]
            self.columns[name] = grown
        self.capacity = capacity

    def keep(self, rows: np.ndarray) -> None:
        """Keep `rows` (ascending) as rows 0..len(rows)-1; the rest return to their defaults."""
        old_size, size = self.size, len(rows)
        for name, column in self.columns.items():
            column[:size] = column[rows]
            column[size:old_size] = self.spec[name][1]
        self.size = size
        if self.capacity > 4096 and 4 * size < self.capacity:
            self._reallocate(max(2 * size, 1024))  # give memory back after a burst of flows

    def nbytes(self) -> int:
        return sum(column.nbytes for column in self.columns.values())

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]


# Per live flow slot (~200 bytes). `state` collects CLIENT_FIN | SERVER_FIN | RESET_SEEN | SUPERSEDED.
FLOW_COLUMNS: dict[str, tuple[type, int]] = {
    "flow": (np.int64, -1), "hash": (np.uint64, 0),
    "a_high": (np.uint64, 0), "a_low": (np.uint64, 0), "b_high": (np.uint64, 0), "b_low": (np.uint64, 0),
    "a_port": (np.uint16, 0), "b_port": (np.uint16, 0), "ip_version": (np.int8, 0),
    "client_is_a": (np.int8, 0), "state": (np.int8, 0),
    "first_ts": (np.int64, 0), "last_ts": (np.int64, 0), "packets": (np.int64, 0), "bytes": (np.int64, 0),
    "client_packets": (np.int64, 0), "client_payload": (np.int64, 0), "server_payload": (np.int64, 0),
    "syn_ts": (np.int64, -1), "synack_ts": (np.int64, -1), "resets": (np.int32, 0),
    "isn": (np.int64, -1),  # the client SYN's sequence number
    "turns": (np.int32, 0), "latency_min": (np.int64, np.iinfo(np.int64).max), "latency_max": (np.int64, -1),
    "encapsulation": (np.int64, 0),  # pcap_decap chain code of the flow's first packet
}
# Per flow direction (slot * 2 + from_client): sequence tracking across blocks.
DIRECTION_COLUMNS: dict[str, tuple[type, int]] = {
    "seq_base": (np.int64, -1), "last_relative": (np.int64, 0), "wraps": (np.int32, 0), "max_end": (np.int64, -1),
    "retransmits": (np.int32, 0),
}
CLIENT_FIN, SERVER_FIN, RESET_SEEN, SUPERSEDED = 1, 2, 4, 8
OTHER_FLOW = -1  # the `flows` row of the flows folded away beyond the live-flow cap


@dataclass
class FlowLimits:
    """When a flow's row is written and its state dropped, and how many flows live at once."""
    # A busy host's live connections; each live flow costs ~270 bytes (measured: bench_pcap.py).
    max_live_flows: int = 1_000_000
    # A flow silent this long (capture time) is finished; a later packet on its tuple starts a
    # new flow row. Heartbeats on trading sessions come every few seconds to a minute.
    idle_timeout_s: float = 900.0
    # After FIN both ways or a RST: the last ACK and retransmitted FINs come within RTOs.
    close_linger_s: float = 10.0
    latency_buffer_samples: int = DEFAULT_BUFFER_SAMPLES
    turn_batch_rows: int = SPILL_ROWS


# Finished flows are written out once this many have piled up (or an eighth of the live ones),
# checked at most once per second of capture time.
RETIRE_MIN_FLOWS = 4096
RETIRE_CHECK_NS = 1_000_000_000
# Finished flows' rows are handed to the sink this many at a time (one Parquet row group each).
FLOW_BATCH_ROWS = 1 << 16


@dataclass
class _Runs:
    flow: np.ndarray  # live slot
    from_client: np.ndarray  # bool
    first_ts: np.ndarray
    last_ts: np.ndarray
    payload_bytes: np.ndarray
    packets: np.ndarray

    @classmethod
    def empty(cls) -> "_Runs":
        zero = np.zeros(0, dtype=np.int64)
        return cls(zero, np.zeros(0, dtype=bool), zero, zero, zero, zero)

    def take(self, index: np.ndarray) -> "_Runs":
        return _Runs(self.flow[index], self.from_client[index], self.first_ts[index], self.last_ts[index],
                     self.payload_bytes[index], self.packets[index])

    @staticmethod
    def concat(first: "_Runs", second: "_Runs") -> "_Runs":
        return _Runs(*(np.concatenate((a, b)) for a, b in zip(
            (first.flow, first.from_client, first.first_ts, first.last_ts, first.payload_bytes, first.packets),
            (second.flow, second.from_client, second.first_ts, second.last_ts, second.payload_bytes,
             second.packets))))

    def nbytes(self) -> int:
        return sum(array.nbytes for array in (self.flow, self.from_client, self.first_ts, self.last_ts,
                                              self.payload_bytes, self.packets))

    def __len__(self) -> int:
        return len(self.flow)


@dataclass
class CaptureSummary:
    path: str = ""
    format: str = ""
    packets: int = 0
    tcp_packets: int = 0
    other_packets: int = 0
    impossible_wire_lengths: int = 0
    ip_lengths_beyond_wire: int = 0
    not_tcp: dict[str, int] = field(default_factory=dict)  # packets by kind (ARP, UDP...)
    not_decoded: dict[str, int] = field(default_factory=dict)  # packets that may hide TCP, by reason
    encapsulations: dict[str, int] = field(default_factory=dict)  # TCP packets by tunnel chain
    clamped: dict[str, int] = field(default_factory=dict)  # CaptureReader.clamps
    flows: int = 0
    turns: int = 0
    seconds: float = 0.0
    partial: bool = False
    error: str = ""
    error_offset: int | None = None
    linktypes: list[str] = field(default_factory=list)
    max_live_flows: int = 0
    peak_live_flows: int = 0
    folded_flows: int = 0
    folded_packets: int = 0
    # Flows whose latency_ns_p50/p99 come from the log-linear histogram (within 0.39%).
    sketched_latency_flows: int = 0
    turn_latency_ns_p50: int = -1
    turn_latency_ns_p99: int = -1

    def as_dict(self) -> dict:
        return {key: value for key, value in self.__dict__.items()}


class _TurnStore:
    """Where turn batches go when the caller gives no sink: memory, or an Arrow IPC spill file
    memory-mapped at the end (the capture probe: its ring bounds the capture anyway)."""

    def __init__(self, spill_dir: Path | None):
        self.spill_dir = spill_dir
        self.batches: list[pa.Table] = []
        self.spill_path: Path | None = None
        self._writer = None

    def write(self, table: pa.Table) -> None:
        if self.spill_dir is None:
            self.batches.append(table)
            return
        if self._writer is None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self.spill_path = self.spill_dir / f".turns-spill-{os.getpid()}-{id(self)}.arrow"
            self._writer = pa.ipc.new_file(str(self.spill_path), TURNS_SCHEMA)
        self._writer.write_table(table)

    def table(self) -> pa.Table:
        if self._writer is None:
            turns = pa.concat_tables(self.batches) if self.batches else TURNS_SCHEMA.empty_table()
            self.batches = []
            # Batches are in completion order with a flow's turns in time order: a stable sort
            # by flow gives flow, then time order.
            return turns.take(np.argsort(turns.column("flow").to_numpy(), kind="stable"))
        self._writer.close()
        # Memory-mapped and unlinked at once: the pages come from the file (evictable page
        # cache) and the file vanishes when the table is released. Completion order, not sorted.
        spilled = pa.ipc.open_file(pa.memory_map(str(self.spill_path))).read_all()
        self.spill_path.unlink(missing_ok=True)
        return spilled


class FlowAnalyzer:
    """Feed TcpHeaders blocks in file order; finished flows and their turns go to the sinks in
    batches as the capture goes (`finish()` ends every flow still open), or, without sinks,
    `tables()` gives flows and turns in memory.

    State is per live flow only (struct-of-arrays columns plus a numpy hash index, ~270 bytes a
    flow) and bounded buffers (turn batches, latency samples), never per packet: a flow closed by
    FIN both ways or RST (after `close_linger_s`), superseded by a new connection on its tuple,
    or idle for `idle_timeout_s` is written out and its slot freed. Beyond `max_live_flows` new
    flows are folded into one "other" row (flow -1) and counted."""

    def __init__(self, spill_dir: Path | None = None, spill_rows: int = SPILL_ROWS,
                 limits: FlowLimits | None = None,
                 flow_sink: Callable[[pa.Table], None] | None = None,
                 turn_sink: Callable[[pa.Table], None] | None = None) -> None:
        """spill_dir: without a turn_sink, turns beyond `spill_rows` go to an Arrow IPC file
        there instead of memory; flow_sink/turn_sink: callables taking each batch (pa.Table)."""
        self.limits = limits or FlowLimits(turn_batch_rows=spill_rows)
        self.flows = _Columns(FLOW_COLUMNS)
        self.directions = _Columns(DIRECTION_COLUMNS)
        self.index = FlowIndex()
        self.next_flow = 0
        self.pending = _Runs.empty()
        self.latencies = FlowLatencies(self.limits.latency_buffer_samples)
        self.all_latencies = FlowLatencies(self.limits.latency_buffer_samples)  # the capture's, as flow 0
        self.latency_extremes = [np.iinfo(np.int64).max, -1]
        self.clock_ns: int | None = None
        self._checked_ns = 0
        self.peak_live_flows = 0
        self.folded_flows = self.folded_packets = self.folded_bytes = 0
        self.folded_ts = [np.iinfo(np.int64).max, -1]
        self.flows_written = self.turns_written = 0
        self._flow_batches: list[pa.Table] = []
        self.flow_sink = flow_sink or self._flow_batches.append
        self._flow_rows_pending: list[pa.Table] = []  # finished flows' rows not yet sent (small batches)
        self._flow_rows_pending_count = 0
        self._turn_store = None if turn_sink is not None else _TurnStore(
            Path(spill_dir) if spill_dir is not None else None)
        self.turn_sink = turn_sink or self._turn_store.write
        self.turn_parts: list[tuple[np.ndarray, ...]] = []
        self.turn_rows_in_memory = 0
        self.finished = False

    def state_nbytes(self) -> int:
        """Bytes of numpy state the analyser holds between blocks (flows, index, buffers)."""
        return (self.flows.nbytes() + self.directions.nbytes() + self.index.nbytes() + self.pending.nbytes()
                + self.latencies.nbytes() + self.all_latencies.nbytes()
                + sum(array.nbytes for part in self.turn_parts for array in part)
                + sum(table.nbytes for table in self._flow_rows_pending))

    # -- flow identity -----------------------------------------------------------------------
    def _flow_ids(self, headers: TcpHeaders, syn: np.ndarray):
        """Per packet: src_is_a and the block-local connection id (in order of first
        appearance); per connection its live slot (or FOLDED), plus the connections given a new
        slot in this block and each connection's first packet."""
        src_is_a = (headers.src_high < headers.dst_high) | (
            (headers.src_high == headers.dst_high) & (
                (headers.src_low < headers.dst_low)
                | ((headers.src_low == headers.dst_low) & (headers.src_port <= headers.dst_port))))
        v6 = bool(headers.src_high.any() or headers.dst_high.any())
        a_low = np.where(src_is_a, headers.src_low, headers.dst_low)
        b_low = np.where(src_is_a, headers.dst_low, headers.src_low)
        ports = ((np.where(src_is_a, headers.src_port, headers.dst_port) << 16)
                 | np.where(src_is_a, headers.dst_port, headers.src_port)).astype(np.uint64)
        folded = a_low ^ (b_low * _K1) ^ (ports * _K2)
        if v6:
            a_high = np.where(src_is_a, headers.src_high, headers.dst_high)
            b_high = np.where(src_is_a, headers.dst_high, headers.src_high)
            folded ^= (a_high * _K3) ^ (b_high * _K4)
        else:
            a_high = b_high = headers.src_high  # all zero
        tuple_hash = nonzero_hashes(_splitmix(folded))
        local, first_index = _factorize(tuple_hash)
        representative = first_index[local]
        collided = (a_low != a_low[representative]) | (b_low != b_low[representative]) | (
            ports != ports[representative])
        if v6:
            collided |= (a_high != a_high[representative]) | (b_high != b_high[representative])
        if collided.any():  # astronomically rare: fall back to an exact (slower) unique
            exact = np.rec.fromarrays([a_high, a_low, b_high, b_low, ports])
            _, first_index, local = np.unique(exact, return_index=True, return_inverse=True)
            local = local.ravel()
            remap = np.empty(len(first_index), dtype=np.int64)
            appearance = np.argsort(first_index, kind="stable")
            remap[appearance] = np.arange(len(first_index))
            local, first_index = remap[local], first_index[appearance]
        keys = {"hash": tuple_hash[first_index], "a_high": a_high[first_index], "a_low": a_low[first_index],
                "b_high": b_high[first_index], "b_low": b_low[first_index],
                "a_port": (ports[first_index] >> np.uint64(16)).astype(np.uint16),
                "b_port": (ports[first_index] & np.uint64(0xFFFF)).astype(np.uint16),
                "ip_version": headers.ip_version[first_index].astype(np.int8)}
        if self.flows.size + len(first_index) > self.limits.max_live_flows:
            self._retire(force=True)  # make room before folding anything
        existing, positions = self.index.lookup(keys["hash"], lambda slots, which: self._same_tuple(
            slots, {name: column[which] for name, column in keys.items()}))
        local, first_index, tuple_of, reuse = self._connections(headers, syn, local, first_index, existing)
        connection_slot = existing[tuple_of]
        is_new = (connection_slot == MISSING) | (reuse & (connection_slot != FOLDED))
        new_connections = np.flatnonzero(is_new)
        connection_slot = np.where(is_new, MISSING, connection_slot)
        free = max(self.limits.max_live_flows - self.flows.size, 0)
        granted, refused = new_connections[:free], new_connections[free:]
        connection_slot[granted] = self._allocate({name: column[tuple_of[granted]] for name, column in keys.items()})
        connection_slot[refused] = FOLDED
        self.folded_flows += len(refused)
        if len(new_connections):
            self._index_connections(new_connections, tuple_of, connection_slot, existing, positions, keys["hash"])
        return src_is_a, local, connection_slot, granted, first_index

    def _same_tuple(self, slots: np.ndarray, keys: dict[str, np.ndarray]) -> np.ndarray:
        flows = self.flows
        same = np.ones(len(slots), dtype=bool)
        for name in ("a_low", "b_low", "a_port", "b_port", "a_high", "b_high"):
            same &= flows[name][slots] == keys[name]
        return same

    def _allocate(self, keys: dict[str, np.ndarray]) -> np.ndarray:
        count, start = len(keys["hash"]), self.flows.size
        self.flows.ensure(start + count)
        self.directions.ensure(2 * (start + count))
        self.flows.size += count
        self.directions.size += 2 * count
        self.peak_live_flows = max(self.peak_live_flows, self.flows.size)
        slots = np.arange(start, start + count)
        for name, column in keys.items():
            self.flows[name][slots] = column
        self.flows["flow"][slots] = np.arange(self.next_flow, self.next_flow + count)
        self.next_flow += count
        return slots

    def _index_connections(self, new_connections, tuple_of, connection_slot, existing, positions, hashes) -> None:
        """Point each tuple at its newest connection; older connections of a tuple that got a new
        one are superseded (no packet can reach them any more: they retire at the next check)."""
        tuples = tuple_of[new_connections]
        order = np.argsort(tuples, kind="stable")
        last = np.ones(len(order), dtype=bool)
        last[:-1] = tuples[order][1:] != tuples[order][:-1]
        newest = new_connections[order[last]]
        older = connection_slot[new_connections[order[~last]]]
        target_tuples = tuple_of[newest]
        replaced = existing[target_tuples]
        superseded = np.concatenate((older[older >= 0], replaced[replaced >= 0]))
        self.flows["state"][superseded] |= SUPERSEDED
        targets = connection_slot[newest]
        known = positions[target_tuples] >= 0
        self.index.set_at(positions[target_tuples][known], targets[known])
        self.index.insert(hashes[target_tuples][~known], targets[~known])

    def _connections(self, headers: TcpHeaders, syn: np.ndarray, local, first_index, existing):
        """Split block-local 4-tuples into connections where a tuple is reused: a SYN whose
        sequence number differs from the SYN of the tuple's current connection (or that follows
        packets of a connection whose SYN was never seen) starts a new one. Returns per packet the
        block-local connection id (first-appearance order) and per connection its first packet,
        its tuple (index into the block's tuples) and whether it is a new connection on a tuple
        in use. Folded tuples stay one folded connection."""
        syn_packets = np.flatnonzero(syn)
        no_reuse = np.zeros(len(first_index), dtype=bool)
        if not len(syn_packets):
            return local, first_index, np.arange(len(first_index), dtype=np.int64), no_reuse
        isn_of, seq = self.flows["isn"], headers.seq
        current: dict[int, int] = {}  # tuple id -> sequence number of its current connection's SYN
        reusing = []
        # SYNs are few next to data packets: a Python loop over them only.
        for i in syn_packets.tolist():
            tuple_id = int(local[i])
            isn = int(seq[i])
            known = current.get(tuple_id)
            if known is None:
                slot = int(existing[tuple_id])
                if slot == FOLDED:
                    continue
                if slot == MISSING:  # a tuple new in this block
                    current[tuple_id] = isn
                    if first_index[tuple_id] < i:  # after packets of a connection already under way
                        reusing.append(i)
                    continue
                known = int(isn_of[slot])
            if known != isn:  # not a retransmitted SYN: a new connection on this tuple
                current[tuple_id] = isn
                reusing.append(i)
        if not reusing:
            return local, first_index, np.arange(len(first_index), dtype=np.int64), no_reuse
        # Each packet's count of reusing SYNs at or before it on its tuple: its connection there.
        count = len(local)
        starts_here = np.zeros(count, dtype=np.int64)
        starts_here[reusing] = 1
        order = np.argsort(local, kind="stable")
        group_starts = _group_starts(local[order])
        running = np.cumsum(starts_here[order])
        before = running[group_starts] - starts_here[order][group_starts]
        generation = np.empty(count, dtype=np.int64)
        generation[order] = running - np.repeat(before, np.diff(np.append(group_starts, count)))
        connection, first = _factorize(local * (int(generation.max()) + 1) + generation)
        return connection, first, local[first], generation[first] > 0

    # -- one block ------------------------------------------------------------------------------
    def add(self, headers: TcpHeaders) -> None:
        if len(headers.ts_ns) == 0:
            return
        flags = headers.flags
        syn = (flags & (SYN | ACK)) == SYN
        synack = (flags & (SYN | ACK)) == (SYN | ACK)
        src_is_a, local, connection_slot, new_locals, first_index = self._flow_ids(headers, syn)
        ts = headers.ts_ns
        if len(new_locals):
            self._decide_clients(local, connection_slot, new_locals, first_index, src_is_a, syn, synack)
            self.flows["first_ts"][connection_slot[new_locals]] = ts[first_index[new_locals]]
            self.flows["encapsulation"][connection_slot[new_locals]] = headers.encapsulation[first_index[new_locals]]
        packet_slot = connection_slot[local]
        payload, wire_bytes, seq = headers.payload_bytes, headers.wire_bytes, headers.seq
        folded = packet_slot < 0
        if folded.any():
            self._fold(ts[folded], wire_bytes[folded])
            kept = np.flatnonzero(~folded)
            ts, flags, payload, wire_bytes, seq = ts[kept], flags[kept], payload[kept], wire_bytes[kept], seq[kept]
            src_is_a, local, syn, synack, packet_slot = (src_is_a[kept], local[kept], syn[kept], synack[kept],
                                                         packet_slot[kept])
            if not len(kept):
                self._tick(headers.ts_ns)
                return
        flows = self.flows
        from_client = src_is_a == flows["client_is_a"][packet_slot].astype(bool)

        # One stable sort by (connection, direction) serves every per-direction reduction.
        # Block-local ids are small, so the key usually fits 16 bits and numpy's stable sort is a
        # radix sort.
        group_local = local * 2 + from_client
        key = group_local.astype(np.uint16) if 2 * len(connection_slot) <= 0xFFFF else group_local
        order = np.argsort(key, kind="stable")
        sorted_group = group_local[order]
        starts = _group_starts(sorted_group)
        group_ids = sorted_group[starts]
        group_flow = connection_slot[group_ids >> 1]
        group_client = (group_ids & 1).astype(bool)
        group_packets = np.diff(np.append(starts, len(order)))
        sorted_ts = ts[order]
        np.add.at(flows["packets"], group_flow, group_packets)
        np.add.at(flows["bytes"], group_flow, np.add.reduceat(wire_bytes[order], starts))
        np.add.at(flows["client_packets"], group_flow, np.where(group_client, group_packets, 0))
        group_payload = np.add.reduceat(payload[order], starts)
        np.add.at(flows["client_payload"], group_flow, np.where(group_client, group_payload, 0))
        np.add.at(flows["server_payload"], group_flow, np.where(group_client, 0, group_payload))
        np.add.at(flows["resets"], group_flow, np.add.reduceat((flags[order] & RST) != 0, starts).astype(np.int32))
        np.maximum.at(flows["last_ts"], group_flow, np.maximum.reduceat(sorted_ts, starts))
        self._closing(packet_slot, from_client, flags)

        self._handshakes(packet_slot, from_client, syn, synack, ts)
        syn_slots = packet_slot[syn]
        unset = flows["isn"][syn_slots] == -1
        flows["isn"][syn_slots[unset]] = seq[syn][unset]
        retransmitted = self._retransmissions(order, starts, group_flow * 2 + group_client, seq, payload, flags)
        self._turns(local, connection_slot, from_client, payload, ts, retransmitted)
        self._tick(headers.ts_ns)

    def _tick(self, ts: np.ndarray) -> None:
        latest = int(ts.max())
        self.clock_ns = latest if self.clock_ns is None else max(self.clock_ns, latest)
        if (self.clock_ns - self._checked_ns >= RETIRE_CHECK_NS
                or self.flows.size >= self.limits.max_live_flows):
            self._checked_ns = self.clock_ns
            self._retire(force=False)

    def _fold(self, ts: np.ndarray, wire_bytes: np.ndarray) -> None:
        self.folded_packets += len(ts)
        self.folded_bytes += int(wire_bytes.sum())
        self.folded_ts = [min(self.folded_ts[0], int(ts.min())), max(self.folded_ts[1], int(ts.max()))]

    def _closing(self, slot: np.ndarray, from_client: np.ndarray, flags: np.ndarray) -> None:
        for mask, bits in (((flags & FIN) != 0, np.where(from_client, CLIENT_FIN, SERVER_FIN)),
                           ((flags & RST) != 0, np.full(len(slot), RESET_SEEN))):
            if mask.any():
                np.bitwise_or.at(self.flows["state"], slot[mask], bits[mask].astype(np.int8))

    def _decide_clients(self, local, connection_slot, new_locals, first_index, src_is_a, syn, synack) -> None:
        """Client side of each new flow: SYN sender, else SYN-ACK receiver, else higher port."""
        decided = np.full(len(connection_slot), -1, dtype=np.int64)
        for mask, sender_is_client in ((synack, False), (syn, True)):  # later wins: SYN first
            rows = np.flatnonzero(mask)
            if len(rows) == 0:
                continue
            flows_with, first = np.unique(local[rows], return_index=True)
            sender_is_a = src_is_a[rows[first]]
            decided[flows_with] = np.where(sender_is_a == sender_is_client, 1, 0)
        choice = decided[new_locals]
        slots = connection_slot[new_locals]
        a_port = self.flows["a_port"][slots].astype(np.int64)
        b_port = self.flows["b_port"][slots].astype(np.int64)
        by_port = np.where(a_port != b_port, a_port > b_port, src_is_a[first_index[new_locals]])
        self.flows["client_is_a"][slots] = np.where(choice >= 0, choice, by_port.astype(np.int64))

    def _handshakes(self, flow, from_client, syn, synack, ts) -> None:
        flows = self.flows
        for mask, column in ((syn & from_client, "syn_ts"), (synack & ~from_client, "synack_ts")):
            rows = np.flatnonzero(mask)
            if len(rows) == 0:
                continue
            ids, first = np.unique(flow[rows], return_index=True)
            unset = flows[column][ids] < 0
            flows[column][ids[unset]] = ts[rows[first]][unset]

    def _retransmissions(self, order, starts, ids, seq, payload, flags) -> np.ndarray:
        """Mark data segments that start below the highest sequence already seen (per direction).
        `order` sorts the block by direction group; `ids` are the groups' direction slots."""
        directions = self.directions
        seq = seq[order]
        payload = payload[order]
        flags = flags[order]
        size = len(order)
        group_rank = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, size)))

        base = directions["seq_base"][ids]
        unset = base < 0
        base = np.where(unset, seq[starts], base)
        directions["seq_base"][ids] = base
        relative = (seq - base[group_rank]) & (TWO_32 - 1)
        # Unwrap 32-bit sequence numbers (flows moving > 2 GiB) step by step within a group.
        previous = np.empty(size, dtype=np.int64)
        previous[1:] = relative[:-1]
        previous[starts] = np.where(unset, relative[starts], directions["last_relative"][ids])
        delta = relative - previous
        step = (delta < -HALF_32).astype(np.int64) - (delta > HALF_32).astype(np.int64)
        steps = np.cumsum(step)
        steps_before_group = steps[starts] - step[starts]
        wraps = directions["wraps"][ids][group_rank] + steps - steps_before_group[group_rank]
        unwrapped = relative + wraps * TWO_32
        consumed = payload + ((flags & (SYN | FIN)) != 0)
        end = unwrapped + consumed
        # Segmented running max: lift each group above the previous one so one accumulate works.
        lift = group_rank.astype(np.int64) << 42
        shifted = np.where(consumed > 0, end, -1) + (1 << 41)
        running = np.maximum.accumulate(shifted + lift) - lift - (1 << 41)
        previous_max = np.empty(size, dtype=np.int64)
        previous_max[1:] = running[:-1]
        previous_max[starts] = -1
        previous_max = np.maximum(previous_max, directions["max_end"][ids][group_rank])
        keepalive = (payload <= 1) & (unwrapped == previous_max - 1)
        retransmitted_sorted = (payload > 0) & (unwrapped < previous_max) & ~keepalive & ((flags & RST) == 0)

        group_ends = np.append(starts[1:], size) - 1
        directions["last_relative"][ids] = relative[group_ends]
        directions["wraps"][ids] = wraps[group_ends]
        directions["max_end"][ids] = np.maximum(directions["max_end"][ids], running[group_ends])
        directions["retransmits"][ids] += np.add.reduceat(retransmitted_sorted.astype(np.int32), starts)
        retransmitted = np.empty(size, dtype=bool)
        retransmitted[order] = retransmitted_sorted
        return retransmitted

    def _turns(self, local, connection_slot, from_client, payload, ts, retransmitted) -> None:
        data = np.flatnonzero((payload > 0) & ~retransmitted)
        if len(data) == 0:
            return
        key = local[data]
        key = key.astype(np.uint16) if len(connection_slot) <= 0xFFFF else key
        data = data[np.argsort(key, kind="stable")]
        run_flow = connection_slot[local[data]]
        run_client = from_client[data]
        boundary = np.ones(len(data), dtype=bool)
        boundary[1:] = (run_flow[1:] != run_flow[:-1]) | (run_client[1:] != run_client[:-1])
        starts = np.flatnonzero(boundary)
        data_ts = ts[data]
        runs = _Runs(
            flow=run_flow[starts], from_client=run_client[starts], first_ts=data_ts[starts],
            last_ts=np.maximum.reduceat(data_ts, starts),
            payload_bytes=np.add.reduceat(payload[data], starts),
            packets=np.diff(np.append(starts, len(data))),
        )
        runs = self._merge_runs(_Runs.concat(self.pending, runs))
        self.pending, _ = self._emit_turns(runs, final=False)

    @staticmethod
    def _merge_runs(runs: _Runs) -> _Runs:
        order = np.argsort(runs.flow, kind="stable")
        runs = runs.take(order)
        boundary = np.ones(len(runs), dtype=bool)
        boundary[1:] = (runs.flow[1:] != runs.flow[:-1]) | (runs.from_client[1:] != runs.from_client[:-1])
        if boundary.all():
            return runs
        starts = np.flatnonzero(boundary)
        return _Runs(runs.flow[starts], runs.from_client[starts], runs.first_ts[starts],
                     np.maximum.reduceat(runs.last_ts, starts), np.add.reduceat(runs.payload_bytes, starts),
                     np.add.reduceat(runs.packets, starts))

    def _emit_turns(self, runs: _Runs, final: bool) -> tuple[_Runs, np.ndarray]:
        """Emit complete turns; return the runs still open (to be extended by the next block)
        and, when final, the slots whose last run is a request left without a response."""
        size = len(runs)
        none = np.zeros(0, dtype=np.int64)
        if size == 0:
            return runs, none
        same_next = np.zeros(size, dtype=bool)
        same_next[:-1] = runs.flow[1:] == runs.flow[:-1]
        is_last = ~same_next
        pair = np.zeros(size, dtype=bool)
        pair[:-1] = runs.from_client[:-1] & same_next[:-1] & ~runs.from_client[1:]
        if final:
            emit = pair
            keep = np.zeros(size, dtype=bool)
        else:
            response_open = np.zeros(size, dtype=bool)
            response_open[:-1] = is_last[1:]
            emit = pair & ~response_open
            keep = is_last | (pair & response_open)
        rows = np.flatnonzero(emit)
        if len(rows):
            self._record_turns(runs, rows)
        unanswered = runs.flow[is_last & runs.from_client] if final else none
        return runs.take(np.flatnonzero(keep)), unanswered

    def _record_turns(self, runs: _Runs, rows: np.ndarray) -> None:
        slots = runs.flow[rows]
        flow_ids = self.flows["flow"][slots]
        latency = runs.first_ts[rows + 1] - runs.first_ts[rows]
        flows = self.flows
        # Runs are sorted by slot, so each slot's turns are contiguous: reduce per group.
        starts = _group_starts(slots)
        group_slots = slots[starts]
        flows["turns"][group_slots] += np.diff(np.append(starts, len(slots))).astype(np.int32)
        flows["latency_min"][group_slots] = np.minimum(flows["latency_min"][group_slots],
                                                       np.minimum.reduceat(latency, starts))
        flows["latency_max"][group_slots] = np.maximum(flows["latency_max"][group_slots],
                                                       np.maximum.reduceat(latency, starts))
        self.latencies.add(flow_ids, latency)
        self.all_latencies.add(np.zeros(len(latency), dtype=np.int64), latency)
        self.latency_extremes = [min(self.latency_extremes[0], int(latency.min())),
                                 max(self.latency_extremes[1], int(latency.max()))]
        self.turn_rows_in_memory += len(rows)
        self.turn_parts.append((
            flow_ids, runs.first_ts[rows], latency, runs.payload_bytes[rows], runs.payload_bytes[rows + 1],
            runs.packets[rows], runs.packets[rows + 1], runs.last_ts[rows + 1] - runs.first_ts[rows + 1],
        ))
        if self.turn_rows_in_memory >= self.limits.turn_batch_rows:
            self._flush_turns()

    def _flush_turns(self) -> None:
        if not self.turn_parts:
            return
        turn_flow, turn_ts, latency, request_bytes, response_bytes, request_packets, response_packets, \
            response_duration = [np.concatenate(part) for part in zip(*self.turn_parts)]
        self.turn_parts, self.turn_rows_in_memory = [], 0
        self.turns_written += len(turn_flow)
        self.turn_sink(pa.table({
            "flow": turn_flow, "ts": pa.array(turn_ts // 1000, pa.timestamp("us", tz="UTC")), "ts_ns": turn_ts,
            "latency_ns": latency, "request_bytes": request_bytes, "response_bytes": response_bytes,
            "request_packets": request_packets, "response_packets": response_packets,
            "response_duration_ns": response_duration,
        }, schema=TURNS_SCHEMA))

    # -- finished flows -------------------------------------------------------------------------
    def _retire(self, force: bool) -> None:
        """Write the rows of finished flows, finish their turns and free their slots."""
        size = self.flows.size
        if size == 0:
            return
        done = self._finished(size)
        count = int(done.sum())
        if count == 0 or (not force and count < min(RETIRE_MIN_FLOWS, max(size // 8, 1))):
            return
        in_done = done[self.pending.flow]
        finishing = self.pending.take(np.flatnonzero(in_done))
        self.pending = self.pending.take(np.flatnonzero(~in_done))
        _, unanswered_slots = self._emit_turns(finishing, final=True)
        slots = np.flatnonzero(done)
        unanswered = np.zeros(size, dtype=np.int64)
        unanswered[unanswered_slots] = 1
        self._write_flows(slots, unanswered[slots])
        kept = np.flatnonzero(~done)
        renumber = np.full(size, -1, dtype=np.int64)
        renumber[kept] = np.arange(len(kept))
        self.pending.flow = renumber[self.pending.flow]
        self.flows.keep(kept)
        self.directions.keep((kept[:, None] * 2 + np.arange(2)).ravel())
        live = np.arange(len(kept))
        self.index.rebuild(self.flows["hash"][live], live)

    def _finished(self, size: int) -> np.ndarray:
        flows, limits, clock = self.flows, self.limits, self.clock_ns or 0
        state = flows["state"][:size]
        last = flows["last_ts"][:size]
        closed = ((state & (CLIENT_FIN | SERVER_FIN)) == (CLIENT_FIN | SERVER_FIN)) | ((state & RESET_SEEN) != 0)
        return (((state & SUPERSEDED) != 0)
                | (closed & (last <= clock - int(limits.close_linger_s * 1e9)))
                | (last <= clock - int(limits.idle_timeout_s * 1e9)))

    def _write_flows(self, slots: np.ndarray, unanswered: np.ndarray) -> None:
        flows = self.flows
        p50, p99 = self.latencies.pop_quantiles(flows["flow"][slots], flows["latency_min"][slots],
                                                flows["latency_max"][slots])
        # Rows in batches: a row's strings cost ~250 bytes while its batch is being built.
        for start in range(0, len(slots), FLOW_BATCH_ROWS):
            end = start + FLOW_BATCH_ROWS
            self._write_flow_batch(slots[start:end], unanswered[start:end], p50[start:end], p99[start:end])

    def _write_flow_batch(self, slots, unanswered, p50, p99) -> None:
        self.flows_written += len(slots)
        self._flow_rows_pending.append(_flow_rows(self.flows, self.directions, slots, unanswered, p50, p99))
        self._flow_rows_pending_count += len(slots)
        if self._flow_rows_pending_count >= FLOW_BATCH_ROWS:
            self._flush_flows()

    def _retire_all(self) -> None:
        """The end of the capture: every live flow, batch by batch (pending runs are sorted by
        slot), without the copies and renumbering a partial retirement needs."""
        flows, size = self.flows, self.flows.size
        pending, self.pending = self.pending, _Runs.empty()
        if size == 0:
            return
        # Final turns first (they add latency samples), then one quantile pass, then the rows.
        edges = np.searchsorted(pending.flow, np.arange(0, size + FLOW_BATCH_ROWS, FLOW_BATCH_ROWS))
        unanswered = np.zeros(size, dtype=np.int64)
        for batch in range(len(edges) - 1):
            _, unanswered_slots = self._emit_turns(pending.take(slice(edges[batch], edges[batch + 1])), final=True)
            unanswered[unanswered_slots] = 1
        del pending
        p50, p99 = self.latencies.pop_quantiles(flows["flow"][:size], flows["latency_min"][:size],
                                                flows["latency_max"][:size])
        for start in range(0, size, FLOW_BATCH_ROWS):
            end = min(start + FLOW_BATCH_ROWS, size)
            self._write_flow_batch(np.arange(start, end), unanswered[start:end], p50[start:end], p99[start:end])
        flows.keep(np.zeros(0, dtype=np.int64))
        self.directions.keep(np.zeros(0, dtype=np.int64))
        self.index.rebuild(np.zeros(0, dtype=np.uint64), np.zeros(0, dtype=np.int64))

    def _flush_flows(self) -> None:
        if self._flow_rows_pending:
            self.flow_sink(pa.concat_tables(self._flow_rows_pending))
        self._flow_rows_pending, self._flow_rows_pending_count = [], 0

    def finish(self) -> None:
        """End every open flow (the capture is over) and flush what is still buffered."""
        if self.finished:
            return
        self.finished = True
        self._retire_all()
        self._flush_turns()
        if self.folded_packets:
            self.flows_written += 1
            self._flow_rows_pending.append(self._other_row())
        self._flush_flows()

    def turn_latency_quantiles(self) -> tuple[int, int]:
        """The capture's turn latency p50 and p99 (exact up to the latency buffer, then 0.39%)."""
        p50, p99 = self.all_latencies.pop_quantiles(
            np.zeros(1, dtype=np.int64), np.array([self.latency_extremes[0]]), np.array([self.latency_extremes[1]]))
        return int(p50[0]), int(p99[0])

    def _other_row(self) -> pa.Table:
        row = {name: [None] for name in FLOWS_SCHEMA.names}
        row.update({
            "flow": [OTHER_FLOW], "client": ["other"], "server": ["other"],
            "first_ts": [self.folded_ts[0] // 1000], "last_ts": [self.folded_ts[1] // 1000],
            "duration_ns": [self.folded_ts[1] - self.folded_ts[0]], "packets": [self.folded_packets],
            "bytes": [self.folded_bytes], "turns": [0],
        })
        return pa.table(row, schema=FLOWS_SCHEMA)

    def tables(self) -> tuple[pa.Table, pa.Table]:
        """flows (by flow id) and turns, when no sinks were given."""
        self.finish()
        flows = pa.concat_tables(self._flow_batches) if self._flow_batches else FLOWS_SCHEMA.empty_table()
        self._flow_batches.clear()
        flows = flows.take(np.argsort(flows.column("flow").to_numpy(), kind="stable"))
        turns = self._turn_store.table() if self._turn_store is not None else TURNS_SCHEMA.empty_table()
        return flows, turns


def _flow_rows(flows: _Columns, directions: _Columns, slots: np.ndarray, unanswered: np.ndarray,
               p50: np.ndarray, p99: np.ndarray) -> pa.Table:
    """The `flows` rows of the given live slots."""
    def column(name: str) -> np.ndarray:
        return flows[name][slots]

    import pyarrow.compute as pc

    client_is_a = column("client_is_a").astype(bool)
    version = column("ip_version")
    a_addr = _address_strings(column("a_high"), column("a_low"), version)
    b_addr = _address_strings(column("b_high"), column("b_low"), version)
    client_is_a_array = pa.array(client_is_a)
    client_addr = pc.if_else(client_is_a_array, a_addr, b_addr)
    server_addr = pc.if_else(client_is_a_array, b_addr, a_addr)
    a_port, b_port = column("a_port").astype(np.int32), column("b_port").astype(np.int32)
    client_port = np.where(client_is_a, a_port, b_port)
    server_port = np.where(client_is_a, b_port, a_port)
    is_v6 = version != 4
    client_text = _endpoint_strings(client_addr, client_port, is_v6)
    server_text = _endpoint_strings(server_addr, server_port, is_v6)
    retransmits = directions["retransmits"].astype(np.int64, copy=False)
    client_retransmits = retransmits[slots * 2 + 1]
    server_retransmits = retransmits[slots * 2]
    syn_ts, synack_ts = column("syn_ts"), column("synack_ts")
    handshake = np.where((syn_ts >= 0) & (synack_ts >= syn_ts), synack_ts - syn_ts, -1)
    turns = column("turns").astype(np.int64)
    maximum = np.where(turns > 0, column("latency_max"), -1)

    def nullable(values: np.ndarray) -> pa.Array:
        return pa.array(values, pa.int64(), mask=values < 0)

    packets, client_packets = column("packets"), column("client_packets")
    first_ts, last_ts = column("first_ts"), column("last_ts")
    return pa.table({
        "flow": column("flow"),
        "client": client_text,
        "server": server_text,
        "client_addr": client_addr,
        "client_port": pa.array(client_port, pa.int32()),
        "server_addr": server_addr,
        "server_port": pa.array(server_port, pa.int32()),
        "ip_version": pa.array(version, pa.int8()),
        "first_ts": pa.array(first_ts // 1000, pa.timestamp("us", tz="UTC")),
        "last_ts": pa.array(last_ts // 1000, pa.timestamp("us", tz="UTC")),
        "duration_ns": last_ts - first_ts,
        "packets": packets,
        "bytes": column("bytes"),
        "client_packets": client_packets,
        "server_packets": packets - client_packets,
        "client_payload_bytes": column("client_payload"),
        "server_payload_bytes": column("server_payload"),
        "handshake_rtt_ns": nullable(handshake),
        "retransmits": client_retransmits + server_retransmits,
        "client_retransmits": client_retransmits,
        "server_retransmits": server_retransmits,
        "resets": column("resets").astype(np.int64),
        "turns": turns,
        "unanswered_requests": unanswered.astype(np.int64),
        "latency_ns_p50": nullable(p50),
        "latency_ns_p99": nullable(p99),
        "latency_ns_max": nullable(maximum),
        "encapsulation": pa.array([chain_name(code) or None for code in column("encapsulation").tolist()],
                                  pa.string()),
    }, schema=FLOWS_SCHEMA)


def _address(high: int, low: int, version: int) -> str:
    if version == 4:
        return str(ipaddress.IPv4Address(low & 0xFFFFFFFF))
    return str(ipaddress.IPv6Address((high << 64) | low))


def _address_strings(high: np.ndarray, low: np.ndarray, version: np.ndarray) -> pa.Array:
    """Text addresses: IPv4 vectorised in Arrow (dotted quads), IPv6 through ipaddress (its
    compressed form), so a million flows' rows cost no per-flow Python for IPv4."""
    import pyarrow.compute as pc

    is_v4 = version == 4
    low32 = (low & np.uint64(0xFFFFFFFF)).astype(np.int64)
    octets = [pc.cast(pa.array((low32 >> shift) & 255), pa.string()) for shift in (24, 16, 8, 0)]
    dotted = pc.binary_join_element_wise(*octets, ".")
    if is_v4.all():
        return dotted
    texts = dotted.to_pylist()
    for row in np.flatnonzero(~is_v4).tolist():
        texts[row] = _address(int(high[row]), int(low[row]), int(version[row]))
    return pa.array(texts, pa.string())


def _endpoint_strings(addresses: pa.Array, ports: np.ndarray, is_v6: np.ndarray) -> pa.Array:
    import pyarrow.compute as pc

    port_text = pc.cast(pa.array(ports.astype(np.int64)), pa.string())
    opening = pa.array(np.where(is_v6, "[", ""), pa.string())
    closing = pa.array(np.where(is_v6, "]:", ":"), pa.string())
    return pc.binary_join_element_wise(opening, addresses, closing, port_text, "")


# -- whole-file analysis --------------------------------------------------------------------------

def analyse_capture(reader: CaptureReader, spill_dir: Path | None = None, spill_rows: int = SPILL_ROWS,
                    limits: FlowLimits | None = None,
                    flow_sink: Callable[[pa.Table], None] | None = None,
                    turn_sink: Callable[[pa.Table], None] | None = None,
                    ) -> tuple[pa.Table, pa.Table, CaptureSummary]:
    """Read the whole capture. A corrupt or truncated record stops reading: what came before is
    analysed and returned with summary.partial set and summary.error naming the byte offset.
    With sinks, flows and turns go to them in batches as the capture goes (memory flat in the
    capture's length) and the returned tables are empty; without, they are returned (with
    spill_dir, turns beyond spill_rows live in a memory-mapped file there, not in memory)."""
    started = time.monotonic()
    limits = limits or FlowLimits(turn_batch_rows=spill_rows)
    analyzer = FlowAnalyzer(spill_dir=spill_dir, limits=limits, flow_sink=flow_sink, turn_sink=turn_sink)
    summary = CaptureSummary(path=str(reader.path), format=reader.format, max_live_flows=limits.max_live_flows)
    linktypes: set[int] = set()
    try:
        for block in reader.blocks():
            summary.packets += len(block)
            linktypes.update(np.unique(block.linktype).tolist())
            headers = decode_tcp(block)
            summary.tcp_packets += len(headers.ts_ns)
            summary.other_packets += headers.other_packets
            summary.impossible_wire_lengths += headers.impossible_wire_lengths
            summary.ip_lengths_beyond_wire += headers.ip_lengths_beyond_wire
            add_counts(summary.not_tcp, headers.not_tcp)
            add_counts(summary.not_decoded, headers.not_decoded)
            add_counts(summary.encapsulations, count_chains(headers.encapsulation))
            analyzer.add(headers)
    except CaptureCorrupt as error:
        summary.partial = True
        summary.error = str(error)
        summary.error_offset = error.offset
    summary.clamped = dict(reader.clamps)
    if flow_sink is None and turn_sink is None:
        flows, turns = analyzer.tables()
    else:
        analyzer.finish()
        flows, turns = FLOWS_SCHEMA.empty_table(), TURNS_SCHEMA.empty_table()
    summary.flows = analyzer.flows_written
    summary.turns = analyzer.turns_written
    summary.peak_live_flows = analyzer.peak_live_flows
    summary.folded_flows = analyzer.folded_flows
    summary.folded_packets = analyzer.folded_packets
    summary.sketched_latency_flows = analyzer.latencies.flows_ever_sketched
    summary.turn_latency_ns_p50, summary.turn_latency_ns_p99 = analyzer.turn_latency_quantiles()
    summary.linktypes = [f"{linktype} ({linktype_name(linktype)})" for linktype in sorted(linktypes)]
    summary.seconds = time.monotonic() - started
    return flows, turns, summary


MAX_FLOW_FINDINGS = 20
FINDING_COLUMNS = ["client", "server", "client_packets", "server_packets", "retransmits", "resets"]


class FlowFindings:
    """The worst flows by retransmits and by resets, kept batch by batch (the flows table may
    never be in memory at once): the same rows as a stable sort of all flows would give."""

    def __init__(self) -> None:
        self.worst: dict[str, pa.Table] = {}
        self.notable: dict[str, int] = {"retransmits": 0, "resets": 0}

    def add(self, flows: pa.Table) -> None:
        import pyarrow.compute as pc

        for column in self.notable:
            notable = flows.select(FINDING_COLUMNS).filter(pc.greater(flows[column], 0))
            self.notable[column] += notable.num_rows
            if column in self.worst:
                notable = pa.concat_tables([self.worst[column], notable])
            self.worst[column] = notable.sort_by([(column, "descending")]).slice(0, MAX_FLOW_FINDINGS)

    def table(self, probe: str) -> pa.Table:
        rows = []
        for column, count in self.notable.items():
            worst = self.worst.get(column)
            for flow in (worst.to_pylist() if worst is not None else []):
                subject = f"{flow['client']} → {flow['server']}"
                if column == "retransmits":
                    share = 100.0 * flow["retransmits"] / max(flow["client_packets"] + flow["server_packets"], 1)
                    rows.append(finding(
                        probe, "warning" if share >= 1.0 else "info", subject,
                        f"{flow['retransmits']} retransmitted segments ({share:.2f}% of packets)",
                        "look for loss on the path (NIC ring drops, queue overflow, congested links); "
                        "a retransmission costs at least one RTO or RTT on the turn it hits"))
                else:
                    rows.append(finding(
                        probe, "info", subject, f"connection reset ({flow['resets']} RST)",
                        "check the peer's logs: resets tear down pooled connections and force reconnects"))
            if count > MAX_FLOW_FINDINGS:
                rows.append(finding(
                    probe, "info", f"{count - MAX_FLOW_FINDINGS} more flows",
                    f"{count - MAX_FLOW_FINDINGS} more flows with {column} (see the flows table)",
                    f"query flows where {column} > 0"))
        return findings_table(rows)


def flows_findings(flows: pa.Table, probe: str) -> pa.Table:
    """Retransmissions and resets are what a latency audit must surface: the worst flows one
    by one (at most MAX_FLOW_FINDINGS), the rest as one summary line."""
    findings = FlowFindings()
    findings.add(flows)
    return findings.table(probe)


def capture_findings(summary: CaptureSummary, probe: str) -> pa.Table:
    """What the reader clamped instead of counting a wrong number."""
    rows = []
    if summary.impossible_wire_lengths:
        rows.append(finding(
            probe, "warning", summary.path,
            f"{summary.impossible_wire_lengths} packets claim an original length beyond "
            f"{MAXIMUM_WIRE_BYTES} bytes; counted at their IP length",
            "the capture is corrupt or was rewritten by a tool: check how it was produced"))
    if summary.ip_lengths_beyond_wire:
        rows.append(finding(
            probe, "info", summary.path,
            f"{summary.ip_lengths_beyond_wire} packets have an IP length longer than the frame "
            "on the wire; their payload is bounded by the wire length",
            "bogus IP lengths come from corrupt captures or broken offloads; flows and "
            "retransmissions count only the bytes on the wire"))
    rows += not_decoded_findings(summary.not_decoded, summary.packets, summary.path, probe)
    rows += clamp_findings(summary.clamped, summary.path, probe)
    rows.extend(folded_flows_findings(summary, probe))
    return findings_table(rows)


def folded_flows_findings(summary: CaptureSummary, probe: str) -> list[dict]:
    """Flows beyond the live-flow cap: what was folded into the "other" row, and how to avoid it."""
    if not summary.folded_packets:
        return []
    return [finding(
        probe, "warning", summary.path,
        f"{summary.folded_flows} flows ({summary.folded_packets} packets) beyond the cap of "
        f"{summary.max_live_flows} live flows were folded into one 'other' row (flow {OTHER_FLOW}): "
        "no per-flow counters, retransmissions or turns for them",
        "raise --max-flows (each live flow costs ~300 bytes) or filter the capture (tcpdump -r IN -w OUT "
        "'port N') to the traffic of interest")]


def summary_headlines(summary: CaptureSummary) -> list[str]:
    """The headline of a streamed analysis (its tables are on disk, not in memory)."""
    line = f"{summary.flows} TCP flows, {summary.turns} request→response turns"
    if summary.turns:
        line += (f"; turn latency p50 {summary.turn_latency_ns_p50 / 1000:.0f} us, "
                 f"p99 {summary.turn_latency_ns_p99 / 1000:.0f} us")
    return [line]


def flows_headlines(tables: dict[str, pa.Table]) -> list[str]:
    flows, turns = tables.get("flows"), tables.get("turns")
    if flows is None or turns is None:
        return []
    line = f"{flows.num_rows} TCP flows, {turns.num_rows} request→response turns"
    if turns.num_rows:
        latency = np.sort(turns.column("latency_ns").to_numpy())
        p50 = latency[int(np.ceil(0.5 * len(latency))) - 1] / 1000
        p99 = latency[int(np.ceil(0.99 * len(latency))) - 1] / 1000
        line += f"; turn latency p50 {p50:.0f} us, p99 {p99:.0f} us"
    return [line]
