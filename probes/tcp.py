"""tcp probe: per-connection smoothed RTT, retransmits, resets, connect latency, lifetime and
bytes, aggregated in the kernel by eBPF on tracepoints only (see tcp.c for the method).

Owner attribution: the kernel side records pid/comm only where it is certain (connect() runs
in the caller's context); accepted connections change state in softirq context, where the
current task is unrelated, so their owner is resolved here from the listening socket's owner
(snapshot at attach time) or from the open sockets at the end of the window (psutil).

Peers get a role from configuration: `peer_roles` option / `--peer-role PORT[-PORT]=ROLE` or
`CIDR=ROLE`, on top of defaults (5432/3306/1521/1433/27017/6379 → database); anything else
is `internal` (loopback/private) or `external`.
"""

from __future__ import annotations

import ctypes
import ipaddress
import time
from pathlib import Path
from typing import ClassVar, Iterable

import pyarrow as pa

from core.errors import BadInput, Unavailable
from probes.base import ProbeBase, ProbeConfig, Window, finding, findings_table, rows_to_table
from probes.bpf import LoadedProgram, bpf_prerequisites, compile_program, lookup_batch

BPF_SOURCE = Path(__file__).with_name("tcp.c")
SRTT_SLOTS = 128
TRACEPOINTS = ("tcp/tcp_probe", "tcp/tcp_retransmit_skb", "tcp/tcp_receive_reset",
               "tcp/tcp_send_reset", "sock/inet_sock_set_state")
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1", 5: "FIN_WAIT2",
              6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT", 9: "LAST_ACK", 10: "LISTEN",
              11: "CLOSING", 12: "NEW_SYN_RECV"}
DEFAULT_PORT_ROLES = {5432: "database", 3306: "database", 1521: "database", 1433: "database",
                      27017: "database", 6379: "database"}

SCHEMA = pa.schema([
    pa.field("pid", pa.int32()),
    pa.field("comm", pa.string()),
    pa.field("laddr", pa.string()),
    pa.field("lport", pa.int32()),
    pa.field("raddr", pa.string()),
    pa.field("rport", pa.int32()),
    pa.field("role", pa.string()),
    pa.field("direction", pa.string()),  # outbound (connect from here) / inbound (accepted)
    pa.field("state", pa.string()),
    pa.field("closed", pa.bool_()),
    pa.field("first_ts", pa.timestamp("us", tz="UTC")),
    pa.field("lifetime_ms", pa.float64()),
    pa.field("connect_latency_us", pa.float64()),
    pa.field("srtt_samples", pa.int64()),
    pa.field("srtt_us_min", pa.int64()),
    pa.field("srtt_us_p50", pa.int64()),
    pa.field("srtt_us_p99", pa.int64()),
    pa.field("srtt_us_max", pa.int64()),
    pa.field("srtt_us_mean", pa.float64()),
    pa.field("retransmits", pa.int64()),
    pa.field("resets_received", pa.int64()),
    pa.field("resets_sent", pa.int64()),
    pa.field("bytes_sent", pa.int64()),
    pa.field("bytes_received", pa.int64()),
])


# -- pure helpers (unit-tested on recorded data) ----------------------------------------------

def srtt_slot_bounds(slot: int) -> tuple[int, int]:
    """[low, high) microseconds of a kernel-side SRTT slot (mirror of srtt_slot() in tcp.c)."""
    if slot < 4:
        return slot, slot + 1
    power = slot // 4 + 1
    sub = slot % 4
    return (4 + sub) << (power - 2), (5 + sub) << (power - 2)


def srtt_slot(value_us: int) -> int:
    """Python twin of tcp.c's srtt_slot, so tests can check the two agree."""
    if value_us < 4:
        return value_us
    power = value_us.bit_length() - 1
    return min((power - 1) * 4 + ((value_us >> (power - 2)) & 3), SRTT_SLOTS - 1)


