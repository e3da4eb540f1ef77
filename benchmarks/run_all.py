"""`make bench`: run every benchmarks/bench_*.py in turn and print where the results went.

Each benchmark is a standalone pyperf script that measures guardian-agent side by side with its
peer tool in the same run and writes benchmarks/results/<area>.json.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    selected = set(sys.argv[1:])
    scripts = sorted(HERE.glob("bench_*.py"))
    failures = []
    for script in scripts:
        area = script.stem.removeprefix("bench_")
        if selected and area not in selected:
            continue
        print(f"=== {area} ({script.name})", flush=True)
        started = time.monotonic()
        result = subprocess.run([sys.executable, str(script)], cwd=HERE.parent)
        print(f"=== {area}: exit {result.returncode} in {time.monotonic() - started:.0f} s", flush=True)
        if result.returncode != 0:
            failures.append(area)
    if failures:
        print(f"benchmarks failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
