"""One fake host's service for tests/test_tune_rollout_ansible.py, in a process of its own (so
the services do not share a GIL): a TCP server on loopback answering each ping after a delay,
and a client keeping it busy. With --slow-when-tuned the delay grows once the host's fake tree
carries the tuned vm.swappiness, read on every request: tuning really slows this service.

It runs SCHED_FIFO, as a latency-critical service on a trading host would: on this shared 2-core
machine (load ~10) a normally scheduled sleeper wakes up to ~4 ms late, which would swamp the
difference the gate has to judge; a real-time sleeper wakes within tens of microseconds.

Prints the port, then serves until stdin closes (the test ended) or --lifetime-s passes.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import sys
import threading
import time
from pathlib import Path

TUNED_SWAPPINESS = b"10\n"  # what trading-latency sets (the fixture tree has 60)


def serve(listener: socket.socket, root: Path, base_s: float, slow_s: float | None, deadline: float) -> None:
    connection, _ = listener.accept()
    with connection:
        while time.monotonic() < deadline:
            if not connection.recv(64):
                return
            tuned = slow_s is not None and (root / "proc/sys/vm/swappiness").read_bytes() == TUNED_SWAPPINESS
            time.sleep(slow_s if tuned else base_s)
            connection.sendall(b"pong\n")


def ping(port: int, pause_s: float, deadline: float) -> None:
    with socket.create_connection(("127.0.0.1", port)) as connection:
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while time.monotonic() < deadline:
            connection.sendall(b"ping\n")
            if not connection.recv(64):
                return
            time.sleep(pause_s)


def listen_below_ephemeral_ports() -> socket.socket:
    """A listener on a port below the kernel's ephemeral range, as real services have. A capture
    that starts mid-connection sees no SYN, and the analyser then takes the higher port for the
    client: with the server on an ephemeral port too, roles were a coin flip, and a flipped flow
    times pong -> next ping (the client's 0.5 ms pause) instead of the server's delay."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    for port in random.sample(range(max(1024, low - 12000), low), 200):
        try:
            return socket.create_server(("127.0.0.1", port))
        except OSError:
            continue
    raise SystemExit("no free port below the ephemeral range")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--delay-s", type=float, default=0.001)
    parser.add_argument("--slow-when-tuned", type=float, default=None, metavar="DELAY_S")
    parser.add_argument("--pause-s", type=float, default=0.0005)
    parser.add_argument("--lifetime-s", type=float, default=150.0)
    args = parser.parse_args()
    try:  # mostly asleep: far below the kernel's RT throttle (sched_rt_runtime_us, 95%)
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(10))
    except OSError as error:
        print(f"SCHED_FIFO refused ({error}): latencies will carry scheduling noise", file=sys.stderr)
    deadline = time.monotonic() + args.lifetime_s
    listener = listen_below_ephemeral_ports()
    port = listener.getsockname()[1]
    for target, arguments in ((serve, (listener, args.root, args.delay_s, args.slow_when_tuned, deadline)),
                              (ping, (port, args.pause_s, deadline))):
        threading.Thread(target=target, args=arguments, daemon=True).start()
    print(port, flush=True)
    watcher = threading.Thread(target=sys.stdin.read, daemon=True)  # returns when the test closes stdin
    watcher.start()
    watcher.join(max(0.0, deadline - time.monotonic()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
