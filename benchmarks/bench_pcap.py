"""Benchmark: `guardian-agent pcap` vs `tshark -r FILE -q -z conv,tcp` on the same capture:
speed on a real loopback capture, and whole-process peak RSS on generated ones.

Speed: the capture is made here, by this script: tcpdump on loopback (headers only, nanosecond
timestamps) while a bounded request→response loop runs against a local server, until the file
holds the target packet count (1M by default, 200k with --quick). Then pyperf's `command` mode
times both tools side by side in the same run, whole process included (start-up, reading,
writing the bundle). Prints packets/s and the ratio; writes benchmarks/results/pcap.json.

Memory: captures written with numpy (tests/fixtures/pcap/synthetic.py) at 1M, 4M and 16M packets
of 100 flows and at 10k, 100k and 1M concurrent flows (10 packets each); each is read by
`guardian-agent pcap --no-html` as built here ("after"), by the same command from a baseline
commit ("before", with --baseline [REF], default REF the last commit before flat memory) and by `tcpdump -r`
(tshark on the captures up to 1M packets: it reads ~0.1M packets/s; beyond, `tcpdump -r FILE -w
/dev/null`, libpcap reading the file, as a floor; printing every packet took minutes). Peak RSS of each whole
process comes from wait4(); written to benchmarks/results/pcap_memory.json.

    python benchmarks/bench_pcap.py [--quick] [--packets N] [--keep FILE] [--memory-only | --speed-only]
                                    [--baseline [REF]]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "tests" / "fixtures" / "pcap"))

from loopback_traffic import DelayedEchoServer, request_loop  # noqa: E402
import synthetic  # noqa: E402

import probes.pcap_reader as pcap_reader  # noqa: E402
from probes.pcap_reader import CaptureCorrupt, CaptureReader  # noqa: E402


def count_packets(path: Path) -> int:
    total = 0
    try:
        for block in CaptureReader(path).blocks():
            total += len(block)
    except CaptureCorrupt:
        pass  # tcpdump is still writing the last record
    return total


def make_capture(path: Path, packets: int) -> int:
    """Capture bounded loopback ping-pong traffic until about `packets` packets are written."""
    with DelayedEchoServer(delay_s=0.0) as server:
        tcpdump = subprocess.Popen(
            ["tcpdump", "-i", "lo", "-n", "-p", "-U", "-s", "128", "--time-stamp-precision=nano", "-B", "65536",
             "-Z", "root", "-w", str(path), f"tcp port {server.port}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
        time.sleep(1.0)  # tcpdump attaches its filter
        # Each request→response is 2 data packets plus (mostly delayed) ACKs: ask for a bit
        # fewer requests than half the target and top up until the file holds enough.
        written = 0
        rounds = 0
        while written < packets and rounds < 20:
            missing = packets - written
            threads = []
            for _ in range(2):
                thread = threading.Thread(target=request_loop, args=("127.0.0.1", server.port,
                                                                    max(1000, missing // 5), 8, 600))
                thread.start()
                threads.append(thread)
            for thread in threads:
                thread.join()
            time.sleep(0.5)  # tcpdump -U flushes each packet; let the last ones land
            written = count_packets(path)
            rounds += 1
        tcpdump.send_signal(signal.SIGINT)
        _, stderr = tcpdump.communicate(timeout=30)
    count = count_packets(path)
    dropped = [line for line in stderr.splitlines() if "dropped" in line]
    print(f"capture: {count} packets, {path.stat().st_size / 1e6:.0f} MB ({'; '.join(dropped)})", flush=True)
    return count


def pyperf_command(name: str, command: list[str], output: Path, processes: int) -> float:
    """Mean wall seconds of `command` as measured by `python -m pyperf command`."""
    import pyperf

    subprocess.run([sys.executable, "-m", "pyperf", "command", "--quiet", "--name", name,
                    "-p", str(processes), "-n", "1", "-w", "0", "-l", "1", "-o", str(output), "--", *command],
                   check=True, cwd=PROJECT)
    benchmark = pyperf.Benchmark.load(str(output))
    return benchmark.mean()


# The last commit whose pcap analysis kept per-packet turn state to the end (the "before").
DEFAULT_BASELINE = "0bc0246"
# (label, flows, turns per flow): packets = flows * (6 + 2 * turns).
PACKET_CURVE = [("1M packets", 100, 4997), ("4M packets", 100, 19997), ("16M packets", 100, 79997)]
FLOW_CURVE = [("10k flows", 10_000, 2), ("100k flows", 100_000, 2), ("1M flows", 1_000_000, 2)]
TSHARK_MAX_PACKETS = 1_000_000
TIME = "/usr/bin/time"  # GNU time (Debian package `time`)


def peak_rss(command: list[str], cwd: Path, env: dict | None = None) -> tuple[float, float, int]:
    """(peak RSS in MiB, wall seconds, exit status) of one whole process, from GNU time's wait4().
    Not wait4() here: Linux carries the forking process's RSS high-water mark across exec into
    the child's ru_maxrss, and this process holds the generated capture's chunks."""
    started = time.monotonic()
    with tempfile.NamedTemporaryFile("r") as report, tempfile.TemporaryFile() as stderr:
        process = subprocess.run([TIME, "-f", "%M", "-o", report.name, *command], cwd=cwd, env=env,
                                 stdout=subprocess.DEVNULL, stderr=stderr)
        if process.returncode != 0:
            stderr.seek(0)
            print(f"  {command[0]} exit {process.returncode}: {stderr.read().decode(errors='replace')[-300:]}",
                  flush=True)
        kib = int(report.read().split()[-1])
    return kib / 1024, time.monotonic() - started, process.returncode


def baseline_tree(work: Path, ref: str) -> Path | None:
    """The project at `ref`, unpacked with git archive (None when the ref is not in this clone)."""
    target = work / "baseline"
    target.mkdir()
    archive = subprocess.run(["git", "-C", str(PROJECT), "archive", ref], capture_output=True)
    if archive.returncode != 0:
        print(f"baseline {ref}: not in this clone ({archive.stderr.decode().strip()}): before not measured")
        return None
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive.stdout, check=True)
    return target


def agent_rss(tree: Path, capture: Path, out_dir: Path) -> tuple[float, float, int]:
    shutil.rmtree(out_dir, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(tree))
    result = peak_rss([sys.executable, "-m", "agent.cli", "pcap", str(capture), "--out", str(out_dir), "--no-html"],
                      cwd=tree, env=env)
    shutil.rmtree(out_dir, ignore_errors=True)
    return result


def memory_curves(work: Path, baseline: Path | None, quick: bool) -> list[dict]:
    rows = []
    tshark, tcpdump = shutil.which("tshark"), shutil.which("tcpdump")
    curves = PACKET_CURVE + FLOW_CURVE
    if quick:
        curves = [PACKET_CURVE[0], PACKET_CURVE[1], FLOW_CURVE[0], FLOW_CURVE[1]]
    for label, flows, turns in curves:
        capture = work / "synthetic.pcap"
        started = time.monotonic()
        packets = synthetic.write_capture(capture, flows=flows, turns=turns)
        row = {"capture": label, "flows": flows, "packets": packets, "capture_bytes": capture.stat().st_size,
               "generate_s": round(time.monotonic() - started, 2)}
        after_mib, after_s, status = agent_rss(PROJECT, capture, work / "out")
        row.update(after_peak_rss_mib=round(after_mib, 1), after_s=round(after_s, 2), after_exit=status)
        if baseline is not None:
            before_mib, before_s, status = agent_rss(baseline, capture, work / "out")
            row.update(before_peak_rss_mib=round(before_mib, 1), before_s=round(before_s, 2), before_exit=status,
                       before_over_after=round(before_mib / after_mib, 2))
        if tshark and packets <= TSHARK_MAX_PACKETS:
            mib, seconds, _ = peak_rss([tshark, "-r", str(capture), "-q", "-z", "conv,tcp"], cwd=work)
            row.update(tshark_peak_rss_mib=round(mib, 1), tshark_s=round(seconds, 2),
                       after_over_tshark=round(after_mib / mib, 2))
        elif tcpdump:  # where tshark would take minutes: libpcap reading the file, a flat floor
            mib, seconds, _ = peak_rss([tcpdump, "-r", str(capture), "-w", "/dev/null"], cwd=work)
            row.update(tcpdump_peak_rss_mib=round(mib, 1), tcpdump_s=round(seconds, 2),
                       after_over_tcpdump=round(after_mib / mib, 1))
        capture.unlink()
        rows.append(row)
        print("  " + ", ".join(f"{key} {value}" for key, value in row.items()), flush=True)
    return rows


def state_bytes_per_flow() -> dict:
    """Bytes of numpy state per live flow slot (columns) and per flow in the index (35-70% full)."""
    from probes.pcap_analysis import DIRECTION_COLUMNS, FLOW_COLUMNS

    columns = sum(np.dtype(dtype).itemsize for dtype, _ in FLOW_COLUMNS.values())
    directions = 2 * sum(np.dtype(dtype).itemsize for dtype, _ in DIRECTION_COLUMNS.values())
    return {"flow_columns_bytes": columns, "direction_columns_bytes": directions,
            "index_bytes_per_flow_range": [round(16 / 0.7), round(16 / 0.35)]}


def run_memory(args, work: Path) -> None:
    baseline = baseline_tree(work, args.baseline) if args.baseline else None
    print(f"memory: peak RSS, after = this tree, before = {args.baseline if baseline else 'not measured'}",
          flush=True)
    rows = memory_curves(work, baseline, args.quick)
    per_flow = state_bytes_per_flow()
    by_label = {row["capture"]: row for row in rows}
    if "10k flows" in by_label and "1M flows" in by_label:
        small, large = by_label["10k flows"], by_label["1M flows"]
        for side in ("after", "before"):
            key = f"{side}_peak_rss_mib"
            if key in small and key in large:
                per_flow[f"{side}_rss_bytes_per_flow"] = round(
                    (large[key] - small[key]) * 2**20 / (large["flows"] - small["flows"]))
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {os.cpu_count()} cpus, kernel {platform.release()} (shared while measured)",
        "baseline": args.baseline if baseline else None,
        "rows": rows,
        "per_flow": per_flow,
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "pcap_memory.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"per flow: {per_flow}")
    print(f"results: {HERE / 'results' / 'pcap_memory.json'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200k packets, 2 runs per tool; smaller memory curves")
    parser.add_argument("--packets", type=int, help="target packet count (default 1M, quick 200k)")
    parser.add_argument("--keep", type=Path, help="reuse/keep the capture at this path")
    parser.add_argument("--memory-only", action="store_true", help="only the peak RSS curves")
    parser.add_argument("--speed-only", action="store_true", help="only the loopback speed comparison")
    parser.add_argument("--baseline", nargs="?", const=DEFAULT_BASELINE, default=None,
                        help=f"also measure this git ref as 'before' (default ref {DEFAULT_BASELINE}; "
                             "off in `make bench` to keep it within 4 minutes)")
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("tcpdump") is None:
        print("bench_pcap: needs root and tcpdump (make setup) to capture loopback traffic", file=sys.stderr)
        return 2
    if not args.speed_only and not os.access(TIME, os.X_OK):
        print(f"bench_pcap: {TIME} missing (apt-get install time; make setup) to measure peak RSS", file=sys.stderr)
        return 2
    if not args.speed_only:
        work = Path(tempfile.mkdtemp(prefix="bench-pcap-memory-"))
        try:
            run_memory(args, work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if args.memory_only:
        return 0
    target = args.packets or (200_000 if args.quick else 1_000_000)
    processes = 2 if args.quick else 3
    work = Path(tempfile.mkdtemp(prefix="bench-pcap-"))
    try:
        capture = args.keep or work / "loopback.pcap"
        if capture.exists():
            packets = sum(len(block) for block in CaptureReader(capture).blocks())
        else:
            packets = make_capture(capture, target)
        out_dir = work / "bundle"
        agent = ["sh", "-c", f'rm -rf "{out_dir}" && exec "{sys.executable}" -m agent.cli pcap '
                             f'"{capture}" --out "{out_dir}" >/dev/null']
        results = {}
        results["guardian_agent_s"] = pyperf_command("guardian-agent pcap", agent, work / "agent.json", processes)
        tshark = shutil.which("tshark")
        if tshark:
            command = ["sh", "-c", f'exec "{tshark}" -r "{capture}" -q -z conv,tcp >/dev/null 2>&1']
            results["tshark_conv_s"] = pyperf_command("tshark conv,tcp", command, work / "tshark.json", processes)
        # In-process rate (one core, excluding interpreter start-up and the bundle write).
        from probes.pcap_analysis import analyse_capture

        # Per core = CPU seconds of this one-threaded analysis (other work on the box does not
        # count against it, as it would in wall time).
        cpu_started = time.process_time()
        _, _, summary = analyse_capture(CaptureReader(capture))
        analysis_cpu_s = time.process_time() - cpu_started
        # The same analysis with the reader's uniform-stride shortcut switched off: the rate for
        # captures whose record lengths vary (full payloads, mixed traffic).
        shortcut = pcap_reader.UNIFORM_RUN_RECORDS
        pcap_reader.UNIFORM_RUN_RECORDS = 0
        try:
            cpu_started = time.process_time()
            analyse_capture(CaptureReader(capture))
            scalar_cpu_s = time.process_time() - cpu_started
        finally:
            pcap_reader.UNIFORM_RUN_RECORDS = shortcut
        summary_row = {
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.node()} {platform.processor() or platform.machine()} "
                       f"{os.cpu_count()} cpus, kernel {platform.release()}",
            "quick": bool(args.quick),
            "packets": packets,
            "capture_bytes": capture.stat().st_size,
            "guardian_agent_process_s": round(results["guardian_agent_s"], 4),
            "guardian_agent_process_packets_per_s": round(packets / results["guardian_agent_s"]),
            "analysis_cpu_s": round(analysis_cpu_s, 4),
            "analysis_packets_per_s_per_core": round(packets / analysis_cpu_s),
            "analysis_packets_per_s_per_core_without_uniform_stride_shortcut": round(
                packets / scalar_cpu_s),
            "flows": summary.flows,
            "turns": summary.turns,
        }
        if "tshark_conv_s" in results:
            summary_row["tshark_conv_s"] = round(results["tshark_conv_s"], 4)
            summary_row["tshark_packets_per_s"] = round(packets / results["tshark_conv_s"])
            summary_row["speedup_vs_tshark"] = round(results["tshark_conv_s"] / results["guardian_agent_s"], 2)
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "pcap.json").write_text(json.dumps(summary_row, indent=2) + "\n")
        print(f"guardian-agent pcap: {summary_row['guardian_agent_process_s']:.3f} s whole process = "
              f"{summary_row['guardian_agent_process_packets_per_s'] / 1e6:.2f}M packets/s; analysis alone "
              f"{summary_row['analysis_packets_per_s_per_core'] / 1e6:.2f}M packets/s on one core "
              f"({summary_row['analysis_packets_per_s_per_core_without_uniform_stride_shortcut'] / 1e6:.2f}M "
              "without the uniform-stride shortcut)")
        if "tshark_conv_s" in results:
            print(f"tshark -z conv,tcp: {summary_row['tshark_conv_s']:.3f} s = "
                  f"{summary_row['tshark_packets_per_s'] / 1e3:.0f}k packets/s; "
                  f"guardian-agent is {summary_row['speedup_vs_tshark']:.1f}x faster")
        else:
            print("tshark not installed: ratio not measured")
        print(f"results: {HERE / 'results' / 'pcap.json'}")
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)  # a --keep capture lives outside it


if __name__ == "__main__":
    sys.exit(main())
