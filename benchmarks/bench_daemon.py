"""CPU and RSS of `guardian-agent daemon` (default configuration) over a minute and more,
side by side with the peer tools doing part of the same job in the same run:
`syscount-bpfcc -L` (BCC: per-syscall counts and latency, in-kernel aggregation) and
`vmstat 1` (procps: host counters every second).

All three start together and are sampled every second with psutil (user+system CPU of the
process and its children; RSS of the tree and of the main process alone). Figures: average CPU in % of one core over the whole run and
after the first window (steady state), peak RSS, and the daemon's own view (its state file:
what it measured on itself, and how long it paused to hold its budget). The per-second CPU
samples are stored as pyperf benchmarks (benchmarks/results/daemon.pyperf.json) so
`python -m pyperf stats/compare_to` work on them; the summary is benchmarks/results/daemon.json.

Targets (the daemon's budget, docs/fleet.md): average <= 0.5% of one core and <= 200 MB RSS, default configuration.
Usage: python benchmarks/bench_daemon.py [--quick] [--seconds N] [--daemon-only]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import psutil
import pyperf

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def tree_cpu_s(process: psutil.Process) -> float:
    try:
        times = process.cpu_times()
        total = times.user + times.system + times.children_user + times.children_system
        for child in process.children(recursive=True):
            try:
                child_times = child.cpu_times()
                total += child_times.user + child_times.system
            except psutil.Error:
                pass
        return total
    except psutil.Error:
        return float("nan")


def tree_rss_bytes(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss + sum(c.memory_info().rss for c in process.children(recursive=True))
    except psutil.Error:
        return 0


def start(command: list[str], **kwargs) -> subprocess.Popen:
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kwargs)


def stop(process: subprocess.Popen) -> str:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        _, stderr = process.communicate()
    return stderr or ""


def summarize(samples: list[tuple[float, float, int]], steady_from_s: float) -> dict:
    """samples: (elapsed_s, cpu_s cumulative, rss_bytes)."""
    elapsed, cpu, _ = samples[-1]
    steady = [s for s in samples if s[0] >= steady_from_s]
    steady_pct = (100 * (steady[-1][1] - steady[0][1]) / (steady[-1][0] - steady[0][0])
                  if len(steady) >= 2 and steady[-1][0] > steady[0][0] else None)
    return {
        "seconds": round(elapsed, 1),
        "cpu_s": round(cpu, 3),
        "cpu_pct_avg": round(100 * cpu / elapsed, 4),
        "cpu_pct_steady": None if steady_pct is None else round(steady_pct, 4),
        "rss_mb_peak": round(max(s[2] for s in samples) / 2**20, 1),
        "rss_mb_end": round(samples[-1][2] / 2**20, 1),
    }


def per_second_pct(samples: list[tuple[float, float, int]]) -> list[float]:
    values = []
    for (t0, c0, _), (t1, c1, _) in zip(samples, samples[1:]):
        if t1 > t0:
            values.append(max(0.0, 100 * (c1 - c0) / (t1 - t0)))
    return values


def pyperf_benchmark(name: str, values: list[float]) -> pyperf.Benchmark:
    # pyperf refuses zero values; an idle second is recorded as the smallest measurable step.
    cleaned = [max(value, 1e-6) for value in values] or [1e-6]
    run = pyperf.Run(cleaned, metadata={"name": name, "unit": "second",
                                        "description": "CPU % of one core, one value per second"},
                     collect_metadata=False)
    return pyperf.Benchmark([run])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="90 s instead of 660 s (two default windows)")
    parser.add_argument("--seconds", type=float, help="measurement length")
    parser.add_argument("--daemon-only", action="store_true",
                        help="no peers: a BCC peer maps the same LLVM pages, which then count in the "
                             "daemon's RSS too (the daemon cannot hand back pages another process maps)")
    args = parser.parse_args()
    seconds = args.seconds or (90.0 if args.quick else 660.0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT))

    # The default configuration, except where the data goes (an empty config file so a host's
    # own /etc/guardian-agent/config.toml does not change what is measured).
    config = workdir / "config.toml"
    config.write_text("")
    commands = {
        "guardian-agent daemon": [sys.executable, "-m", "agent.cli", "daemon", "--config", str(config),
                                  "--dataset", str(workdir / "dataset")],
        "syscount-bpfcc -L": [shutil.which("syscount-bpfcc") or "syscount-bpfcc", "-L", "-i", "3600"],
        "vmstat 1": ["vmstat", "1"],
    }
    if args.daemon_only:
        commands = {"guardian-agent daemon": commands["guardian-agent daemon"]}
    processes, handles = {}, {}
    for name, command in commands.items():
        if not shutil.which(command[0]) and not Path(command[0]).exists():
            print(f"skipping {name}: not installed", file=sys.stderr)
            continue
        processes[name] = start(command, cwd=ROOT, env=env)
        handles[name] = psutil.Process(processes[name].pid)
    samples: dict[str, list] = {name: [] for name in processes}
    # The main process alone: with the default (rolling) probes the daemon's windows run in it;
    # non-rolling windows run in a child, which the tree figures include.
    own_rss: dict[str, int] = {}
    own_rss_last: dict[str, int] = {}
    started = time.monotonic()
    print(f"measuring {', '.join(processes)} side by side for {seconds:g} s", flush=True)
    while time.monotonic() - started < seconds:
        now = time.monotonic() - started
        for name, handle in handles.items():
            samples[name].append((now, tree_cpu_s(handle), tree_rss_bytes(handle)))
            try:
                own_rss_last[name] = handle.memory_info().rss
                own_rss[name] = max(own_rss.get(name, 0), own_rss_last[name])
            except psutil.Error:
                pass
        time.sleep(1.0)
    stderr = {name: stop(process) for name, process in processes.items()}
    state_path = workdir / "dataset" / "_spool" / "daemon-state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    runs = sorted(p.name for p in (workdir / "dataset").rglob("manifests/**/*.json"))

    figures = {name: summarize(values, steady_from_s=min(320.0, seconds / 2))
               for name, values in samples.items() if values}
    for name, figure in figures.items():
        figure["rss_mb_peak_main_process"] = round(own_rss.get(name, 0) / 2**20, 1)
        figure["rss_mb_end_main_process"] = round(own_rss_last.get(name, 0) / 2**20, 1)
    ours = figures.get("guardian-agent daemon", {})
    summary = {
        "benchmark": "daemon",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {"cpu_model": next((line.split(":", 1)[1].strip() for line in
                                       Path("/proc/cpuinfo").read_text().splitlines()
                                       if line.startswith("model name")), "unknown"),
                    "cores": os.cpu_count(), "kernel": os.uname().release,
                    "load_avg_1m_at_end": os.getloadavg()[0]},
        "seconds": seconds,
        "targets": {"cpu_pct_avg_max": 0.5, "rss_mb_max": 200},
        "figures": figures,
        "daemon_state": {key: state.get(key) for key in
                         ("windows", "cpu_pct_avg", "paused_s_total", "rss_peak_bytes", "rss_anon_peak_bytes",
                          "window_rss_peak_bytes", "probes")},
        "daemon_runs_published": len(runs),
        "ratios_vs_peers": {
            peer: {"cpu": (round(ours["cpu_s"] / figures[peer]["cpu_s"], 2) if figures[peer]["cpu_s"] else None),
                   "rss": round(ours["rss_mb_peak"] / max(figures[peer]["rss_mb_peak"], 0.1), 2)}
            for peer in figures if peer != "guardian-agent daemon" and ours
        },
        # RSS target judged on the daemon process; its window children are reported beside it.
        "meets_targets": bool(ours) and ours["cpu_pct_avg"] <= 0.5 and ours["rss_mb_peak_main_process"] <= 200,
        "daemon_log_tail": stderr.get("guardian-agent daemon", "").strip().splitlines()[-8:],
    }
    suite = pyperf.BenchmarkSuite([pyperf_benchmark(f"cpu_pct {name}", per_second_pct(values))
                                   for name, values in samples.items() if len(values) > 1])
    suite.dump(str(RESULTS / ("daemon-alone.pyperf.json" if args.daemon_only else "daemon.pyperf.json")),
               replace=True)
    stem = "daemon-alone" if args.daemon_only else "daemon"
    (RESULTS / f"{stem}.json").write_text(json.dumps(summary, indent=2) + "\n")
    shutil.rmtree(workdir, ignore_errors=True)

    for name, figure in figures.items():
        print(f"{name:24s} cpu avg {figure['cpu_pct_avg']:7.3f}%  steady {figure['cpu_pct_steady']}%  "
              f"cpu {figure['cpu_s']:.2f} s  rss peak {figure['rss_mb_peak']:.1f} MB "
              f"(main process {figure['rss_mb_peak_main_process']:.1f} MB, at the end "
              f"{figure['rss_mb_end_main_process']:.1f} MB)")
    for peer, ratio in summary["ratios_vs_peers"].items():
        print(f"daemon / {peer}: cpu x{ratio['cpu']}, rss x{ratio['rss']}")
    print(f"daemon state: {summary['daemon_state']}")
    print(f"targets (<= 0.5% avg CPU, <= 200 MB RSS) met: {summary['meets_targets']}")
    print(f"wrote {RESULTS / (stem + '.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
