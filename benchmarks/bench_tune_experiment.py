"""A/A calibration and power of `tune experiment`'s verdicts (agent/tuning/verdicts.py) on real
samples of a real workload.

1. Real samples, measured once: the loopback-rtt built-in (TCP ping-pong on 127.0.0.1, ns per
   round trip), WINDOWS windows of WINDOW_S seconds, nothing changed on the host.
2. Sample size, as benchmarks/bench_gate.py sizes its trials: one A/A judgement on MIN_ARM_SIZE
   per arm; the samples its p99 check asks for (samples_needed, capped) become the arm size.
3. A/A, resampled: A and B each drawn (with replacement) from the pooled samples, 100 times ->
   the share judged "no measurable effect" (the target is >= 99%).
4. Power: B's tail stretched so its p99 is +10% (median untouched), 100 times -> the share judged
   "worsens" (the target is >= 95%).
5. For honesty, A/A on whole windows: the real windows split into two arms of WINDOWS/2 (every
   distinct split) -> the share judged "no measurable effect". This one keeps the drift between
   windows that the resampling above averages away, so on a shared host it is lower.

Writes benchmarks/results/tune_experiment.json. `--quick` uses fewer trials. ~1-2 min.
"""

from __future__ import annotations

import itertools
import json
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.tuning.verdicts import default_settings, judge_item  # noqa: E402
from agent.tuning.workloads import BuiltinCommand  # noqa: E402
from bench_gate import clopper_pearson_lower, clopper_pearson_upper, stretch_tail  # noqa: E402

WORKLOAD = sys.argv[sys.argv.index("--kpi") + 1] if "--kpi" in sys.argv else "syscall"
WINDOWS = 8
WINDOW_S = 1.0
MIN_ARM_SIZE = 5_000
MAX_ARM_SIZE = 50_000  # ~0.5 s per judgement: 235 of them stay near 2 min


def measure_windows() -> list[np.ndarray]:
    workload = BuiltinCommand(WORKLOAD)
    return [np.asarray(workload.measure(WINDOW_S), dtype=np.float64) for _ in range(WINDOWS)]


def arm_size(pool, settings, rng) -> tuple[int, int]:
    """(the arm size used, the samples per arm the gate asked for before the cap)."""
    judgement = judge_item(rng.choice(pool, MIN_ARM_SIZE), rng.choice(pool, MIN_ARM_SIZE), settings)
    needed = max((m.samples_needed for m in judgement.gate.metrics), default=0)
    # An A/A pair decided at MIN_ARM_SIZE asks for nothing more, but finding +10% at p99 needs
    # the p99 interval well inside the 5% threshold: never fewer than MAX_ARM_SIZE / 2.
    return int(min(MAX_ARM_SIZE, max(MAX_ARM_SIZE // 2, needed))), int(needed)


def resampled(pool, size, trials, transform, settings, rng) -> dict[str, int]:
    verdicts: dict[str, int] = {}
    for _ in range(trials):
        baseline = rng.choice(pool, size)
        candidate = transform(rng.choice(pool, size))
        verdict = judge_item(baseline, candidate, settings).verdict
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
    return verdicts


def thinned(values: np.ndarray, rng) -> np.ndarray:
    return values if values.size <= MAX_ARM_SIZE else rng.choice(values, MAX_ARM_SIZE, replace=False)


def window_splits(windows, settings, rng) -> dict[str, int]:
    verdicts: dict[str, int] = {}
    indices = range(len(windows))
    for arm in itertools.combinations(indices, len(windows) // 2):
        if 0 not in arm:
            continue  # each split once (arm A always holds window 0)
        baseline = thinned(np.concatenate([windows[i] for i in arm]), rng)
        candidate = thinned(np.concatenate([windows[i] for i in indices if i not in arm]), rng)
        verdict = judge_item(baseline, candidate, settings).verdict
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
    return verdicts


def main() -> int:
    quick = "--quick" in sys.argv
    trials = 30 if quick else 100
    settings = default_settings()
    rng = np.random.default_rng(20261202)
    started = time.monotonic()
    windows = measure_windows()
    pool = np.concatenate(windows)
    print(f"measured {pool.size} {WORKLOAD} samples in {WINDOWS} x {WINDOW_S:g} s windows: "
          f"p50 {np.median(pool) / 1000:.1f} us, p99 {np.quantile(pool, 0.99) / 1000:.1f} us", flush=True)
    size, needed = arm_size(pool, settings, rng)
    rate_hz = pool.size / (WINDOWS * WINDOW_S)
    print(f"arm size {size} samples (~{size / rate_hz:.1f} s of windows per arm at {rate_hz:.0f} samples/s; "
          f"the gate asked for {needed})", flush=True)
    aa = resampled(pool, size, trials, lambda v: v, settings, rng)
    power = resampled(pool, size, trials, lambda v: stretch_tail(v, pool, 0.10), settings, rng)
    splits = window_splits(windows, settings, rng)
    no_effect = aa.get("no measurable effect", 0)
    found = power.get("worsens", 0)
    split_trials = sum(splits.values())
    result = {
        "benchmark": "tune_experiment", "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "note": "2-core VM shared with other engineers' test runs while measured",
        "workload": WORKLOAD, "windows": WINDOWS, "window_s": WINDOW_S, "samples": int(pool.size),
        "arm_size": size, "arm_seconds": round(size / rate_hz, 1), "samples_needed_uncapped": needed, "trials": trials,
        "settings": {"p50_threshold_pct": settings.metrics["tuning.latency_ns"].threshold_pct,
                     "p99_threshold_pct": settings.metrics["tuning.latency_ns.p99"].threshold_pct,
                     "confidence": settings.confidence},
        "aa_resampled": {"verdicts": aa, "no_effect_pct": 100.0 * no_effect / trials,
                         "false_effect_upper95_pct": 100.0 * clopper_pearson_upper(trials - no_effect, trials)},
        "p99_plus_10pct": {"verdicts": power, "found_pct": 100.0 * found / trials,
                           "found_lower95_pct": 100.0 * clopper_pearson_lower(found, trials)},
        "aa_window_splits": {"verdicts": splits, "splits": split_trials,
                             "no_effect_pct": 100.0 * splits.get("no measurable effect", 0) / split_trials},
        "seconds": round(time.monotonic() - started, 1),
    }
    out = ROOT / "benchmarks" / "results" / "tune_experiment.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"A/A resampled: {result['aa_resampled']['no_effect_pct']:.0f}% no measurable effect ({aa})")
    print(f"p99 +10%: found (worsens) in {result['p99_plus_10pct']['found_pct']:.0f}% ({power})")
    print(f"A/A whole windows: {result['aa_window_splits']['no_effect_pct']:.0f}% no measurable effect "
          f"over {split_trials} splits ({splits})")
    print(f"wrote {out} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
