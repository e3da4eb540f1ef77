"""The agent's own probes through a faulted path: they prove a fault bit where it was injected.

Every probe opens its own sockets to the fault's target. With `mark` set, the sockets carry the
fault's SO_MARK, which every rule of the fault skips: the same probe measured at the same time
through the unfaulted path is the control the proof compares against.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import socket
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

SO_MARK = 36
SIOCOUTQ = 0x5411  # TIOCOUTQ: bytes in the send queue not yet acknowledged by the peer
# PostgreSQL answers SSLRequest (code 80877103) and then GSSENCRequest (80877104) with one byte
# each (S/N, G/N) before any authentication: a round trip without credentials. The first answer
# comes from a freshly forked backend (milliseconds of fork time), so only the second one is
# timed. Closing before a startup packet is what PostgreSQL 9.3+ does not log.
PG_SSL_REQUEST = struct.pack("!II", 8, 80877103)
PG_GSSENC_REQUEST = struct.pack("!II", 8, 80877104)


@dataclass
class Sample:
    latency_ms: float | None       # None: the exchange failed
    status: int = 0
    injected: bool = False
    error: str = ""
    connection: int = -1           # which connection of many_round_trips carried it


@dataclass
class Endpoint:
    host: str
    port: int
    family: int = socket.AF_INET
    probe: str = "http"            # http | postgres | connect
    path: str = "/"
    extra: dict = field(default_factory=dict)


def new_socket(endpoint: Endpoint, mark: int | None, timeout_s: float) -> socket.socket:
    sock = socket.socket(endpoint.family, socket.SOCK_STREAM)
    spread_loopback_source(sock, endpoint)
    if mark is not None:
        sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout_s)
    return sock


def spread_loopback_source(sock: socket.socket, endpoint: Endpoint) -> None:
    """A random 127/8 source address for a loopback target. Thousands of probe connections per
    second from 127.0.0.1 reuse client ports whose tuples conntrack still tracks (CLOSE and
    TIME_WAIT entries); the redirect then cannot translate the new SYN and it is refused (0.3-5%
    of connections, measured). Spread over 127/8 the tuples do not repeat."""
    if endpoint.family == socket.AF_INET and endpoint.host.startswith("127."):
        octets = os.urandom(3)
        sock.bind((f"127.{octets[0]}.{octets[1]}.{max(1, octets[2])}", 0))


def round_trip(endpoint: Endpoint, mark: int | None = None, timeout_s: float = 5.0,
               requests_per_connection: int = 1) -> list[Sample]:
    """One connection, `requests_per_connection` sequential exchanges; latency per exchange."""
    samples: list[Sample] = []
    try:
        sock = new_socket(endpoint, mark, timeout_s)
        started = time.perf_counter_ns()
        sock.connect((endpoint.host, endpoint.port))
    except OSError as error:
        return [Sample(None, error=error.__class__.__name__)]
    try:
        if endpoint.probe == "connect":
            return [Sample((time.perf_counter_ns() - started) / 1e6)]
        reader = sock.makefile("rb")
        for index in range(requests_per_connection):
            last = index == requests_per_connection - 1
            started = time.perf_counter_ns()
            if endpoint.probe == "postgres":
                sock.sendall(PG_SSL_REQUEST)
                answer = reader.read(1)
                started = time.perf_counter_ns()
                sock.sendall(PG_GSSENC_REQUEST)
                answer = answer and reader.read(1)
                samples.append(Sample((time.perf_counter_ns() - started) / 1e6 if answer else None,
                                      error="" if answer else "closed"))
                break
            sock.sendall(http_request(endpoint, close=last))
            samples.append(read_http_answer(reader, started))
            if samples[-1].latency_ms is None:
                break
    except OSError as error:
        samples.append(Sample(None, error=error.__class__.__name__))
    finally:
        sock.close()
    return samples


def http_request(endpoint: Endpoint, close: bool) -> bytes:
    return (f"GET {endpoint.path} HTTP/1.1\r\nHost: {endpoint.host}:{endpoint.port}\r\n"
            f"User-Agent: guardian-agent-chaos-proof\r\n"
            f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n").encode()


def read_http_answer(reader, started_ns: int) -> Sample:
    status_line = reader.readline(65536)
    latency_ms = (time.perf_counter_ns() - started_ns) / 1e6
    if not status_line:
        return Sample(None, error="closed")
    parts = status_line.split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    length, injected = 0, False
    while True:
        line = reader.readline(65536)
        if line in (b"\r\n", b"\n", b""):
            break
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value.strip() or 0)
        elif name == b"x-guardian-chaos":
            injected = True
    if length:
        reader.read(length)
    return Sample(latency_ms, status=status, injected=injected)


def many_round_trips(endpoint: Endpoint, count: int, parallel: int = 8, mark: int | None = None,
                     timeout_s: float = 5.0, requests_per_connection: int = 1) -> list[Sample]:
    """`count` exchanges, `parallel` connections in flight at once, on ONE thread with a poller.

    One thread on purpose: with threads, answers that arrive together queue for the GIL (5 ms
    switch interval) and the probe would report its own wait as latency (+15 ms at 10 threads,
    measured). Each connection sends its next request as soon as the previous answer is in."""
    if endpoint.probe == "connect":
        return [round_trip(endpoint, mark, timeout_s)[0] for _ in range(count)]
    samples: list[Sample] = []
    connections = max(1, -(-count // requests_per_connection))
    waiting = list(range(connections))
    active: dict[int, _Exchange] = {}
    poller = select.poll()
    deadline = time.monotonic() + timeout_s * max(1, requests_per_connection)
    while (waiting or active) and time.monotonic() < deadline:
        while waiting and len(active) < parallel:
            index = waiting.pop()
            exchange = _Exchange(endpoint, mark, timeout_s, index, min(requests_per_connection, count - len(samples)
                                                                - sum(e.left for e in active.values())))
            if exchange.left <= 0:
                continue
            if exchange.sock is None:
                samples.append(exchange.failure)
                continue
            active[exchange.sock.fileno()] = exchange
            poller.register(exchange.sock.fileno(), select.POLLIN)
        for fileno, _event in poller.poll(50):
            exchange = active[fileno]
            finished = exchange.on_readable(samples)
            if finished:
                poller.unregister(fileno)
                exchange.sock.close()
                del active[fileno]
    for exchange in active.values():
        samples.append(Sample(None, error="timeout"))
        exchange.sock.close()
    return samples[:count]


class _Exchange:
    """One keep-alive connection of many_round_trips."""

    def __init__(self, endpoint: Endpoint, mark: int | None, timeout_s: float, index: int, requests: int):
        self.endpoint, self.left, self.buffer, self.index = endpoint, requests, b"", index
        self.pg_negotiated = False
        self.sock: socket.socket | None = None
        self.failure = Sample(None)
        try:
            sock = new_socket(endpoint, mark, timeout_s)
            sock.connect((endpoint.host, endpoint.port))
        except OSError as error:
            self.failure = Sample(None, error=error.__class__.__name__)
            return
        sock.setblocking(False)
        self.sock = sock
        self.send()

    def send(self) -> None:
        if self.endpoint.probe == "postgres":
            payload = PG_GSSENC_REQUEST if self.pg_negotiated else PG_SSL_REQUEST
        else:
            payload = http_request(self.endpoint, self.left == 1)
        self.started_ns = time.perf_counter_ns()
        self.sock.send(payload)  # small: fits the empty send buffer of a fresh exchange

    def on_readable(self, samples: list[Sample]) -> bool:
        """True when this connection is done (all its requests answered, or failed)."""
        arrived_ns = time.perf_counter_ns()
        try:
            data = self.sock.recv(262144)
        except BlockingIOError:
            return False
        except OSError as error:
            samples.append(Sample(None, error=error.__class__.__name__))
            return True
        if not data:
            samples.append(Sample(None, error="closed"))
            return True
        if not self.buffer:
            self.first_byte_ns = arrived_ns
        self.buffer += data
        if self.endpoint.probe == "postgres":
            if not self.pg_negotiated:
                self.pg_negotiated, self.buffer = True, b""
                self.send()
                return False
            samples.append(Sample((self.first_byte_ns - self.started_ns) / 1e6, connection=self.index))
            return True
        answer = parse_http_answer(self.buffer)
        if answer is None:
            return False
        status, injected, used = answer
        samples.append(Sample((self.first_byte_ns - self.started_ns) / 1e6, status=status, injected=injected,
                              connection=self.index))
        self.buffer = self.buffer[used:]
        self.left -= 1
        if self.left <= 0:
            return True
        self.send()
        return False


def parse_http_answer(buffer: bytes) -> tuple[int, bool, int] | None:
    """(status, injected by the fault proxy, bytes used) once a whole answer is in the buffer."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buffer[:end].decode("latin-1").split("\r\n")
    parts = head[0].split()
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
    length, injected = 0, False
    for line in head[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value.strip() or 0)
        elif name == "x-guardian-chaos":
            injected = True
    used = end + 4 + length
    return (status, injected, used) if len(buffer) >= used else None


