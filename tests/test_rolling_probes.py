"""Rolling use of the eBPF probes (the daemon's way): one prepared instance, `keep_attached`,
collect() window after window returns exactly that window's data without detaching; a final
ordinary collect() detaches. Live: the real programs on this kernel."""

from __future__ import annotations

import platform
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import probes.syscalls
from probes.base import ProbeConfig, Window
from probes.syscalls import SyscallsProbe, summarize, window_histograms



def test_window_histograms_difference_cumulative_rows():
    slots = [0] * 36

    def row(count, total, max_ns, filled):
        values = list(slots)
        for slot, number in filled.items():
            values[slot] = number
        return {"count": count, "total_ns": total, "max_ns": max_ns, "slots": values, "comm": "app"}

    before = {(7, 39, 0): row(10, 1000, 500, {9: 10}), (7, 39, 1): row(5, 500, 120, {7: 5}),
              (8, 1, 0): row(3, 30, 10, {4: 3})}
    after = {(7, 39, 0): row(14, 1600, 500, {9: 12, 8: 2}), (7, 39, 1): row(6, 5600, 5100, {7: 5, 13: 1}),
             (8, 1, 0): row(3, 30, 10, {4: 3}), (9, 2, 1): row(1, 40, 40, {6: 1})}
    window = window_histograms(after, before)
    assert set(window) == {(7, 39), (9, 2)}, "rows with no call in the window are left out"
    pair = window[(7, 39)]
    assert pair["count"] == 5 and pair["total_ns"] == 5700
    assert pair["slots"][9] == 2 and pair["slots"][8] == 2 and pair["slots"][13] == 1
    assert pair["max_ns"] == 5100  # cpu 1's cumulative max grew: exact
    only_cpu0 = window_histograms({k: v for k, v in after.items() if k[2] == 0},
                                  {k: v for k, v in before.items() if k[2] == 0})
    # cpu 0's max did not grow: bounded by the highest bucket of the window (slot 9: < 512).
    assert only_cpu0[(7, 39)]["max_ns"] == 500
    assert window[(9, 2)]["count"] == 1 and window[(9, 2)]["max_ns"] == 40



def test_tcp_window_records_difference_open_connections_and_carry_a_late_close():
    from probes.tcp import SRTT_SLOTS, srtt_slot, window_records

    def record(first_ns, sent, received, srtts, **overrides):
        slots = [0] * SRTT_SLOTS
        for value in srtts:
            slots[srtt_slot(value)] += 1
        base = {"first_ns": first_ns, "family": 2, "laddr": b"\x7f\0\0\1", "raddr": b"\x7f\0\0\1",
                "lport": 40000 + first_ns, "rport": 5432, "bytes_sent": sent, "bytes_received": received,
                "srtt_sum_us": sum(srtts), "srtt_samples": len(srtts), "srtt_slots": slots,
                "srtt_min_us": min(srtts, default=0), "srtt_max_us": max(srtts, default=0),
                "retransmits": 0, "resets_received": 0, "resets_sent": 0, "closed_ns": 0}
        return {**base, **overrides}

    _, opened, snapshot = window_records([], [record(1, 100, 50, [40, 900]), record(2, 10, 10, [30])], {})
    assert [r["bytes_sent"] for r in opened] == [100, 10], "first window: everything since attach"
    # window 2: connection 1 sends more and closes; connection 2 closes between the two reads.
    closed, opened, snapshot = window_records(
        [record(1, 350, 80, [40, 900, 50, 60], closed_ns=9)], [record(3, 5, 5, [20])], snapshot)
    assert (closed[0]["bytes_sent"], closed[0]["bytes_received"], closed[0]["srtt_samples"]) == (250, 30, 2)
    assert closed[0]["srtt_max_us"] <= 63 and closed[0]["srtt_min_us"] == 48  # bounded by this window's slots
    assert opened[0]["bytes_sent"] == 5
    assert set(key[0] for key in snapshot) == {2, 3}, "connection 2's snapshot is carried once"
    closed, _, snapshot = window_records([record(2, 12, 10, [30], closed_ns=9)], [], snapshot)
    assert closed[0]["bytes_sent"] == 2 and closed[0]["srtt_samples"] == 0
    assert set(key[0] for key in snapshot) == {3}

class SyscallChild:
    """The pattern of tests/syscall_child.py, round after round: one line `N` = N getppid calls."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, "-c", CHILD_LOOP],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.process.stdout.readline().strip() == "ready"

    def round(self, getppids: int) -> None:
        self.process.stdin.write(f"{getppids}\n")
        self.process.stdin.flush()
        assert self.process.stdout.readline().strip() == "done"

    def close(self) -> None:
        if self.process.poll() is None:
            try:
                self.process.stdin.write("0\n")
                self.process.stdin.close()
            except (BrokenPipeError, OSError):
                pass
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


# Direct syscall(2), as in tests/syscall_child.py, so libc caching cannot hide or add calls.
CHILD_LOOP = """
import ctypes, sys
libc = ctypes.CDLL(None, use_errno=True)
print("ready", flush=True)
for _round in range(10):
    count = int(sys.stdin.readline() or 0)
    if count <= 0:
        break
    for _ in range(count):
        libc.syscall(110)
    print("done", flush=True)
