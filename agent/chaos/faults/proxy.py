"""The fault proxy: a TCP relay on loopback that adds delay/jitter or answers HTTP errors.

Started by the latency and http_error injectors as a PDEATHSIG child of the agent. The proxy
itself creates the nft `flags owner` table whose `redirect` rule sends the target's new
connections to it, through its own PDEATHSIG `nft -i` child. So the chain is agent -> proxy ->
nft: the agent dying kills the proxy, the proxy dying (crash or kill) kills nft and the kernel
drops the redirect, and traffic flows direct again: the proxy fails open.

Upstream sockets carry SO_MARK so the redirect rule skips the proxy's own connections.

Delay is added to the upstream -> client direction (the answer), once per chunk, at
arrival + delay_ms (+ jitter), never earlier than the chunk before it: a request/response round
trip is delay_ms longer however many are in flight, and byte order is kept.

HTTP errors are rolled per request (not per connection, Toxiproxy's weakness): each request
head is parsed (Content-Length bodies are skipped with it) and a rolled one is answered by the
proxy on the same keep-alive connection without reaching upstream. Requests with chunked bodies
switch that connection to plain relaying. Clients that pipeline requests could see an injected
answer overtake an upstream one: HTTP/1.1 clients in practice do not pipeline.

Resets are rolled per connection at accept (`--reset-on connect`) or per chunk the client sends
(`--reset-on request`: a request written in one send); a rolled one is reset on BOTH sides
(SO_LINGER 0 then close), so the dependency does not keep a half-open connection, which an nft
`reject with tcp reset` (it answers only the sender) would leave behind in the server.

Runs as `python -m agent.chaos.faults.proxy ...`. With --standby (the injectors' check() starts
it so) it binds, starts its `nft -i` holder, prints `STANDBY <port>` and waits for a `go` line on
stdin: Python's startup (0.1-0.2 s on a loaded 2-core host, measured) is then paid before the
fault is decided, and apply() costs one nft transaction. It prints `READY <port> <nft_pid>` once
the redirect is live. End of stdin (the agent closed it or died) ends the proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import selectors
import socket
import struct
import sys
import time

SO_MARK = 36  # <linux/socket.h>; not exported by Python's socket module
HIGH_WATER_BYTES = 256 * 1024


class Relay:
    """One client connection and its upstream connection."""

    def __init__(self, settings: argparse.Namespace, loop: asyncio.AbstractEventLoop):
        self.settings = settings
        self.loop = loop
        self.client: asyncio.Transport | None = None
        self.upstream: asyncio.Transport | None = None
        self.pending_up: list[bytes] = []
        self.up_eof = False
        self.last_due = 0.0
        self.jitter_offset_s = 0.0
        self.head = b""
        self.body_left = 0
        self.passthrough = settings.http_error_pct <= 0
        self.discarding = False

    def rolled_reset(self, moment: str) -> bool:
        settings = self.settings
        return settings.reset_pct > 0 and settings.reset_on == moment and random.random() * 100.0 < settings.reset_pct

    def reset_both(self) -> None:
        for transport in (self.client, self.upstream):
            if transport is not None and not transport.is_closing():
                sock = transport.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                transport.abort()
        self.pending_up.clear()

    # client -> upstream
    def from_client(self, data: bytes) -> None:
        if self.rolled_reset("request"):
            self.reset_both()
            return
        if self.passthrough:
            self.to_upstream(data)
            return
        while data:
            if self.body_left:
                piece, data = data[:self.body_left], data[self.body_left:]
                self.body_left -= len(piece)
                if not self.discarding:
                    self.to_upstream(piece)
                continue
            self.head += data
            data = b""
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > 65536:  # not HTTP as we know it: relay untouched from here on
                    self.passthrough = True
                    self.to_upstream(self.head)
                    self.head = b""
                return
            head, data, self.head = self.head[:end + 4], self.head[end + 4:], b""
            self.request(head, data)
            if self.passthrough:
                return

    def request(self, head: bytes, rest: bytes) -> None:
        lowered = head.lower()
        if b"transfer-encoding:" in lowered:
            self.passthrough = True
            self.to_upstream(head + rest)
            return
        self.body_left = content_length(lowered)
        self.discarding = random.random() * 100.0 < self.settings.http_error_pct
        if self.discarding:
            self.answer_error(lowered)
        else:
            self.to_upstream(head)
        if rest:
            self.from_client(rest)

    def answer_error(self, lowered_head: bytes) -> None:
        status = self.settings.http_status
        body = f"guardian-agent chaos: injected {status}\n".encode()
        close = b"connection: close" in lowered_head or lowered_head.split(b"\r\n", 1)[0].endswith(b"http/1.0")
        head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Injected')}\r\n"
                f"Content-Type: text/plain\r\nContent-Length: {len(body)}\r\n"
                f"X-Guardian-Chaos: injected\r\n"
                f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n").encode()
        self.to_client(head + body)
        if close:
            self.to_client(None)

    def to_upstream(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending_up.append(data)
        else:
            self.upstream.write(data)

    # upstream -> client, delayed
    def to_client(self, data: bytes | None) -> None:
        """data None = end of stream (close after what is queued)."""
        delay_s = self.settings.delay_s
        if delay_s <= 0 and self.settings.jitter_s <= 0:
            self._deliver(data)
            return
        now = self.loop.time()
        due = now + delay_s
        if self.settings.jitter_s > 0:
            # One draw per answer, not per chunk: a chunk that arrives while the one before it is
            # still held is the same answer (headers, then body) and keeps its offset. Drawn per
            # chunk, a two-segment answer waited for the later of two draws: the median of
            # 20 +- 10 ms came out at 23.1 ms, twice, in the live test.
            if self.last_due <= now:
                self.jitter_offset_s = random.uniform(-self.settings.jitter_s, self.settings.jitter_s)
            due += self.jitter_offset_s
        due = max(due, self.last_due, now)
        self.last_due = due
        self.loop.call_at(due, self._deliver, data)

    def _deliver(self, data: bytes | None) -> None:
        if self.client is None or self.client.is_closing():
            return
        if data is None:
            self.client.close()
        else:
            self.client.write(data)

    def close_all(self) -> None:
        if self.upstream is not None and not self.upstream.is_closing():
            self.upstream.close()


LIVE_RELAYS: set[Relay] = set()


def reset_everything_and_exit(server, listener: socket.socket) -> None:
    """SIGTERM (remove()): RST every relayed connection on both sides, then exit. A SIGKILL
    alone left a client whose request was inside the proxy waiting for its own timeout
    (measured: 2 s), where a reset tells it at once to retry, now on the direct path."""
    while True:  # connections still in the accept queue: reset them too
        try:
            pending, _address = listener.accept()
        except OSError:
            break
        pending.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        pending.close()
    server.close()
    for relay in list(LIVE_RELAYS):
        relay.reset_both()
    sys.stdout.flush()
    import os
    os._exit(0)


class ClientSide(asyncio.Protocol):
    def __init__(self, settings, loop):
        self.relay = Relay(settings, loop)
        self.settings = settings

    def connection_made(self, transport):
        self.relay.client = transport
        LIVE_RELAYS.add(self.relay)
        if self.relay.rolled_reset("connect"):
            self.relay.reset_both()
            return
        asyncio.ensure_future(self.connect_upstream())

    async def connect_upstream(self):
        relay, settings = self.relay, self.settings
        sock = socket.socket(settings.family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_MARK, settings.mark)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setblocking(False)
            await relay.loop.sock_connect(sock, (settings.upstream_host, settings.upstream_port))
            transport, _ = await relay.loop.create_connection(lambda: UpstreamSide(relay), sock=sock)
        except OSError:
            sock.close()
            if relay.client is not None:
                relay.client.abort()  # upstream refused: the client sees what it would have seen
            return
        relay.upstream = transport
        if relay.client is None:  # reset (or gone) while connecting
            transport.abort()
            return
        for data in relay.pending_up:
            transport.write(data)
        relay.pending_up.clear()
        if relay.up_eof and transport.can_write_eof():
            transport.write_eof()

    def data_received(self, data):
        self.relay.from_client(data)

    def eof_received(self):
        relay = self.relay
        if relay.upstream is None:
            relay.up_eof = True
        elif relay.upstream.can_write_eof():
            relay.upstream.write_eof()
        return True  # half-close: keep delivering the answer

    def connection_lost(self, exc):
        LIVE_RELAYS.discard(self.relay)
        self.relay.client = None
        self.relay.close_all()

    def pause_writing(self):
        if self.relay.upstream is not None:
            self.relay.upstream.pause_reading()

    def resume_writing(self):
        if self.relay.upstream is not None:
            self.relay.upstream.resume_reading()


class UpstreamSide(asyncio.Protocol):
    def __init__(self, relay: Relay):
        self.relay = relay

    def data_received(self, data):
        self.relay.to_client(data)

    def eof_received(self):
        self.relay.to_client(None)
        return False

    def connection_lost(self, exc):
        self.relay.to_client(None)

    def pause_writing(self):
        if self.relay.client is not None:
            self.relay.client.pause_reading()

    def resume_writing(self):
        if self.relay.client is not None:
            self.relay.client.resume_reading()


REASONS = {429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
           503: "Service Unavailable", 504: "Gateway Timeout"}


def content_length(lowered_head: bytes) -> int:
    start = lowered_head.find(b"\r\ncontent-length:")
    if start < 0:
        return 0
    end = lowered_head.find(b"\r\n", start + 2)
    try:
        return max(0, int(lowered_head[start + 17:end].strip()))
    except ValueError:
        return 0


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="guardian-agent-chaos-proxy")
    parser.add_argument("--upstream-host", required=True)
    parser.add_argument("--upstream-port", type=int, required=True)
    parser.add_argument("--mark", type=lambda v: int(v, 0), required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--jitter-ms", type=float, default=0.0)
    parser.add_argument("--http-error-pct", type=float, default=0.0)
    parser.add_argument("--http-status", type=int, default=503)
    parser.add_argument("--reset-pct", type=float, default=0.0)
    parser.add_argument("--reset-on", choices=("request", "connect"), default="request")
    parser.add_argument("--standby", action="store_true", help="wait for `go` on stdin before redirecting")
    parser.add_argument("--nft-table", default="")
    parser.add_argument("--nft-body", default="", help="rules; {port} becomes the proxy's port")
    settings = parser.parse_args(argv)
    settings.family = socket.AF_INET6 if ":" in settings.upstream_host else socket.AF_INET
    settings.delay_s = settings.delay_ms / 1000.0
    settings.jitter_s = settings.jitter_ms / 1000.0
    return settings


class PreciseEpollSelector(selectors.EpollSelector):
    """epoll whose timeout is not rounded up to the next millisecond.

    CPython 3.11 converts epoll's timeout to whole milliseconds rounding up, so every delayed
    answer would land on average 0.5 ms (up to 1 ms) late: too much for "+-1 ms" on small delays.
    Whole milliseconds go to epoll, the remainder to nanosleep after a non-blocking poll, which
    only runs while a delayed answer is due within the millisecond."""

    def select(self, timeout=None):
        if timeout is None or timeout <= 0:
            return super().select(timeout)
        deadline = time.monotonic() + timeout
        whole_s = math.floor(timeout * 1000) / 1000
        if whole_s > 0:
            events = super().select(whole_s)
            if events:
                return events
        events = super().select(0)
        remaining_s = deadline - time.monotonic()
        if events or remaining_s <= 0:
            return events
        time.sleep(remaining_s)
        return super().select(0)


def listening_socket(family: int) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


async def serve(settings: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    sock = listening_socket(settings.family)
    port = sock.getsockname()[1]
    server = await loop.create_server(lambda: ClientSide(settings, loop), sock=sock, backlog=4096)
    import signal
    loop.add_signal_handler(signal.SIGTERM, reset_everything_and_exit, server, sock)
    table = None
    if settings.nft_table:
        from agent.chaos.faults.nft import OwnedTable
        table = OwnedTable(settings.nft_table)
        table.start()
    if settings.standby:
        print(f"STANDBY {port}", flush=True)
        command = await loop.run_in_executor(None, sys.stdin.readline)
        if command.strip() != "go":
            return
    nft_pid = 0
    if table is not None:
        try:
            nft_pid = table.create(settings.nft_body.replace("{port}", str(port)))["pid"]
        except Exception as error:  # noqa: BLE001 - reported to the agent on stdout, then exit
            print(f"FAILED {' '.join(str(error).split())}", flush=True)
            return
    print(f"READY {port} {nft_pid}", flush=True)
    if settings.standby:
        # stdin at EOF: the agent is gone or done with us (PDEATHSIG covers a SIGKILL as well).
        loop.run_in_executor(None, sys.stdin.read).add_done_callback(lambda _f: server.close())
    async with server:
        try:
            await server.serve_forever()
        except asyncio.CancelledError:
            pass


def main(argv: list[str] | None = None) -> int:
    settings = parse_arguments(sys.argv[1:] if argv is None else argv)
    loop = asyncio.SelectorEventLoop(PreciseEpollSelector())
    try:
        loop.run_until_complete(serve(settings))
    except KeyboardInterrupt:
        pass
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
