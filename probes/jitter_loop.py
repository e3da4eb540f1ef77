"""The jitter probe's busy loop, run as `python -m probes.jitter_loop --cpu N ...`.

A separate, import-light module so the child pinned to the measured CPU starts fast and loads
nothing but the loop (importing the probe registry would pull every probe in).
"""

from __future__ import annotations

import json
import os
import signal
import sys

THRESHOLD_NS = 5_000
MAX_GAPS_PER_CPU = 500_000  # bounds memory on a CPU that is constantly preempted


def busy_loop(cpu: int, duration_ns: int, threshold_ns: int) -> dict:
    import gc
    import time

    os.sched_setaffinity(0, {cpu})
    stop = [False]
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__(0, True))
    gc.disable()  # a collection inside the loop would be measured as a hiccup
    clock = time.perf_counter_ns
    gaps: list[int] = []
    count = total = iterations = 0
    start = last = clock()
    end = start + duration_ns
    while True:
        now = clock()
        gap = now - last
        if gap > threshold_ns:
            count += 1
            total += gap
            if len(gaps) < MAX_GAPS_PER_CPU:
                gaps.append(gap)
        last = now
        iterations += 1
        if now >= end or stop[0]:
            break
    return {"cpu": cpu, "elapsed_ns": last - start, "iterations": iterations, "gap_count": count,
            "gap_total_ns": total, "gaps_ns": gaps}


def _child_main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="probes.jitter_loop")
    parser.add_argument("--cpu", type=int, required=True)
    parser.add_argument("--duration-ns", type=int, required=True)
    parser.add_argument("--threshold-ns", type=int, default=THRESHOLD_NS)
    args = parser.parse_args(argv)
    result = busy_loop(args.cpu, args.duration_ns, args.threshold_ns)
    sys.stdout.write(json.dumps(result))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
