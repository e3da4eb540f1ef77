"""Tuning and jitter benchmarks, side by side with the peer tools in the same run.

1. Read-only audit: `guardian-agent tune plan --profile trading-latency` vs `pyperf system show`
   (pyperf's own read-only check of the same class of settings), both timed by
   `python -m pyperf command`.
2. Journaled apply + exact rollback of trading-latency on a copy of the fake /proc tree
   (19 fsync'd journal steps): the price of crash safety. No peer: TuneD keeps this in memory.
3. Jitter fidelity: our Python busy-loop vs oslat (rt-tests, C) on the same CPU, alternating
   rounds of equal length so both see the same host. Compares gaps/s above 5 us, max gap and
   the loop's own resolution.

    python benchmarks/bench_tuning.py [--quick] [--cpu N]
Writes benchmarks/results/tuning.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
FAKE = ROOT / "tests" / "fixtures" / "proc_fake"
THRESHOLD_US = 5


def pyperf_command(name: str, command: list[str], output: Path, processes: int) -> float:
    """Mean wall seconds of `command` as measured by `python -m pyperf command`."""
    import pyperf

    subprocess.run([sys.executable, "-m", "pyperf", "command", "--quiet", "--name", name,
                    "--processes", str(processes), "--values", "2", "--warmups", "1",
                    "-o", str(output), "--", *command], check=True, cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=str(ROOT)))
    return pyperf.Benchmark.load(str(output)).mean()


def oslat_round(cpu: int, seconds: int, work: Path) -> dict:
    out = work / "oslat.json"
    subprocess.run(["oslat", "-c", str(cpu), "-D", str(seconds), "-q", "-b", "64", f"--json={out}"],
                   check=True, capture_output=True, timeout=seconds + 30)
    thread = json.loads(out.read_text())["thread"]["0"]
    # oslat buckets are 1 us wide; the last bucket also holds every overflow.
    gaps = sum(count for bucket, count in thread["histogram"].items() if int(bucket) > THRESHOLD_US)
    return {"gaps": gaps, "max_us": thread["max"], "min_us": thread["min"], "seconds": thread["duration"]}


def agent_round(cpu: int, seconds: int) -> dict:
    result = subprocess.run(
        [sys.executable, "-m", "probes.jitter_loop", "--cpu", str(cpu),
         "--duration-ns", str(seconds * 1_000_000_000), "--threshold-ns", str(THRESHOLD_US * 1000)],
        check=True, capture_output=True, timeout=seconds + 30, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    data = json.loads(result.stdout)
    return {"gaps": data["gap_count"], "max_us": max(data["gaps_ns"], default=0) / 1000,
            "loop_ns": data["elapsed_ns"] / data["iterations"], "seconds": data["elapsed_ns"] / 1e9}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer processes and shorter jitter rounds")
    parser.add_argument("--cpu", type=int, help="CPU for the jitter rounds (default: the last online CPU)")
    args = parser.parse_args()
    processes = 2 if args.quick else 4
    rounds, seconds = (2, 2) if args.quick else (3, 5)
    cpu = args.cpu if args.cpu is not None else sorted(os.sched_getaffinity(0))[-1]
    results: dict = {"area": "tuning", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                 "kernel": platform.release()}, "quick": args.quick}
    agent = [sys.executable, "-m", "agent.cli"]
    with tempfile.TemporaryDirectory(prefix="bench-tuning-") as temp:
        work = Path(temp)
        # Both exit non-zero on an untuned host (3 = drift, 1 = "not tuned"): time them regardless.
        plan = f"{' '.join(agent)} tune plan --profile trading-latency --json >/dev/null; true"
        show = f"{sys.executable} -m pyperf system show >/dev/null; true"
        results["plan_s"] = pyperf_command("tune plan", ["sh", "-c", plan], work / "plan.json", processes)
        results["pyperf_system_show_s"] = pyperf_command("pyperf system show", ["sh", "-c", show],
                                                         work / "show.json", processes)
        results["plan_vs_pyperf_show_ratio"] = round(results["plan_s"] / results["pyperf_system_show_s"], 3)

        tree, state = work / "root", work / "state"
        shutil.copytree(FAKE, tree)
        cycle = (f"{' '.join(agent)} tune apply --profile trading-latency --yes --persist --root {tree} "
                 f"--state-dir {state} >/dev/null && {' '.join(agent)} tune rollback --root {tree} "
                 f"--state-dir {state} >/dev/null")
        results["apply_rollback_cycle_s"] = pyperf_command("apply+rollback (fake tree, 19 steps)",
                                                           ["sh", "-c", cycle], work / "cycle.json", processes)

        if shutil.which("oslat"):
            ours, theirs = [], []
            for _ in range(rounds):  # alternate so both tools see the same background load
                theirs.append(oslat_round(cpu, seconds, work))
                ours.append(agent_round(cpu, seconds))
            agent_rate = sum(r["gaps"] for r in ours) / sum(r["seconds"] for r in ours)
            oslat_rate = sum(r["gaps"] for r in theirs) / sum(r["seconds"] for r in theirs)
            results["jitter"] = {
                "cpu": cpu, "rounds": rounds, "round_s": seconds, "threshold_us": THRESHOLD_US,
                "agent_gaps_per_s": round(agent_rate, 2), "oslat_gaps_per_s": round(oslat_rate, 2),
                "gap_rate_ratio": round(agent_rate / oslat_rate, 3) if oslat_rate else None,
                "agent_max_us": round(max(r["max_us"] for r in ours), 1),
                "oslat_max_us": max(r["max_us"] for r in theirs),
                "agent_loop_ns": round(sum(r["loop_ns"] for r in ours) / len(ours), 1),
                "oslat_min_us": min(r["min_us"] for r in theirs),
            }
        else:
            results["jitter"] = {"skipped": "oslat (rt-tests) not installed: run `make setup`"}

    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "tuning.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"tune plan (read-only audit)   {results['plan_s'] * 1000:8.1f} ms")
    print(f"pyperf system show            {results['pyperf_system_show_s'] * 1000:8.1f} ms"
          f"   ratio {results['plan_vs_pyperf_show_ratio']}")
    print(f"apply + rollback, 19 steps    {results['apply_rollback_cycle_s'] * 1000:8.1f} ms (journal fsync'd per step)")
    jitter = results["jitter"]
    if "skipped" not in jitter:
        print(f"jitter cpu {cpu}: gaps>{THRESHOLD_US}us/s agent {jitter['agent_gaps_per_s']} vs oslat "
              f"{jitter['oslat_gaps_per_s']} (ratio {jitter['gap_rate_ratio']}); max {jitter['agent_max_us']} us "
              f"vs {jitter['oslat_max_us']} us; loop {jitter['agent_loop_ns']} ns vs oslat min {jitter['oslat_min_us']} us")
    print(f"results: {HERE / 'results' / 'tuning.json'}")
    return 0


if __name__ == "__main__":
    started = time.monotonic()
    sys.exit(main())
