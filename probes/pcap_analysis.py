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

Memory: state per flow (counters, sequence tracking) plus at most two pending runs per flow are
carried between blocks; the packets of a block are dropped once analysed. Turns are kept as
compact arrays until the tables are built.
"""

from __future__ import annotations

import ipaddress
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from probes.base import finding, findings_table
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
# Turns kept in memory before they go to the spill file (~64 bytes each: 1M ≈ 64 MB).
SPILL_ROWS = 1_000_000
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


class _Grow:
    """Per-flow (or per flow-direction) int64 columns that grow by doubling."""

    def __init__(self, names_defaults: dict[str, int]):
        self.defaults = names_defaults
        self.capacity = 0
        self.columns: dict[str, np.ndarray] = {name: np.zeros(0, dtype=np.int64) for name in names_defaults}

    def ensure(self, size: int) -> None:
        if size <= self.capacity:
            return
        capacity = max(size, self.capacity * 2, 1024)
        for name, column in self.columns.items():
            grown = np.full(capacity, self.defaults[name], dtype=np.int64)
            grown[: len(column)] = column
            self.columns[name] = grown
        self.capacity = capacity

    def __getitem__(self, name: str) -> np.ndarray:
        return self.columns[name]


@dataclass
class _Runs:
    flow: np.ndarray
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

    def as_dict(self) -> dict:
        return {key: value for key, value in self.__dict__.items()}


class FlowAnalyzer:
    """Feed TcpHeaders blocks in file order; `tables()` gives flows and turns."""

    def __init__(self, spill_dir: Path | None = None, spill_rows: int = SPILL_ROWS) -> None:
        """spill_dir: where turns beyond `spill_rows` are written (Arrow IPC) instead of being
        kept in memory; None keeps them all in memory (small captures, tests)."""
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.spill_rows = spill_rows
        self.spill_path: Path | None = None
        self._spill_writer = None
        self.turn_rows_in_memory = 0
        # (a_high, a_low, a_port, b_high, b_low, b_port) -> the flow of the tuple's latest connection
        self.flow_index: dict[tuple, int] = {}
        self.flow_keys: list[tuple] = []  # (a_high, a_low, a_port, b_high, b_low, b_port, ip_version)
        self.flows = _Grow({
            "client_is_a": 0, "first_ts": 0, "last_ts": 0, "packets": 0, "bytes": 0,
            "client_packets": 0, "client_payload": 0, "server_payload": 0, "syn_ts": -1,
            "synack_ts": -1, "resets": 0, "isn": -1,  # isn: the client SYN's sequence number
            "encapsulation": 0,  # pcap_decap chain code of the flow's first packet
        })
        # Per flow-direction (flow * 2 + from_client): sequence tracking across blocks.
        self.directions = _Grow({"seq_base": -1, "last_relative": 0, "wraps": 0, "max_end": -1,
                                 "retransmits": 0})
        self.pending = _Runs.empty()
        self.turn_parts: list[tuple[np.ndarray, ...]] = []
        # Requests left without a response, per flow: known once the final block is paired.
        self.unanswered: np.ndarray | None = None

    # -- flow identity -----------------------------------------------------------------------
    def _flow_ids(self, headers: TcpHeaders, syn: np.ndarray):
        """Per packet: src_is_a and the block-local flow index (in order of first appearance);
        plus the local → global id map and the local indexes of flows never seen before."""
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
        local, first_index = _factorize(_splitmix(folded))
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
        keys = list(zip(a_high[first_index].tolist(), a_low[first_index].tolist(),
                        (ports[first_index] >> np.uint64(16)).tolist(), b_high[first_index].tolist(),
                        b_low[first_index].tolist(), (ports[first_index] & np.uint64(0xFFFF)).tolist(),
                        headers.ip_version[first_index].tolist()))
        local, first_index, tuple_of, reuse = self._connections(headers, syn, local, first_index, keys)
        local_to_global = np.empty(len(first_index), dtype=np.int64)
        new_locals = []
        index = self.flow_index
        for local_id, (tuple_id, reused) in enumerate(zip(tuple_of.tolist(), reuse.tolist())):
            key = keys[tuple_id]
            flow = None if reused else index.get(key[:6])
            if flow is None:
                flow = len(self.flow_keys)
                index[key[:6]] = flow  # connections of one tuple come in order: the last one stays
                self.flow_keys.append(key)
                new_locals.append(local_id)
            local_to_global[local_id] = flow
        return src_is_a, local, local_to_global, np.array(new_locals, dtype=np.int64), first_index

    def _connections(self, headers: TcpHeaders, syn: np.ndarray, local, first_index, keys):
        """Split block-local 4-tuples into connections where a tuple is reused: a SYN whose
        sequence number differs from the SYN of the tuple's current connection (or that follows
        packets of a connection whose SYN was never seen) starts a new one. Returns per packet the
        block-local connection id (first-appearance order) and per connection its first packet,
        its tuple (index into `keys`) and whether it is a new connection on a tuple in use."""
        syn_packets = np.flatnonzero(syn)
        no_reuse = np.zeros(len(keys), dtype=bool)
        if not len(syn_packets):
            return local, first_index, np.arange(len(keys), dtype=np.int64), no_reuse
        isn_of, index, seq = self.flows["isn"], self.flow_index, headers.seq
        current: dict[int, int] = {}  # tuple id -> sequence number of its current connection's SYN
        reusing = []
        # SYNs are few next to data packets: a Python loop over them only.
        for i in syn_packets.tolist():
            tuple_id = int(local[i])
            isn = int(seq[i])
            known = current.get(tuple_id)
            if known is None:
                flow = index.get(keys[tuple_id][:6])
                if flow is None:  # a tuple new in this block
                    current[tuple_id] = isn
                    if first_index[tuple_id] < i:  # after packets of a connection already under way
                        reusing.append(i)
                    continue
                known = int(isn_of[flow])
            if known != isn:  # not a retransmitted SYN: a new connection on this tuple
                current[tuple_id] = isn
                reusing.append(i)
        if not reusing:
            return local, first_index, np.arange(len(keys), dtype=np.int64), no_reuse
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
        src_is_a, local, local_to_global, new_locals, first_index = self._flow_ids(headers, syn)
        flows, directions = self.flows, self.directions
        flows.ensure(len(self.flow_keys))
        directions.ensure(2 * len(self.flow_keys))
        ts = headers.ts_ns
        payload = headers.payload_bytes
        synack = (flags & (SYN | ACK)) == (SYN | ACK)
        if len(new_locals):
            self._decide_clients(local, local_to_global, new_locals, src_is_a, syn, synack)
            new_global = local_to_global[new_locals]
            flows["first_ts"][new_global] = ts[first_index[new_locals]]
            flows["encapsulation"][new_global] = headers.encapsulation[first_index[new_locals]]
        from_client = src_is_a == flows["client_is_a"][local_to_global][local].astype(bool)

        # One stable sort by (flow, direction) serves every per-direction reduction. Block-local
        # ids are small, so the key usually fits 16 bits and numpy's stable sort is a radix sort.
        group_local = local * 2 + from_client
        key = group_local.astype(np.uint16) if 2 * len(local_to_global) <= 0xFFFF else group_local
        order = np.argsort(key, kind="stable")
        sorted_group = group_local[order]
        starts = _group_starts(sorted_group)
        group_ids = sorted_group[starts]
        group_flow = local_to_global[group_ids >> 1]
        group_client = (group_ids & 1).astype(bool)
        group_packets = np.diff(np.append(starts, len(order)))
        sorted_ts = ts[order]
        np.add.at(flows["packets"], group_flow, group_packets)
        np.add.at(flows["bytes"], group_flow, np.add.reduceat(headers.wire_bytes[order], starts))
        np.add.at(flows["client_packets"], group_flow, np.where(group_client, group_packets, 0))
        group_payload = np.add.reduceat(payload[order], starts)
        np.add.at(flows["client_payload"], group_flow, np.where(group_client, group_payload, 0))
        np.add.at(flows["server_payload"], group_flow, np.where(group_client, 0, group_payload))
        np.add.at(flows["resets"], group_flow, np.add.reduceat((flags[order] & RST) != 0, starts).astype(np.int64))
        np.maximum.at(flows["last_ts"], group_flow, np.maximum.reduceat(sorted_ts, starts))

        self._handshakes(local_to_global[local], from_client, syn, synack, ts)
        syn_flows = local_to_global[local[syn]]
        unset = flows["isn"][syn_flows] == -1
        flows["isn"][syn_flows[unset]] = headers.seq[syn][unset]
        retransmitted = self._retransmissions(order, starts, group_flow * 2 + group_client, headers)
        self._turns(local, local_to_global, from_client, payload, ts, retransmitted)

    def _decide_clients(self, local, local_to_global, new_locals, src_is_a, syn, synack) -> None:
        """Client side of each new flow: SYN sender, else SYN-ACK receiver, else higher port."""
        decided = np.full(len(local_to_global), -1, dtype=np.int64)
        for mask, sender_is_client in ((synack, False), (syn, True)):  # later wins: SYN first
            rows = np.flatnonzero(mask)
            if len(rows) == 0:
                continue
            flows_with, first = np.unique(local[rows], return_index=True)
            sender_is_a = src_is_a[rows[first]]
            decided[flows_with] = np.where(sender_is_a == sender_is_client, 1, 0)
        for local_id in new_locals.tolist():
            flow = int(local_to_global[local_id])
            choice = int(decided[local_id])
            if choice < 0:
                _ah, _al, a_port, _bh, _bl, b_port, _v = self.flow_keys[flow]
                if a_port != b_port:
                    choice = 1 if a_port > b_port else 0
                else:
                    first_packet = int(np.argmax(local == local_id))
                    choice = 1 if src_is_a[first_packet] else 0
            self.flows["client_is_a"][flow] = choice

    def _handshakes(self, flow, from_client, syn, synack, ts) -> None:
        flows = self.flows
        for mask, column in ((syn & from_client, "syn_ts"), (synack & ~from_client, "synack_ts")):
            rows = np.flatnonzero(mask)
            if len(rows) == 0:
                continue
            ids, first = np.unique(flow[rows], return_index=True)
            unset = flows[column][ids] < 0
            flows[column][ids[unset]] = ts[rows[first]][unset]

    def _retransmissions(self, order, starts, ids, headers: TcpHeaders) -> np.ndarray:
        """Mark data segments that start below the highest sequence already seen (per direction).
        `order` sorts the block by direction group; `ids` are the groups' global direction ids."""
        directions = self.directions
        seq = headers.seq[order]
        payload = headers.payload_bytes[order]
        flags = headers.flags[order]
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
        directions["retransmits"][ids] += np.add.reduceat(retransmitted_sorted.astype(np.int64), starts)
        retransmitted = np.empty(size, dtype=bool)
        retransmitted[order] = retransmitted_sorted
        return retransmitted

    def _turns(self, local, local_to_global, from_client, payload, ts, retransmitted) -> None:
        data = np.flatnonzero((payload > 0) & ~retransmitted)
        if len(data) == 0:
            return
        key = local[data]
        key = key.astype(np.uint16) if len(local_to_global) <= 0xFFFF else key
        data = data[np.argsort(key, kind="stable")]
        run_flow = local_to_global[local[data]]
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
        self.pending = self._emit_turns(runs, final=False)

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

    def _emit_turns(self, runs: _Runs, final: bool) -> _Runs:
        """Emit complete turns; return the runs still open (to be extended by the next block)."""
        size = len(runs)
        if size == 0:
            return runs
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
            self.turn_rows_in_memory += len(rows)
            self.turn_parts.append((
                runs.flow[rows], runs.first_ts[rows], runs.first_ts[rows + 1] - runs.first_ts[rows],
                runs.payload_bytes[rows], runs.payload_bytes[rows + 1], runs.packets[rows],
                runs.packets[rows + 1], runs.last_ts[rows + 1] - runs.first_ts[rows + 1],
            ))
        if self.spill_dir is not None and self.turn_rows_in_memory >= self.spill_rows:
            self._spill()
        if final:
            self.unanswered = np.bincount(runs.flow[is_last & runs.from_client],
                                          minlength=len(self.flow_keys))
        return runs.take(np.flatnonzero(keep))

    # -- results ------------------------------------------------------------------------------------
    def _turn_batch(self, sort_by_flow: bool) -> pa.Table:
        """The in-memory turns as a table (and forget them)."""
        if self.turn_parts:
            columns = [np.concatenate(part) for part in zip(*self.turn_parts)]
        else:
            columns = [np.zeros(0, dtype=np.int64) for _ in range(8)]
        self.turn_parts, self.turn_rows_in_memory = [], 0
        if sort_by_flow:
            # Each block's turns are already grouped by flow and in time order within a flow, so
            # a stable sort by flow (timsort merging those runs) gives flow, then time order.
            order = np.argsort(columns[0], kind="stable")
            columns = [column[order] for column in columns]
        turn_flow, turn_ts, latency, request_bytes, response_bytes, request_packets, response_packets, \
            response_duration = columns
        return pa.table({
            "flow": turn_flow, "ts": pa.array(turn_ts // 1000, pa.timestamp("us", tz="UTC")), "ts_ns": turn_ts,
            "latency_ns": latency, "request_bytes": request_bytes, "response_bytes": response_bytes,
            "request_packets": request_packets, "response_packets": response_packets,
            "response_duration_ns": response_duration,
        }, schema=TURNS_SCHEMA)

    def _spill(self) -> None:
        """Move the in-memory turns to the spill file (Arrow IPC, appended batch by batch)."""
        if self._spill_writer is None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self.spill_path = self.spill_dir / f".turns-spill-{os.getpid()}-{id(self)}.arrow"
            self._spill_writer = pa.ipc.new_file(str(self.spill_path), TURNS_SCHEMA)
        self._spill_writer.write_table(self._turn_batch(sort_by_flow=False))

    def _all_turns(self) -> pa.Table:
        if self._spill_writer is None:
            return self._turn_batch(sort_by_flow=True)
        self._spill()
        self._spill_writer.close()
        # Memory-mapped and unlinked at once: the table's pages come from the file (evictable
        # page cache, not process memory) and the file vanishes when the table is released.
        # Turn order is then completion order (flows grouped within each block), not re-sorted:
        # a sort would bring every turn back into memory.
        spilled = pa.ipc.open_file(pa.memory_map(str(self.spill_path))).read_all()
        self.spill_path.unlink(missing_ok=True)
        return spilled

    def tables(self) -> tuple[pa.Table, pa.Table]:
        self._emit_turns(self.pending, final=True)
        self.pending = _Runs.empty()
        flow_count = len(self.flow_keys)
        turns = self._all_turns()
        turn_flow = turns.column("flow").to_numpy()
        latency = turns.column("latency_ns").to_numpy()

        turn_counts = np.bincount(turn_flow, minlength=flow_count)
        p50 = np.full(flow_count, -1, dtype=np.int64)
        p99 = np.full(flow_count, -1, dtype=np.int64)
        maximum = np.full(flow_count, -1, dtype=np.int64)
        if len(latency):
            # One int64 sort on (flow, latency) packed together: latencies are clipped to 2^40 ns
            # (18 minutes) for the key only.
            packed = (turn_flow << 40) | np.clip(latency, 0, (1 << 40) - 1)
            sorted_latency = latency[np.argsort(packed)]
            del packed
            group_start = np.concatenate(([0], np.cumsum(turn_counts)[:-1]))
            has = turn_counts > 0
            # Nearest-rank percentiles (an observed latency, never an interpolation).
            for target, quantile in ((p50, 0.50), (p99, 0.99)):
                rank = np.ceil(quantile * turn_counts).astype(np.int64) - 1
                target[has] = sorted_latency[group_start[has] + np.maximum(rank[has], 0)]
            maximum[has] = sorted_latency[group_start[has] + turn_counts[has] - 1]
        del turn_flow, latency

        flows = self.flows
        count = flow_count
        client_is_a = flows["client_is_a"][:count].astype(bool)
        client_addr, server_addr, client_port, server_port, client_text, server_text = [], [], [], [], [], []
        for index, (a_high, a_low, a_port, b_high, b_low, b_port, version) in enumerate(self.flow_keys):
            a_addr, b_addr = _address(a_high, a_low, version), _address(b_high, b_low, version)
            if client_is_a[index]:
                pair = (a_addr, a_port, b_addr, b_port)
            else:
                pair = (b_addr, b_port, a_addr, a_port)
            client_addr.append(pair[0])
            client_port.append(pair[1])
            server_addr.append(pair[2])
            server_port.append(pair[3])
            client_text.append(_endpoint(pair[0], pair[1]))
            server_text.append(_endpoint(pair[2], pair[3]))
        directions = self.directions["retransmits"][: 2 * count]
        client_retransmits = directions[1::2]
        server_retransmits = directions[0::2]
        syn_ts = flows["syn_ts"][:count]
        synack_ts = flows["synack_ts"][:count]
        handshake = np.where((syn_ts >= 0) & (synack_ts >= syn_ts), synack_ts - syn_ts, -1)
        unanswered = (self.unanswered[:count] if self.unanswered is not None
                      else np.zeros(count, dtype=np.int64))

        def nullable(values: np.ndarray) -> pa.Array:
            return pa.array(values, pa.int64(), mask=values < 0)

        packets = flows["packets"][:count]
        client_packets = flows["client_packets"][:count]
        table = pa.table({
            "flow": np.arange(count, dtype=np.int64),
            "client": pa.array(client_text, pa.string()),
            "server": pa.array(server_text, pa.string()),
            "client_addr": pa.array(client_addr, pa.string()),
            "client_port": pa.array(client_port, pa.int32()),
            "server_addr": pa.array(server_addr, pa.string()),
            "server_port": pa.array(server_port, pa.int32()),
            "ip_version": pa.array([key[6] for key in self.flow_keys], pa.int8()),
            "first_ts": pa.array(flows["first_ts"][:count] // 1000, pa.timestamp("us", tz="UTC")),
            "last_ts": pa.array(flows["last_ts"][:count] // 1000, pa.timestamp("us", tz="UTC")),
            "duration_ns": flows["last_ts"][:count] - flows["first_ts"][:count],
            "packets": packets,
            "bytes": flows["bytes"][:count],
            "client_packets": client_packets,
            "server_packets": packets - client_packets,
            "client_payload_bytes": flows["client_payload"][:count],
            "server_payload_bytes": flows["server_payload"][:count],
            "handshake_rtt_ns": nullable(handshake),
            "retransmits": client_retransmits + server_retransmits,
            "client_retransmits": client_retransmits,
            "server_retransmits": server_retransmits,
            "resets": flows["resets"][:count],
            "turns": turn_counts.astype(np.int64),
            "unanswered_requests": unanswered.astype(np.int64),
            "latency_ns_p50": nullable(p50),
            "latency_ns_p99": nullable(p99),
            "latency_ns_max": nullable(maximum),
            "encapsulation": pa.array([chain_name(code) or None for code in flows["encapsulation"][:count].tolist()],
                                      pa.string()),
        }, schema=FLOWS_SCHEMA)
        return table, turns


def _address(high: int, low: int, version: int) -> str:
    if version == 4:
        return str(ipaddress.IPv4Address(low & 0xFFFFFFFF))
    return str(ipaddress.IPv6Address((high << 64) | low))


def _endpoint(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"


# -- whole-file analysis --------------------------------------------------------------------------

def analyse_capture(reader: CaptureReader, spill_dir: Path | None = None,
                    spill_rows: int = SPILL_ROWS) -> tuple[pa.Table, pa.Table, CaptureSummary]:
    """Read the whole capture. A corrupt or truncated record stops reading: what came before is
    analysed and returned with summary.partial set and summary.error naming the byte offset.
    With spill_dir, turns beyond spill_rows live in a memory-mapped file there, not in memory."""
    started = time.monotonic()
    analyzer = FlowAnalyzer(spill_dir=spill_dir, spill_rows=spill_rows)
    summary = CaptureSummary(path=str(reader.path), format=reader.format)
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
    flows, turns = analyzer.tables()
    summary.flows = flows.num_rows
    summary.turns = turns.num_rows
    summary.linktypes = [f"{linktype} ({linktype_name(linktype)})" for linktype in sorted(linktypes)]
    summary.seconds = time.monotonic() - started
    return flows, turns, summary


MAX_FLOW_FINDINGS = 20


def flows_findings(flows: pa.Table, probe: str) -> pa.Table:
    """Retransmissions and resets are what a latency audit must surface: the worst flows one
    by one (at most MAX_FLOW_FINDINGS), the rest as one summary line."""
    import pyarrow.compute as pc

    rows = []
    columns = ["client", "server", "client_packets", "server_packets", "retransmits", "resets"]
    for column, sort_key in (("retransmits", "retransmits"), ("resets", "resets")):
        notable = flows.select(columns).filter(pc.greater(flows[column], 0))
        notable = notable.sort_by([(sort_key, "descending")])
        for flow in notable.slice(0, MAX_FLOW_FINDINGS).to_pylist():
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
        if notable.num_rows > MAX_FLOW_FINDINGS:
            rows.append(finding(
                probe, "info", f"{notable.num_rows - MAX_FLOW_FINDINGS} more flows",
                f"{notable.num_rows - MAX_FLOW_FINDINGS} more flows with {column} (see the flows table)",
                f"query flows where {column} > 0"))
    return findings_table(rows)


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
    return findings_table(rows)


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
