"""Jitter meters side by side: rt-tests oslat (C) and the Python busy-loop fallback, on the same
CPU, one after the other, for the same window. Reports each meter's loop cost (its resolution),
the gaps it saw above 1 us and 5 us, and its max gap.

Writes benchmarks/results/jitter.json. The machine may be shared while this runs: the gap counts
then include other tenants' interference; the loop cost is the figure that compares the meters.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.host import Host  # noqa: E402
from probes.jitter import jitter_rows, run_oslat  # noqa: E402

WINDOW_S = 5


def python_loop(cpu: int, threshold_ns: int) -> dict:
    done = subprocess.run([sys.executable, "-m", "probes.jitter_loop", "--cpu", str(cpu), "--duration-ns",
                           str(WINDOW_S * 1_000_000_000), "--threshold-ns", str(threshold_ns)],
                          capture_output=True, text=True, cwd=ROOT, timeout=WINDOW_S + 30)
    return jitter_rows([json.loads(done.stdout)], threshold_ns)[0]


def main() -> int:
    cpu = Host.real().online_cpus()[-1]
    result = {"cpu": cpu, "window_s": WINDOW_S, "meters": {}}
    for threshold_ns in (1_000, 5_000):
        if shutil.which("oslat"):
            with tempfile.TemporaryDirectory() as scratch:
                row = run_oslat([cpu], WINDOW_S, threshold_ns, scratch)[0][0]
            result["meters"][f"oslat@{threshold_ns}ns"] = row
        result["meters"][f"python@{threshold_ns}ns"] = python_loop(cpu, threshold_ns)
    for name, row in result["meters"].items():
        print(f"{name}: loop {row['loop_ns_mean']:.1f} ns, {row['gap_count']} gaps, "
              f"p99 {row['gap_p99_ns']} ns, max {row['gap_max_ns']} ns")
    out = ROOT / "benchmarks" / "results" / "jitter.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
