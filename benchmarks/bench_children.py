"""Children that die with the agent: what it costs to start one, and how fast it dies.

1. Start cost of `true`: core.children.spawn (fork from the spawner thread + prctl in
   preexec_fn) vs plain subprocess.Popen (posix_spawn/vfork) vs util-linux `setpriv --pdeathsig
   KILL` (the peer tool for the same guarantee: one more exec per child). A probe starts a
   handful of children per audit, so this is per-audit overhead, not per-sample.
2. Death latency: a parent holding a spawned `sleep` is SIGKILLed; the time until the child is
   reaped by the kernel (its /proc entry gone or a zombie), over several rounds.

    python benchmarks/bench_children.py [--quick]
Writes benchmarks/results/children.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from core.children import spawn  # noqa: E402

PARENT = f"""
import sys, time
sys.path.insert(0, {str(ROOT)!r})
from core.children import spawn
child = spawn(["sleep", "60"])
print(child.pid, flush=True)
time.sleep(60)
"""


def start_cost_us(start, rounds: int) -> dict:
    samples = []
    for _ in range(rounds):
        began = time.perf_counter()
        start().wait()
        samples.append((time.perf_counter() - began) * 1e6)
    return {"median_us": round(statistics.median(samples), 1), "p90_us": round(sorted(samples)[int(0.9 * rounds)], 1)}


def gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def death_latency_ms(rounds: int) -> dict:
    samples = []
    for _ in range(rounds):
        parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
        child_pid = int(parent.stdout.readline())
        began = time.perf_counter()
        parent.send_signal(signal.SIGKILL)
        while not gone(child_pid) and time.perf_counter() - began < 5:
            time.sleep(0.0005)
        samples.append((time.perf_counter() - began) * 1e3)
        parent.wait()
    return {"median_ms": round(statistics.median(samples), 2), "max_ms": round(max(samples), 2), "rounds": rounds}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds = 50 if args.quick else 300
    true = shutil.which("true")
    results: dict = {"area": "children", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                 "kernel": platform.release()}, "note": "shared machine", "rounds": rounds}
    results["start_spawn"] = start_cost_us(lambda: spawn([true]), rounds)
    results["start_popen"] = start_cost_us(lambda: subprocess.Popen([true]), rounds)
    if shutil.which("setpriv"):
        results["start_setpriv_pdeathsig"] = start_cost_us(
            lambda: subprocess.Popen(["setpriv", "--pdeathsig", "KILL", true]), rounds)
    results["death_latency"] = death_latency_ms(10 if args.quick else 30)
    out = HERE / "results" / "children.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