"""


def window_while(action) -> Window:
    """A window that ends as soon as `action` (run in a thread) returns."""
    window = Window(60, Path("/tmp"))

    def run():
        try:
            action()
        finally:
            window.stop()

    threading.Thread(target=run, daemon=True).start()
    return window


@pytest.mark.live
@pytest.mark.timeout(120)
@pytest.mark.skipif(platform.machine() != "x86_64", reason="getppid is syscall 110 on x86_64")
def test_syscalls_probe_rolls_exact_windows_without_detaching():
    child = SyscallChild()
    try:
        probe = SyscallsProbe(ProbeConfig(pids=(child.process.pid,)))
        probe.check()
        probe.prepare()
        probe.keep_attached_between_windows()
        bpf = probe._bpf
        counts = []
        for getppids in (300, 700):
            tables = probe.collect(window_while(lambda n=getppids: child.round(n)))
            assert probe._bpf is bpf, "still attached between windows, same program"
            rows = {row["syscall"]: row for row in summarize(tables["syscalls"])}
            counts.append(rows["getppid"]["count"])
            assert sum(r["bucket_count"] for r in tables["syscall_buckets"].to_pylist() if r["syscall"] == "getppid") \
                == getppids
        assert counts == [300, 700]
        probe.keep_attached = False
        tables = probe.collect(window_while(lambda: child.round(50)))
        assert {row["syscall"]: row["count"] for row in summarize(tables["syscalls"])}["getppid"] == 50
        assert probe._bpf is None, "an ordinary collect() detaches"
    finally:
        child.close()


def receive_exactly(connection: socket.socket, size: int) -> None:
    received = 0
    while received < size:
        chunk = connection.recv(min(65536, size - received))
        assert chunk, "peer closed early"
        received += len(chunk)


ROUNDS = ((1000, 200), (5000, 3000), (10, 20))  # (client sends, server answers) per window


@pytest.mark.live
@pytest.mark.timeout(120)
def test_tcp_probe_rolls_per_window_bytes_without_detaching():
    from probes.tcp import TcpProbe

    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(30)
    port = listener.getsockname()[1]

    def serve():
        connection, _ = listener.accept()
        with connection:
            connection.settimeout(30)
            for request, answer in ROUNDS:
                receive_exactly(connection, request)
                connection.sendall(b"a" * answer)
            connection.recv(1)  # until the client closes

    server = threading.Thread(target=serve, daemon=True)
    probe = TcpProbe(ProbeConfig())
    probe.check()
    probe.prepare()
    probe.keep_attached_between_windows()
    bpf = probe._bpf
    client = None
    try:
        server.start()
        client = socket.create_connection(("127.0.0.1", port), timeout=30)
        local_port = client.getsockname()[1]

        def exchange(request: int, answer: int, close: bool = False) -> None:
            client.sendall(b"q" * request)
            receive_exactly(client, answer)
            if close:
                client.close()

        def ours(tables):
            rows = [row for row in tables["tcp"].to_pylist()
                    if row["lport"] == local_port and row["rport"] == port and row["raddr"] == "127.0.0.1"]
            assert len(rows) == 1, tables["tcp"].to_pylist()
            return rows[0]

        for request, answer in ROUNDS[:2]:
            row = ours(probe.collect(window_while(lambda r=request, a=answer: exchange(r, a))))
            assert probe._bpf is bpf, "still attached between windows, same program"
            assert not row["closed"] and row["state"] == "ESTABLISHED"
            assert (row["bytes_sent"], row["bytes_received"]) == (request, answer)
            assert row["srtt_samples"] > 0 and row["srtt_us_min"] <= row["srtt_us_p50"] <= row["srtt_us_max"]
        probe.keep_attached = False
        request, answer = ROUNDS[2]
        row = ours(probe.collect(window_while(lambda: exchange(request, answer, close=True))))
        assert row["closed"] and (row["bytes_sent"], row["bytes_received"]) == (request, answer)
        assert probe._bpf is None, "an ordinary collect() detaches"
    finally:
        probe.detach()
        if client is not None:
            client.close()
        listener.close()
        server.join(10)


@pytest.mark.live
@pytest.mark.timeout(120)
@pytest.mark.skipif(platform.machine() != "x86_64", reason="getppid is syscall 110 on x86_64")
def test_syscalls_probe_rearms_before_its_maps_fill_and_stays_exact(monkeypatch):
    monkeypatch.setattr(probes.syscalls, "REARM_FRACTION", 0.0)  # re-arm after every window
    child = SyscallChild()
    probe = SyscallsProbe(ProbeConfig(pids=(child.process.pid,)))
    try:
        probe.check()
        probe.prepare()
        probe.keep_attached_between_windows()
        first = probe._bpf
        for getppids in (300, 700):
            tables = probe.collect(window_while(lambda n=getppids: child.round(n)))
            assert {row["syscall"]: row["count"] for row in summarize(tables["syscalls"])}["getppid"] == getppids
            assert probe._bpf is not None
        assert probe._bpf is not first, "loaded afresh"
    finally:
        probe.detach()
        child.close()
