"""Built-in KPI workloads of `tune experiment`, run as `python -m agent.tuning.kpi_builtin NAME
--duration-s S`: each prints one latency sample per line (integer ns) and ends by itself.

A separate, import-light child (like probes/jitter_loop.py): it starts fast, its Python overhead
is its own (not the agent's threads'), and the experiment reads it exactly as it reads a user's
--workload command, so the built-ins and user commands share one code path.

    loopback-rtt  one byte ping-ponged over a TCP connection on 127.0.0.1 (TCP_NODELAY) to an
                  echo process forked here; ns per round trip.
    syscall       getppid(2) in a tight loop (never cached by glibc, unlike getpid before 2.25),
                  timed per batch of SYSCALL_BATCH calls; ns per call (the batch's mean, so the
                  ~30 ns cost of reading the clock is spread over the batch).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import sys
import time

from core.children import die_with_parent  # before any fork: it loads libc with ctypes

SYSCALL_BATCH = 32
FLUSH_EVERY = 512


def _emit(buffer: list[str], value: int) -> None:
    buffer.append(f"{value}\n")
    if len(buffer) >= FLUSH_EVERY:
        _flush(buffer)


def _flush(buffer: list[str]) -> None:
    if buffer:
        sys.stdout.write("".join(buffer))
        sys.stdout.flush()
        buffer.clear()


def _echo(listener: socket.socket) -> None:
    connection, _ = listener.accept()
    connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    while True:
        data = connection.recv(64)
        if not data:
            return
        connection.sendall(data)


def loopback_rtt(duration_s: float) -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    parent = os.getpid()
    child = os.fork()
    if child == 0:
        die_with_parent(parent)
        try:
            _echo(listener)
        finally:
            os._exit(0)
    listener_port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", listener_port))
    listener.close()
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    clock, buffer = time.perf_counter_ns, []
    end = clock() + int(duration_s * 1e9)
    try:
        while True:
            started = clock()
            client.sendall(b"x")
            if not client.recv(64):
                break
            now = clock()
            _emit(buffer, now - started)
            if now >= end:
                break
    finally:
        _flush(buffer)
        client.close()
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def syscall_loop(duration_s: float) -> None:
    clock, getppid, buffer = time.perf_counter_ns, os.getppid, []
    batch = range(SYSCALL_BATCH)
    end = clock() + int(duration_s * 1e9)
    while True:
        started = clock()
        for _ in batch:
            getppid()
        now = clock()
        _emit(buffer, (now - started) // SYSCALL_BATCH)
        if now >= end:
            break
    _flush(buffer)


BUILTINS = {"loopback-rtt": loopback_rtt, "syscall": syscall_loop}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="agent.tuning.kpi_builtin")
    parser.add_argument("name", choices=sorted(BUILTINS))
    parser.add_argument("--duration-s", type=float, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        BUILTINS[args.name](args.duration_s)
    except BrokenPipeError:
        pass  # the experiment closed its end: the window is over
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