def slots_quantile(slots: list[int], quantile: float, minimum: int, maximum: int) -> int | None:
    """Quantile from the log-linear slots: the slot's midpoint, clamped into [min, max] seen.
    Slots are <= 25% wide, so the estimate is within ~12% of the true sample."""
    total = sum(slots)
    if total == 0:
        return None
    if quantile >= 1.0:
        return maximum
    target = quantile * total
    running = 0
    for slot, count in enumerate(slots):
        running += count
        if count and running >= target:
            low, high = srtt_slot_bounds(slot)
            return max(minimum, min(maximum, (low + high - 1) // 2))
    return maximum


def parse_roles(items: Iterable[str]) -> tuple[dict[int, str], list[tuple[object, str]]]:
    """`PORT=ROLE`, `LOW-HIGH=ROLE` or `CIDR=ROLE` → (port map, network list)."""
    ports = dict(DEFAULT_PORT_ROLES)
    networks: list[tuple[object, str]] = []
    for item in items:
        if "=" not in item:
            raise BadInput(f"--peer-role {item!r}: expected PORT=ROLE, LOW-HIGH=ROLE or CIDR=ROLE")
        key, role = (part.strip() for part in item.split("=", 1))
        if not role:
            raise BadInput(f"--peer-role {item!r}: empty role")
        try:
            if "/" in key or ":" in key or key.count(".") == 3:
                networks.append((ipaddress.ip_network(key, strict=False), role))
                continue
            if "-" in key:
                low, high = (int(part) for part in key.split("-", 1))
            else:
                low = high = int(key)
        except ValueError:
            raise BadInput(f"--peer-role {item!r}: {key!r} is not a port, port range or network") from None
        if not (0 < low <= high <= 65535):
            raise BadInput(f"--peer-role {item!r}: ports must be within 1-65535")
        for port in range(low, high + 1):
            ports[port] = role
    return ports, networks


def peer_role(remote_address: str, remote_port: int, local_port: int, direction: str,
              ports: dict[int, str], networks: list[tuple[object, str]]) -> str:
    """Role of the peer: the service port we connect to decides for outbound connections; for
    inbound ones our own service port says what the peer is a client of."""
    if direction == "outbound" and remote_port in ports:
        return ports[remote_port]
    if direction == "inbound" and local_port in ports:
        return f"{ports[local_port]}-client"
    try:
        address = ipaddress.ip_address(remote_address)
    except ValueError:
        return "unknown"
    for network, role in networks:
        if address in network:
            return role
    if address.is_loopback or address.is_private or address.is_link_local:
        return "internal"
    return "external"


def format_address(family: int, raw: bytes) -> str:
    if family == 2:
        return str(ipaddress.IPv4Address(bytes(raw[:4])))
    address = ipaddress.IPv6Address(bytes(raw[:16]))
    return str(address.ipv4_mapped) if address.ipv4_mapped else str(address)


def pid_filter_note(pids: Iterable[int]) -> str:
    """--pid/--process narrow this probe too; the status says so instead of a silently short table."""
    shown = sorted(set(pids))
    listed = ", ".join(map(str, shown[:8])) + (f" and {len(shown) - 8} more" if len(shown) > 8 else "")
    return f"only connections of pid {listed} (--pid/--process/--unit filter this probe too)"


def tcp_rows(records: Iterable[dict], now_monotonic_ns: int, wall_offset_ns: int,
             owners: dict[tuple, tuple[int, str]] | None = None,
             listeners: dict[int, tuple[int, str]] | None = None,
             roles: tuple[dict[int, str], list] | None = None,
             pids: Iterable[int] = ()) -> list[dict]:
    """Turn kernel records (dicts with the connection_t fields) into `tcp` rows.

    owners: (laddr, lport, raddr, rport) → (pid, comm) for sockets open at the end;
    listeners: local port → (pid, comm) of the listening socket (accepted connections).
    """
    owners = owners or {}
    listeners = listeners or {}
    ports, networks = roles or (dict(DEFAULT_PORT_ROLES), [])
    wanted = set(pids)
    rows = []
    for record in records:
        if not record.get("lport") and not record.get("rport"):
            continue  # never got past SYN_SENT's unassigned port: nothing to say about it
        family = record["family"]
        laddr = format_address(family, record["laddr"])
        raddr = format_address(family, record["raddr"])
        lport, rport = int(record["lport"]), int(record["rport"])
        direction = "outbound" if record["active"] else "inbound"
        pid, comm = int(record.get("pid") or 0), _text(record.get("comm", b""))
        if not pid:
            pid, comm = owners.get((laddr, lport, raddr, rport)) or listeners.get(lport) or (0, "")
        if wanted and pid not in wanted:
            continue
        closed = bool(record["closed_ns"])
        end_ns = record["closed_ns"] if closed else now_monotonic_ns
        connect_latency = None
        if record["connect_start_ns"] and record["established_ns"] >= record["connect_start_ns"]:
            connect_latency = (record["established_ns"] - record["connect_start_ns"]) / 1000.0
        slots = list(record["srtt_slots"])
        samples = int(record["srtt_samples"])
        minimum, maximum = int(record["srtt_min_us"]), int(record["srtt_max_us"])
        rows.append({
            "pid": pid or None, "comm": comm or None, "laddr": laddr, "lport": lport, "raddr": raddr,
            "rport": rport, "role": peer_role(raddr, rport, lport, direction, ports, networks),
            "direction": direction, "state": TCP_STATES.get(int(record["state"]), str(record["state"])),
            "closed": closed, "first_ts": (record["first_ns"] + wall_offset_ns) // 1000,
            "lifetime_ms": max(0, end_ns - record["first_ns"]) / 1e6,
            "connect_latency_us": connect_latency,
            "srtt_samples": samples,
            "srtt_us_min": minimum if samples else None,
            "srtt_us_p50": slots_quantile(slots, 0.50, minimum, maximum),
            "srtt_us_p99": slots_quantile(slots, 0.99, minimum, maximum),
            "srtt_us_max": maximum if samples else None,
            "srtt_us_mean": record["srtt_sum_us"] / samples if samples else None,
            "retransmits": int(record["retransmits"]),
            "resets_received": int(record["resets_received"]),
            "resets_sent": int(record["resets_sent"]),
            "bytes_sent": int(record["bytes_sent"]),
            "bytes_received": int(record["bytes_received"]),
        })
    rows.sort(key=lambda row: (row["role"], row["raddr"], row["rport"], row["lport"]))
    return rows


# Counters the kernel keeps per connection since it was first seen: a window's share is the
# difference between two reads.
WINDOW_COUNTERS = ("bytes_received", "bytes_sent", "srtt_sum_us", "srtt_samples", "retransmits",
                   "resets_received", "resets_sent")


def connection_identity(record: dict) -> tuple:
    """Names one connection across windows: the kernel's first-seen time and its endpoints (the
    local port is left out: it is assigned after SYN_SENT, so it may change between reads)."""
    return (record["first_ns"], record["family"], bytes(record["laddr"]), bytes(record["raddr"]),
            record["rport"])


def window_record(record: dict, before: dict | None) -> dict:
    """One window's share of a connection record, given its record at the previous window's end.

    Counters and the SRTT histogram are differenced exactly. The SRTT min and max cannot be:
    when the cumulative max grew (min fell) during the window it is the window's own and exact;
    otherwise it is bounded by the window's highest (lowest) non-empty slot and clamped to the
    cumulative value. Identity, state, first_ts, connect latency and lifetime stay per
    connection (not per window)."""
    if before is None:
        return record
    delta = dict(record)
    for name in WINDOW_COUNTERS:
        delta[name] = max(0, record[name] - before[name])
    slots = [max(0, now - then) for now, then in zip(record["srtt_slots"], before["srtt_slots"])]
    delta["srtt_slots"] = slots
    filled = [slot for slot, count in enumerate(slots) if count]
    if not filled:
        delta["srtt_samples"], delta["srtt_sum_us"] = 0, 0
        delta["srtt_min_us"] = delta["srtt_max_us"] = 0
        return delta
    if record["srtt_max_us"] <= before["srtt_max_us"]:
        delta["srtt_max_us"] = min(record["srtt_max_us"], srtt_slot_bounds(filled[-1])[1] - 1)
    if record["srtt_min_us"] >= before["srtt_min_us"]:
        delta["srtt_min_us"] = max(record["srtt_min_us"], srtt_slot_bounds(filled[0])[0])
    return delta


def window_records(closed: list[dict], open_records: list[dict], previous_open: dict[tuple, dict]
                   ) -> tuple[list[dict], list[dict], dict[tuple, dict]]:
    """Rolling windows: (closed, open, snapshot for the next window).

    The kernel's records are cumulative per connection; a window reports the connections that
    closed in it and those open at its end, each minus its record at the previous window's end.
    A connection that was open then but is now neither closed nor open closed between the
    ring-buffer read and the map read: its record arrives with the next window, so its old
    snapshot is carried over (once) to be differenced then."""
    seen = set()
    closed_out = []
    for record in closed:
        identity = connection_identity(record)
        seen.add(identity)
        closed_out.append(window_record(record, previous_open.get(identity)))
    open_out, snapshot = [], {}
    for record in open_records:
        identity = connection_identity(record)
        seen.add(identity)
        open_out.append(window_record(record, previous_open.get(identity)))
        snapshot[identity] = record
    for identity, record in previous_open.items():
        if identity not in seen and not record.get("carried"):
            snapshot[identity] = dict(record, carried=True)
    return closed_out, open_out, snapshot


MAX_CONNECTION_FINDINGS = 20


def tcp_findings(rows: list[dict], lost_untracked: int, lost_closed: int) -> list[dict]:
    """Retransmits and resets per connection (the worst MAX_CONNECTION_FINDINGS of each, the
    rest summarised in one line), and lost kernel records."""
    findings = []

    def subject(row: dict) -> str:
        return (f"{row['comm'] or '?'}[{row['pid'] or '?'}] {row['laddr']}:{row['lport']} → "
                f"{row['raddr']}:{row['rport']} ({row['role']})")

    retransmitting = sorted((row for row in rows if row["retransmits"]), key=lambda row: -row["retransmits"])
    for row in retransmitting[:MAX_CONNECTION_FINDINGS]:
        findings.append(finding(
            "tcp", "warning", subject(row), f"{row['retransmits']} retransmits",
            "a retransmit adds at least an RTO (>= 200 ms by default) or an RTT to the request it "
            "hits: look for loss on the path (NIC drops, queue overflow, congested link)"))
    reset = sorted((row for row in rows if row["resets_received"]), key=lambda row: -row["resets_received"])
    for row in reset[:MAX_CONNECTION_FINDINGS]:
        findings.append(finding(
            "tcp", "info", subject(row), f"connection reset by the peer ({row['resets_received']} RST)",
            "check the peer's logs; resets tear down pooled connections and force reconnects"))
    for what, notable in (("retransmits", retransmitting), ("resets", reset)):
        if len(notable) > MAX_CONNECTION_FINDINGS:
            more = len(notable) - MAX_CONNECTION_FINDINGS
            findings.append(finding("tcp", "info", f"{more} more connections",
                                    f"{more} more connections with {what} (see the tcp table)",
                                    f"query the tcp table for {what} > 0"))
    if lost_untracked or lost_closed:
        findings.append(finding(
            "tcp", "warning", "probe capacity",
            f"partial: {dropped_reason(lost_untracked, lost_closed)}",
            "raise --tcp-max-connections (about 700 bytes per socket end) or shorten --duration"))
    return findings


def _text(value) -> str:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).split(b"\0", 1)[0].decode(errors="replace")
    return str(value or "")


# -- I/O shell --------------------------------------------------------------------------------------

def socket_owners() -> tuple[dict[tuple, tuple[int, str]], dict[int, tuple[int, str]]]:
    """(open TCP sockets → owner, listening port → owner) from /proc via psutil."""
    import psutil

    owners: dict[tuple, tuple[int, str]] = {}
    listeners: dict[int, tuple[int, str]] = {}
    names: dict[int, str] = {}

    def name(pid: int) -> str:
        if pid not in names:
            try:
                names[pid] = psutil.Process(pid).name()
            except psutil.Error:
                names[pid] = ""
        return names[pid]

    for connection in psutil.net_connections(kind="tcp"):
        if not connection.pid:
            continue
        local = connection.laddr
        if connection.status == psutil.CONN_LISTEN:
            listeners.setdefault(local.port, (connection.pid, name(connection.pid)))
        elif connection.raddr:
            laddr = _plain(local.ip)
            owners[(laddr, local.port, _plain(connection.raddr.ip), connection.raddr.port)] = (
                connection.pid, name(connection.pid))
    return owners, listeners


def _plain(address: str) -> str:
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped:
        return str(parsed.ipv4_mapped)
    return str(parsed)


class TcpProbe(LoadedProgram, ProbeBase):
    name: ClassVar[str] = "tcp"
    schema: ClassVar[pa.Schema] = SCHEMA
    description: ClassVar[str] = "eBPF per-connection TCP RTT, retransmits, resets, connect latency, bytes"
    finish_grace_s: ClassVar[float] = 20.0
    # Prepared once, then collect() window after window (see window_records).
    rolling: ClassVar[bool] = True

    def __init__(self, config: ProbeConfig | None = None):
        super().__init__(config)
        self._bpf = None
        self.closed: list[dict] = []
        self.listeners: dict[int, tuple[int, str]] = {}
        self._previous_open: dict[tuple, dict] = {}
        self._previous_lost = [0, 0]

    def check(self) -> None:
        bpf_prerequisites(self.host, TRACEPOINTS)
        parse_roles(self._role_items())

    def _role_items(self) -> list[str]:
        items = self.option("peer_roles") or ()
        return [items] if isinstance(items, str) else list(items)

    def prepare(self) -> None:
        self.closed, self._previous_open, self._previous_lost = [], {}, [0, 0]

        try:
            self._bpf = compile_program(build_source(int(self.option("tcp_max_connections"))))
        except Exception as error:
            raise Unavailable(f"BPF program failed to load: {str(error).splitlines()[0]}") from None
        self._bpf["closed_connections"].open_ring_buffer(self._on_closed)
        try:
            _, self.listeners = socket_owners()
        except Exception:
            self.listeners = {}

    def _on_closed(self, context, data, size) -> None:  # noqa: ARG002 - BCC callback signature
        self.closed.append(_record(self._bpf["closed_connections"].event(data)))


    def collect(self, window: Window) -> dict[str, pa.Table]:
        if self._bpf is None:
            self.prepare()
        bpf = self._bpf
        try:
            while not window.wait(0.0):
                # The poll returns as soon as a closed connection is written (the ring buffer
                # wakes its reader), so the timeout only bounds how late a stop is noticed; at
                # 100 ms, idle polling alone cost 0.12% of a core here, at 1 s 0.01%.
                bpf.ring_buffer_poll(1000)
                if window.remaining() <= 0:
                    break
            bpf.ring_buffer_consume()
            open_records = read_open_connections(bpf["connections"], int(self.option("tcp_max_connections")))
            lost_now = [int(value.value) for value in bpf["lost"].values()][:2] + [0, 0]
            now_ns = time.monotonic_ns()
        finally:
            if not self.keep_attached:
                self.detach()
        closed, self.closed = self.closed, []
        lost = [now - then for now, then in zip(lost_now[:2], self._previous_lost)]
        if self.keep_attached:
            self._previous_lost = lost_now[:2]
        if self._previous_open or self.keep_attached:
            closed, open_records, self._previous_open = window_records(
                closed, open_records, self._previous_open)
        wall_offset_ns = time.time_ns() - time.monotonic_ns()
        try:
            owners, listeners = socket_owners()
        except Exception:
            owners, listeners = {}, {}
        current_listeners = listeners
        listeners = {**listeners, **self.listeners}
        if self.keep_attached:
            self.listeners = {**self.listeners, **current_listeners}
        rows = tcp_rows(closed + open_records, now_ns, wall_offset_ns, owners, listeners,
                        parse_roles(self._role_items()), self.config.pids)
        findings = tcp_findings(rows, lost[0], lost[1])
        dropped = dropped_reason(lost[0], lost[1])
        self.partial = bool(dropped)
        notes = [pid_filter_note(self.config.pids)] if self.config.pids else []
        self.status_reason = "; ".join(notes + ([dropped] if dropped else []))
        return {"tcp": rows_to_table(rows, SCHEMA), "findings": findings_table(findings)}

    @staticmethod
    def headlines(tables: dict[str, pa.Table]) -> list[str]:
        table = tables.get("tcp")
        if table is None or table.num_rows == 0:
            return []
        by_role: dict[str, list[int]] = {}
        for role, p50 in zip(table.column("role").to_pylist(), table.column("srtt_us_p50").to_pylist()):
            if p50 is not None:
                by_role.setdefault(role, []).append(p50)
        parts = [f"{role} srtt p50 {sorted(values)[len(values) // 2]} us ({len(values)} conns)"
                 for role, values in sorted(by_role.items())]
        retransmits = sum(table.column("retransmits").to_pylist())
        return [f"tcp: {table.num_rows} connections, {retransmits} retransmits"
                + (f"; {'; '.join(parts)}" if parts else "")]


def build_source(max_connections: int) -> str:
    return BPF_SOURCE.read_text().replace("MAX_CONNECTIONS", str(int(max_connections)))


def read_open_connections(table, max_connections: int) -> list[dict]:
    """Every open connection's record, with one batch lookup (100,000 sockets one lookup at a
    time took seconds)."""

    leaf_bytes = ctypes.sizeof(table.Leaf)
    _, values, count = lookup_batch(table, max_connections, ctypes.sizeof(table.Key), leaf_bytes)
    return [_record(table.Leaf.from_buffer_copy(values, index * leaf_bytes)) for index in range(count)]


def dropped_reason(untracked: int, closes_lost: int) -> str:
    """The status reason of a window in which the maps dropped something ("" when nothing was)."""
    parts = []
    if untracked:
        parts.append(f"{untracked:,} socket events not tracked (connection table full)")
    if closes_lost:
        parts.append(f"{closes_lost:,} closed connections lost (ring buffer full)")
    return "; ".join(parts)


_FIELDS = ("first_ns", "connect_start_ns", "established_ns", "closed_ns", "last_ns", "bytes_received",
           "bytes_sent", "srtt_sum_us", "srtt_samples", "pid", "srtt_min_us", "srtt_max_us",
           "retransmits", "resets_received", "resets_sent", "family", "lport", "rport", "active", "state")


def _record(value) -> dict:
    """ctypes struct from BCC → plain dict (what tcp_rows and recorded test data use)."""
    record = {name: int(getattr(value, name)) for name in _FIELDS}
    record["laddr"] = bytes(value.laddr)
    record["raddr"] = bytes(value.raddr)
    record["comm"] = bytes(value.comm)
    record["srtt_slots"] = list(value.srtt_slots)
    return record


__all__ = ["TcpProbe", "tcp_rows", "parse_roles", "peer_role", "srtt_slot", "srtt_slot_bounds",
           "slots_quantile", "SCHEMA"]
