"""Benchmark: HTML report size and render time, and the Prometheus textfile write per window.

1. The default audit (`make audit`'s arguments: 10 s, --profile trading-latency, default probes):
   report.html size, the time `guardian-agent report` takes (whole process), and the time
   headless Chromium takes to load it, minus Chromium loading an empty page (its own start-up).
2. A 1M-packet loopback capture (made here, as bench_pcap.py makes it) through `guardian-agent
   pcap`: the same three figures for its report.
3. The textfile write per daemon window: window families from the audit bundle plus the agent
   file, written atomically by prometheus_client (median of 30).
4. With --memory [REF]: peak RSS (whole process, GNU time) of `guardian-agent report` on pcap
   bundles of 100 flows with 0.25M, 1M, 4M and 16M turns (captures written by
   tests/fixtures/pcap/synthetic.py, bundles by `pcap --no-html`), for this tree and, with REF,
   for the tree at that commit (git archive). Writes benchmarks/results/report_memory.json.

    python benchmarks/bench_reports.py [--quick]     # --quick: 3 s audit, 200k packets
    python benchmarks/bench_reports.py --memory [REF]

Writes benchmarks/results/reports.json. The machine is shared: figures are medians of a few runs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
PROJECT = HERE.parent
sys.path.insert(0, str(PROJECT))

from tests.report_browser import chromium_missing_reason, render_seconds  # noqa: E402

RUNS = 3


def agent(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(PROJECT))
    result = subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True,
                            env=env, cwd=PROJECT, timeout=600)
    if result.returncode not in (0,):
        raise SystemExit(f"guardian-agent {' '.join(args)} failed: {result.stderr[-2000:]}")
    return result


def report_figures(bundle: Path, work: Path, blank_s: float) -> dict:
    out = work / f"{bundle.name}.html"
    times = []
    for _ in range(RUNS):
        started = time.monotonic()
        agent("report", str(bundle), "--out", str(out))
        times.append(time.monotonic() - started)
    figures = {"html_bytes": out.stat().st_size, "report_command_s": statistics.median(times)}
    if blank_s is not None:
        loads = [render_seconds(out) for _ in range(RUNS)]
        figures["chromium_load_s"] = statistics.median(loads)
        figures["chromium_load_minus_startup_s"] = max(0.0, figures["chromium_load_s"] - blank_s)
    return figures


def textfile_figures(bundle: Path, work: Path) -> dict:
    from reports.html_data import open_source
    from reports.metrics import AGENT_FILE, WINDOW_FILE, agent_families, window_families, write_families

    state = {"cpu_s_total": 1.0, "rss_bytes": 150e6, "windows": 10, "paused_s_total": 0.0, "pending_runs": 0}
    times = []
    for _ in range(30):
        started = time.perf_counter()
        write_families(work / "textfile", WINDOW_FILE, window_families(open_source(bundle)))
        write_families(work / "textfile", AGENT_FILE, agent_families(state))
        times.append(time.perf_counter() - started)
    return {"textfile_write_ms_median": 1000 * statistics.median(times),
            "textfile_write_ms_max": 1000 * max(times),
            "window_file_bytes": (work / "textfile" / WINDOW_FILE).stat().st_size}


TURN_CURVE = [("0.25M turns", 100, 2_500), ("1M turns", 100, 10_000), ("4M turns", 100, 40_000),
              ("16M turns", 100, 160_000)]
RENDERED_AT = re.compile(rb"Rendered [^ ]+ by")  # the footer's time stamp: the only part that may differ


def report_memory(baseline_ref: str | None) -> dict:
    """Peak RSS of `report` on pcap bundles as the turns table grows (flat = streamed)."""
    sys.path.insert(0, str(HERE))
    sys.path.insert(0, str(PROJECT / "tests" / "fixtures" / "pcap"))
    import synthetic
    from bench_pcap import baseline_tree, peak_rss

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-report-memory-") as scratch:
        work = Path(scratch)
        baseline = baseline_tree(work, baseline_ref) if baseline_ref else None
        for label, flows, turns in TURN_CURVE:
            capture, bundle = work / "synthetic.pcap", work / "bundle"
            packets = synthetic.write_capture(capture, flows=flows, turns=turns)
            agent("pcap", str(capture), "--out", str(bundle), "--no-html")
            capture.unlink()
            row = {"bundle": label, "flows": flows, "packets": packets,
                   "turns_bytes": (bundle / "turns.parquet").stat().st_size}
            sides = [("after", PROJECT)] + ([("before", baseline)] if baseline is not None else [])
            for side, tree in sides:
                out = work / f"{side}.html"
                env = dict(os.environ, PYTHONPATH=str(tree))
                mib, seconds, status = peak_rss([sys.executable, "-m", "agent.cli", "report", str(bundle),
                                                 "--out", str(out)], cwd=tree, env=env)
                row.update({f"{side}_peak_rss_mib": round(mib, 1), f"{side}_s": round(seconds, 2),
                            f"{side}_exit": status, f"{side}_html_bytes": out.stat().st_size if out.exists() else None})
            if baseline is not None:
                pages = [RENDERED_AT.sub(b"", (work / f"{side}.html").read_bytes()) for side in ("after", "before")]
                row["same_page"] = pages[0] == pages[1]
            subprocess.run(["rm", "-rf", str(bundle)], check=True)
            rows.append(row)
            print("  " + ", ".join(f"{key} {value}" for key, value in row.items()), flush=True)
    return {"measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "load_average": os.getloadavg(), "baseline": baseline_ref if baseline else None, "rows": rows}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--memory", nargs="?", const="", metavar="REF",
                        help="only the report's peak RSS as turns grow; REF: also the tree at that commit")
    args = parser.parse_args()
    if args.memory is not None:
        result = report_memory(args.memory or None)
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / "report_memory.json").write_text(json.dumps(result, indent=2) + "\n")
        return 0
    results: dict = {"measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "shared_machine": True, "load_average_at_start": os.getloadavg()}
    blank_s = None
    if chromium_missing_reason() is None:
        with tempfile.TemporaryDirectory() as scratch:
            blank = Path(scratch) / "blank.html"
            blank.write_text("<!DOCTYPE html><title>blank</title>")
            blank_s = statistics.median(render_seconds(blank) for _ in range(RUNS))
        results["chromium_blank_page_s"] = blank_s
    else:
        print(chromium_missing_reason(), file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="bench-reports-") as scratch:
        work = Path(scratch)
        audit_bundle = work / "audit"
        agent("audit", "--duration", "3" if args.quick else "10", "--profile", "trading-latency",
              "--out", str(audit_bundle))
        results["default_audit"] = report_figures(audit_bundle, work, blank_s)
        results["textfile"] = textfile_figures(audit_bundle, work)

        sys.path.insert(0, str(HERE))
        sys.path.insert(0, str(PROJECT / "tests" / "fixtures" / "pcap"))
        from bench_pcap import make_capture

        capture = work / "big.pcap"
        packets = make_capture(capture, 200_000 if args.quick else 1_000_000)
        pcap_bundle = work / "pcap"
        agent("pcap", str(capture), "--out", str(pcap_bundle), "--no-html")
        results["pcap"] = {"packets": packets, **report_figures(pcap_bundle, work, blank_s)}
    results["load_average_at_end"] = os.getloadavg()  # the figures scale with it on a shared VM
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "reports.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