def median_ms(samples: list[Sample]) -> float | None:
    values = sorted(s.latency_ms for s in samples if s.latency_ms is not None)
    if not values:
        return None
    middle = len(values) // 2
    return values[middle] if len(values) % 2 else (values[middle - 1] + values[middle]) / 2


def connect_share(endpoint: Endpoint, count: int, batch: int = 500, wait_s: float = 0.15,
                  mark: int | None = None) -> float:
    """Share of TCP connects that complete within wait_s (a dropped SYN is retransmitted after
    the kernel's 1 s initial RTO, so within 0.15 s it counts as lost). Non-blocking, in batches."""
    completed = 0
    for first in range(0, count, batch):
        socks = []
        for _ in range(min(batch, count - first)):
            sock = socket.socket(endpoint.family, socket.SOCK_STREAM)
            spread_loopback_source(sock, endpoint)
            if mark is not None:
                sock.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
            sock.setblocking(False)
            sock.connect_ex((endpoint.host, endpoint.port))
            socks.append(sock)
        completed += _count_connected(socks, wait_s)
        for sock in socks:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
    return completed / count if count else 0.0


def _count_connected(socks: list[socket.socket], wait_s: float) -> int:
    poller = select.poll()
    waiting = {sock.fileno(): sock for sock in socks}
    for fileno in waiting:
        poller.register(fileno, select.POLLOUT)
    connected = 0
    deadline = time.monotonic() + wait_s
    while waiting and time.monotonic() < deadline:
        for fileno, _event in poller.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            sock = waiting.pop(fileno)
            poller.unregister(fileno)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                connected += 1
    return connected


