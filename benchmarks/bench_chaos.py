"""Chaos fault injectors: accuracy, activation/removal time, and the fault proxy's cost.

Target: a small asyncio HTTP/1.1 keep-alive server on loopback started by this script; every
figure is measured through the faulted path by the agent's own probe (agent/chaos/faults/pathprobe).

1. Latency accuracy at p50: delay_ms 1, 5, 20, 100 (and 500 with --full); sequential keep-alive
   requests, p50 through the fault minus p50 direct, against the issue's +-5% or +-1 ms.
2. Share accuracy: loss 10/20% (SYN drops in 4000 connects), resets 30% (5000 connections),
   HTTP errors 10/50% (5000 requests, rolled per request); against +-2 points.
3. Activation and removal: a prober opens a new connection per request in a loop; the time from
   the apply() call to the first injected answer, and from the remove() call to the first clean
   answer of a request sent after it (HTTP errors at 100%: each answer says whether it was
   injected, so no threshold is needed); against 100 ms.
4. Proxy cost with no fault (delay_ms = 0): p50 per request through the proxy vs direct (the same
   probe, its sockets marked so the redirect skips them), and requests/s with 8 keep-alive
   connections from 2 client processes, side by side with the direct path; against +0.5 ms and
   5,000 requests/s.

Writes benchmarks/results/chaos.json. The machine is shared (2 cores, other engineers' tests):
the figures carry that noise, and the JSON records the load average.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.chaos.faults import injector_for, pathprobe  # noqa: E402

SERVER = r"""
import asyncio
class Handler(asyncio.Protocol):
    def connection_made(self, transport): self.transport, self.buffer = transport, b""
    def data_received(self, data):
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
            if b"connection: close" in head.lower():
                self.transport.close()
async def main():
    server = await asyncio.get_running_loop().create_server(Handler, "127.0.0.1", 0, backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main())
"""

# One client process of the throughput figure: prints requests/s over `seconds`.
CLIENT = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from agent.chaos.faults import pathprobe
port, mark, count = int(sys.argv[2]), int(sys.argv[3]) or None, int(sys.argv[4])
endpoint = pathprobe.Endpoint("127.0.0.1", port)
started = time.perf_counter()
samples = pathprobe.many_round_trips(endpoint, count, parallel=4, mark=mark, requests_per_connection=count // 4)
elapsed = time.perf_counter() - started
print(sum(1 for s in samples if s.status == 200), elapsed)
"""


def make(spec: dict):
    cls = injector_for(spec["kind"])
    injector = cls(cls.validate({"duration_s": 60, **spec}, "bench"))
    injector.check()
    return injector


def sequential_p50_ms(endpoint: pathprobe.Endpoint, count: int, mark: int | None = None) -> float:
    samples: list[pathprobe.Sample] = []
    while len(samples) < count:
        samples += pathprobe.round_trip(endpoint, mark=mark, requests_per_connection=min(200, count - len(samples)))
    return pathprobe.median_ms(samples)


def latency_accuracy(target: str, endpoint: pathprobe.Endpoint, delays: list[float]) -> list[dict]:
    rows = []
    for delay_ms in delays:
        injector = make({"kind": "latency", "target": target, "delay_ms": delay_ms})
        injector.apply()
        try:
            count = 30 if delay_ms >= 100 else 100
            direct = sequential_p50_ms(endpoint, count, mark=injector.mark)
            faulted = sequential_p50_ms(endpoint, count)
        finally:
            injector.remove()
        added = faulted - direct
        error = added - delay_ms
        rows.append({"delay_ms": delay_ms, "direct_p50_ms": round(direct, 3), "faulted_p50_ms": round(faulted, 3),
                     "added_ms": round(added, 3), "error_ms": round(error, 3),
                     "error_pct": round(100 * error / delay_ms, 2), "samples": count,
                     "within_spec": abs(error) <= max(0.05 * delay_ms, 1.0)})
        print(f"latency {delay_ms:g} ms: +{added:.3f} ms at p50 (error {error:+.3f} ms)", flush=True)
    return rows


def share_accuracy(target: str, endpoint: pathprobe.Endpoint) -> list[dict]:
    rows = []
    cases = [("loss", 10), ("loss", 20), ("reset", 30), ("http_error", 10), ("http_error", 50)]
    for kind, share_pct in cases:
        injector = make({"kind": kind, "target": target, "share_pct": share_pct})
        injector.apply()
        try:
            if kind == "loss":
                samples = 4000
                measured = 100 * (1 - pathprobe.connect_share(endpoint, samples))
            elif kind == "reset":
                fraction, samples = pathprobe.reset_share(endpoint, 5000)
                measured = 100 * fraction
            else:
                answers = pathprobe.many_round_trips(endpoint, 5000, parallel=4, requests_per_connection=250)
                samples = len(answers)
                measured = 100 * sum(s.injected for s in answers) / samples
        finally:
            injector.remove()
        rows.append({"kind": kind, "share_pct": share_pct, "measured_pct": round(measured, 2), "samples": samples,
                     "error_points": round(measured - share_pct, 2), "within_spec": abs(measured - share_pct) <= 2})
        print(f"{kind} {share_pct}%: measured {measured:.2f}% over {samples}", flush=True)
    return rows


