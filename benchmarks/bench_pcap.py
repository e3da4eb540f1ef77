"""Benchmark: `guardian-agent pcap` vs `tshark -r FILE -q -z conv,tcp` on the same capture.

The capture is made here, by this script: tcpdump on loopback (headers only, nanosecond
timestamps) while a bounded request→response loop runs against a local server, until the file
holds the target packet count (1M by default, 200k with --quick). Then pyperf's `command` mode
times both tools side by side in the same run, whole process included (start-up, reading,
writing the bundle). Prints packets/s and the ratio; writes benchmarks/results/pcap.json.

    python benchmarks/bench_pcap.py [--quick] [--packets N] [--keep FILE]
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

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "tests" / "fixtures" / "pcap"))

from loopback_traffic import DelayedEchoServer, request_loop  # noqa: E402

from probes.pcap_reader import CaptureReader  # noqa: E402


def count_packets(path: Path) -> int:
    from probes.pcap_reader import CaptureCorrupt

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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200k packets, 2 runs per tool")
    parser.add_argument("--packets", type=int, help="target packet count (default 1M, quick 200k)")
    parser.add_argument("--keep", type=Path, help="reuse/keep the capture at this path")
    args = parser.parse_args()
    if os.geteuid() != 0 or shutil.which("tcpdump") is None:
        print("bench_pcap: needs root and tcpdump (make setup) to capture loopback traffic", file=sys.stderr)
        return 2
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
        import probes.pcap_reader as pcap_reader

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