def reset_share(endpoint: Endpoint, count: int, batch: int = 25, wait_s: float = 0.15,
                mark: int | None = None) -> tuple[float, int]:
    """Share of connections reset at connect or at their first request: connect, send one
    request, then watch for ECONNRESET. Returns (share reset, connections that connected)."""
    resets = connected = 0
    for first in range(0, count, batch):
        socks = []
        for _ in range(min(batch, count - first)):
            sock = new_socket(endpoint, mark, 1.0)
            try:
                sock.connect((endpoint.host, endpoint.port))
            except ConnectionResetError:  # accepted, then reset before connect() returned
                connected += 1
                resets += 1
                sock.close()
                continue
            except OSError:
                sock.close()
                continue
            connected += 1
            try:
                sock.sendall(http_request(endpoint, close=False))
            except ConnectionResetError:  # reset at connect, before the request left
                resets += 1
                sock.close()
                continue
            sock.setblocking(False)
            socks.append(sock)
        deadline = time.monotonic() + wait_s
        undecided = list(socks)
        while undecided and time.monotonic() < deadline:
            select.select(undecided, [], [], max(0.0, deadline - time.monotonic()))
            still = []
            for sock in undecided:
                outcome = _reset_outcome(sock)
                if outcome is None:
                    still.append(sock)
                resets += outcome is True
            undecided = still
        for sock in socks:
            sock.close()
    return (resets / connected if connected else 0.0), connected


def _reset_outcome(sock: socket.socket) -> bool | None:
    """True: reset; False: answered or closed cleanly; None: nothing yet."""
    try:
        data = sock.recv(65536)
        return False if data or data == b"" else None
    except BlockingIOError:
        return None
    except ConnectionResetError:
        return True
    except OSError as error:
        return True if error.errno == errno.ECONNRESET else False


def upload_rate_bytes_per_s(endpoint: Endpoint, seconds: float = 1.0, mark: int | None = None) -> float:
    """Bytes the peer's kernel acknowledged per second while we send as fast as we can (the
    peer need not read: its receive buffer takes the bytes, which is all a rate limit acts on)."""
    sock = new_socket(endpoint, mark, 1.0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 256 * 1024)
    sock.connect((endpoint.host, endpoint.port))
    sock.setblocking(False)
    chunk = b"\0" * 16384
    sent = 0
    started = time.monotonic()
    warmup_done, acked_at_warmup, warmup_time = False, 0, started
    try:
        while time.monotonic() - started < seconds:
            select.select([], [sock], [], 0.05)
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                pass
            if not warmup_done and time.monotonic() - started > 0.2:
                # The first 200 ms fill the token bucket's burst and the socket buffers.
                warmup_done, warmup_time = True, time.monotonic()
                acked_at_warmup = sent - _unacked(sock)
        acked = sent - _unacked(sock)
    except OSError:
        acked = sent
    finally:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    elapsed = time.monotonic() - warmup_time
    return (acked - acked_at_warmup) / elapsed if elapsed > 0 else 0.0


def _unacked(sock: socket.socket) -> int:
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), SIOCOUTQ, b"\0\0\0\0"))[0]