# The prober of the activation figure, in its own process (a thread would share the GIL with
# apply()/remove() and time its own waits): one request per new connection, forever, printing
# "start end injected" per answer (CLOCK_MONOTONIC is shared by processes).
PROBER = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from agent.chaos.faults import pathprobe
endpoint = pathprobe.Endpoint("127.0.0.1", int(sys.argv[2]))
while True:
    started = time.monotonic()
    sample = pathprobe.round_trip(endpoint, timeout_s=2)[0]
    print(started, time.monotonic(), int(sample.injected), sample.error or "-", flush=True)
"""


def activation_and_removal(target: str, endpoint: pathprobe.Endpoint, rounds: int) -> list[dict]:
    """Activation: apply() call -> end of the first injected answer. Removal: remove() call ->
    end of the first clean answer to a request started after the call (HTTP errors at 100%)."""
    rows = []
    for _ in range(rounds):
        injector = make({"kind": "http_error", "target": target, "share_pct": 100})
        # The log goes to a file: a pipe (64 KiB) fills in half a second and would stall the prober.
        with tempfile.TemporaryFile("w+") as log_file:
            prober = subprocess.Popen([sys.executable, "-c", PROBER, str(ROOT), str(endpoint.port)], stdout=log_file,
                                      text=True)
            while log_file.tell() == 0 and os.fstat(log_file.fileno()).st_size == 0:
                time.sleep(0.01)       # it is up and answering
            apply_at = time.monotonic()
            injector.apply()
            applied_s = time.monotonic() - apply_at
            time.sleep(0.3)
            remove_at = time.monotonic()
            injector.remove()
            removed_s = time.monotonic() - remove_at
            time.sleep(0.3)
            prober.kill()
            prober.wait()
            log_file.seek(0)
            log = [fields for fields in (line.split() for line in log_file.read().splitlines()) if len(fields) == 4]
        log = [(float(start), float(end), flag == "1", error) for start, end, flag, error in log]
        first_injected = min((end for start, end, injected, _e in log if injected and end >= apply_at), default=None)
        first_clean = min((end for start, end, injected, error in log
                           if not injected and error == "-" and start >= remove_at), default=None)
        failed_after_removal = sum(1 for start, _end, _i, error in log if start >= remove_at and error != "-")
        rows.append({"apply_call_ms": round(applied_s * 1000, 1), "remove_call_ms": round(removed_s * 1000, 1),
                     "apply_to_first_injected_ms": None if first_injected is None else round((first_injected - apply_at) * 1000, 1),
                     "remove_to_first_clean_ms": None if first_clean is None else round((first_clean - remove_at) * 1000, 1),
                     "failed_requests_after_removal": failed_after_removal})
    print(f"activation/removal: {rows}", flush=True)
    return rows


def proxy_cost(target: str, endpoint: pathprobe.Endpoint, requests: int) -> dict:
    injector = make({"kind": "latency", "target": target, "delay_ms": 0})
    injector.apply()
    try:
        direct = sequential_p50_ms(endpoint, 2000, mark=injector.mark)
        proxied = sequential_p50_ms(endpoint, 2000)
        throughput = {"direct": clients_rate(endpoint.port, injector.mark, requests),
                      "proxied": clients_rate(endpoint.port, 0, requests)}
    finally:
        injector.remove()
    result = {"direct_p50_ms": round(direct, 4), "proxied_p50_ms": round(proxied, 4),
              "overhead_p50_ms": round(proxied - direct, 4), "requests_per_s": throughput,
              "within_spec": proxied - direct <= 0.5 and throughput["proxied"] >= 5000}
    print(f"proxy cost: {result}", flush=True)
    return result


def clients_rate(port: int, mark: int, requests: int) -> float:
    """2 client processes, 4 keep-alive connections each; total answered requests per second."""
    clients = [subprocess.Popen([sys.executable, "-c", CLIENT, str(ROOT), str(port), str(mark), str(requests)],
                                stdout=subprocess.PIPE, text=True) for _ in range(2)]
    answered = elapsed = 0.0
    for client in clients:
        done, seconds = client.communicate(timeout=120)[0].split()
        answered += int(done)
        elapsed = max(elapsed, float(seconds))
    return round(answered / elapsed)


def main() -> int:
    full = "--full" in sys.argv
    server = subprocess.Popen([sys.executable, "-c", SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        target = f"127.0.0.1:{port}"
        endpoint = pathprobe.Endpoint("127.0.0.1", port, socket.AF_INET)
        started = time.monotonic()
        results = {
            "benchmark": "chaos", "when": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "load_average_at_start": os.getloadavg(), "cpus": os.cpu_count(),
            "latency_accuracy": latency_accuracy(target, endpoint, [1, 5, 20, 100] + ([500] if full else [])),
            "share_accuracy": share_accuracy(target, endpoint),
            "activation": activation_and_removal(target, endpoint, 5),
            "proxy_cost": proxy_cost(target, endpoint, 20000),
        }
        results["load_average_at_end"] = os.getloadavg()
        results["seconds"] = round(time.monotonic() - started, 1)
    finally:
        server.kill()
        server.wait()
    out = ROOT / "benchmarks" / "results" / "chaos.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out} ({results['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
