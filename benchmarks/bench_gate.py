"""Calibration of the rollout gate on real latency data, plus its cost next to a bare U test.

1. Real samples: request->response latencies of a small HTTP/1.1 server on loopback, measured by
   this script (the same kind of data the rollout driver judges).
2. Sample size: the gate is run once on an A/A pair; the samples it asks for (the tail check's
   samples_needed) become the size of every trial below.
3. A/A: baseline and candidate resampled from the same pool -> the gate must fail <= 1% of trials.
4. Power: candidate's tail stretched so its p99 is +10% (median untouched) -> caught >= 95%.
   Also reported, for honesty: a uniform +10% slowdown (p50 and p99 both +10%), which the default
   settings deliberately let through (median threshold 20%, tail judged after the median shift).
5. Repeated looks: the rollout driver judges the gate again and again while a stage dwells and
   rolls back at the first "fail". A/A stages of 6 looks on growing samples (1/6 ... 6/6 of the
   size above): the share of stages with any fail is the false-rollback rate per stage.
6. Cost: pyperf timeit of one gate evaluation vs scipy's mannwhitneyu alone (what Kayenta's
   Mann-Whitney judge computes) on the same data, side by side.

Writes benchmarks/results/gate.json. `--quick` uses fewer samples and trials.
"""

from __future__ import annotations

import http.client
import json
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agent.gate.config import GateSettings  # noqa: E402
from agent.gate.kpi import MetricData  # noqa: E402
from agent.gate.verdict import judge  # noqa: E402

SERVER = """
import random, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
MEAN_SERVICE_S = float(sys.argv[1])
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    wbufsize = 65536
    disable_nagle_algorithm = True
    def do_GET(self):
        if MEAN_SERVICE_S:
            time.sleep(random.expovariate(1.0 / MEAN_SERVICE_S))
        body = b"ok\\n" * 20
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
server = ThreadingHTTPServer(("127.0.0.1", 0), H)
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def real_latencies(count: int, mean_service_s: float = 0.0) -> np.ndarray:
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(mean_service_s)], stdout=subprocess.PIPE, text=True)
    try:
        port = int(server.stdout.readline())
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        latencies = np.empty(count, dtype=np.float64)
        for index in range(count):
            started = time.perf_counter_ns()
            connection.request("GET", "/")
            connection.getresponse().read()
            latencies[index] = time.perf_counter_ns() - started
        connection.close()
        return latencies
    finally:
        server.terminate()
        server.wait()


def stretch_tail(values: np.ndarray, pool: np.ndarray, p99_gain: float) -> np.ndarray:
    """Values above the pool's p90 moved away from it so the p99 grows by `p99_gain`."""
    q90, q99 = np.quantile(pool, [0.90, 0.99])
    scale = ((1 + p99_gain) * q99 - q90) / (q99 - q90)
    return np.where(values > q90, q90 + (values - q90) * scale, values)


def gate_verdict(baseline: np.ndarray, candidate: np.ndarray, settings: GateSettings):
    metrics = [MetricData("turns.latency_ns", "shift", "ns", baseline, candidate),
               MetricData("turns.latency_ns.p99", "tail", "ns", baseline, candidate)]
    return judge(metrics, settings)


def clopper_pearson_upper(failures: int, trials: int, level: float = 0.95) -> float:
    from scipy.stats import beta

    return 1.0 if failures == trials else float(beta.ppf(level, failures + 1, trials - failures))


def clopper_pearson_lower(successes: int, trials: int, level: float = 0.95) -> float:
    from scipy.stats import beta

    return 0.0 if successes == 0 else float(beta.ppf(1 - level, successes, trials - successes + 1))


def rate(pool, size, trials, transform, settings, rng) -> tuple[int, dict]:
    fails, verdicts = 0, {}
    for _ in range(trials):
        baseline = rng.choice(pool, size)
        candidate = transform(rng.choice(pool, size))
        verdict = gate_verdict(baseline, candidate, settings).verdict
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
        fails += verdict == "fail"
    return fails, verdicts


def sequential_rate(pool, size, trials, looks, settings, rng) -> tuple[int, dict]:
    """A/A stages judged at `looks` growing sample sizes; a stage fails at its first failed look."""
    failed, first_fail = 0, {}
    for _ in range(trials):
        baseline, candidate = rng.choice(pool, size), rng.choice(pool, size)
        for look in range(1, looks + 1):
            count = size * look // looks
            if gate_verdict(baseline[:count], candidate[:count], settings).verdict == "fail":
                failed += 1
                first_fail[look] = first_fail.get(look, 0) + 1
                break
    return failed, first_fail


def pyperf_timeit(setup: str, statement: str) -> float:
    with tempfile.TemporaryDirectory() as scratch:
        output = Path(scratch) / "out.json"
        subprocess.run([sys.executable, "-m", "pyperf", "timeit", "--quiet", "--fast", "-o", str(output),
                        "-s", setup, statement], check=True, cwd=ROOT,
                       env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
        import pyperf

        return pyperf.Benchmark.load(str(output)).mean()


def main() -> int:
    quick = "--quick" in sys.argv
    rng = np.random.default_rng(20261124)
    settings = GateSettings()
    started = time.monotonic()
    # A bare loopback echo on this shared host: its p99 sits on a cliff (scheduler hiccups hit
    # ~1% of requests), so the gate is expected to call its tail undecidable. Reported, not calibrated.
    echo = real_latencies(5000 if quick else 10000)
    echo_probe = gate_verdict(rng.choice(echo, echo.size), rng.choice(echo, echo.size), settings)
    echo_tail = next(m for m in echo_probe.metrics if m.metric == "turns.latency_ns.p99")
    print(f"loopback echo: p50 {np.median(echo) / 1e3:.0f} us, p98 {np.quantile(echo, 0.98) / 1e3:.0f} us, "
          f"p99 {np.quantile(echo, 0.99) / 1e3:.0f} us -> tail check: {echo_tail.classification}, "
          f"{echo_tail.samples_needed} samples/side asked")
    # Calibration pool: a service with a real variable service time (exponential, mean 300 us).
    pool = real_latencies(10000 if quick else 20000, 300e-6)
    print(f"service latencies: {pool.size} samples, p50 {np.median(pool) / 1e3:.0f} us, "
          f"p99 {np.quantile(pool, 0.99) / 1e3:.0f} us")

    probe_size = pool.size
    probe = gate_verdict(rng.choice(pool, probe_size), rng.choice(pool, probe_size), settings)
    tail = next(m for m in probe.metrics if m.metric == "turns.latency_ns.p99")
    size = max(probe_size, tail.samples_needed)
    print(f"gate asks for {size} samples per side (tail check at {probe_size}: {tail.reason})")

    aa_trials, power_trials = (60, 40) if quick else (300, 100)
    aa_fails, aa_verdicts = rate(pool, size, aa_trials, lambda values: values, settings, rng)
    tail_fails, tail_verdicts = rate(pool, size, power_trials, lambda v: stretch_tail(v, pool, 0.10), settings, rng)
    uniform_fails, uniform_verdicts = rate(pool, size, power_trials // 5, lambda v: v * 1.10, settings, rng)
    looks, stage_trials = 6, (20 if quick else 100)
    stage_fails, stage_first_fail = sequential_rate(pool, size, stage_trials, looks, settings, rng)

    setup = ("import numpy as np; from benchmarks.bench_gate import gate_verdict; "
             "from agent.gate.config import GateSettings; from scipy.stats import mannwhitneyu; "
             f"r = np.random.default_rng(1); a = r.lognormal(0, 0.5, {size}); b = r.lognormal(0, 0.5, {size}); "
             "s = GateSettings()")
    gate_s = pyperf_timeit(setup, "gate_verdict(a, b, s)")
    mwu_s = pyperf_timeit(setup, "mannwhitneyu(b, a)")

    result = {
        "area": "gate",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {platform.machine()} {platform.processor() or ''} "
                   f"{len(__import__('os').sched_getaffinity(0))} cpus, kernel {platform.release()}".strip(),
        "quick": quick,
        "echo": {"samples": int(echo.size), "p50_us": float(np.median(echo) / 1e3),
                 "p98_us": float(np.quantile(echo, 0.98) / 1e3), "p99_us": float(np.quantile(echo, 0.99) / 1e3),
                 "tail_classification": echo_tail.classification, "tail_samples_needed": int(echo_tail.samples_needed)},
        "pool": {"samples": int(pool.size), "service": "exponential, mean 300 us", "p50_us": float(np.median(pool) / 1e3),
                 "p99_us": float(np.quantile(pool, 0.99) / 1e3)},
        "samples_per_side": int(size),
        "aa": {"trials": aa_trials, "fails": aa_fails, "fail_rate": aa_fails / aa_trials,
               "fail_rate_upper95": clopper_pearson_upper(aa_fails, aa_trials), "verdicts": aa_verdicts,
               "target": "<= 1%"},
        "p99_plus_10pct_tail": {"trials": power_trials, "caught": tail_fails, "catch_rate": tail_fails / power_trials,
                                "catch_rate_lower95": clopper_pearson_lower(tail_fails, power_trials),
                                "verdicts": tail_verdicts, "target": ">= 95%"},
        "uniform_plus_10pct": {"trials": power_trials // 5, "caught": uniform_fails,
                               "catch_rate": uniform_fails / (power_trials // 5), "verdicts": uniform_verdicts,
                               "note": "by design below the 20% median threshold; tail judged after the median shift"},
        "aa_repeated_looks": {"trials": stage_trials, "looks_per_stage": looks, "stages_failed": stage_fails,
                              "fail_rate": stage_fails / stage_trials,
                              "fail_rate_upper95": clopper_pearson_upper(stage_fails, stage_trials),
                              "first_failed_look": stage_first_fail},
        "cost": {"gate_evaluation_ms": gate_s * 1e3, "bare_mannwhitneyu_ms": mwu_s * 1e3,
                 "ratio": gate_s / mwu_s},
        "seconds": round(time.monotonic() - started, 1),
    }
    print(f"A/A false-fail rate: {aa_fails}/{aa_trials} = {100 * aa_fails / aa_trials:.1f}% "
          f"(95% upper bound {100 * result['aa']['fail_rate_upper95']:.1f}%; target <= 1%)")
    print(f"p99 +10% (tail) caught: {tail_fails}/{power_trials} = {100 * tail_fails / power_trials:.1f}% "
          f"(95% lower bound {100 * result['p99_plus_10pct_tail']['catch_rate_lower95']:.1f}%; target >= 95%)")
    print(f"A/A stages of {looks} looks with any fail: {stage_fails}/{stage_trials} (95% upper bound "
          f"{100 * result['aa_repeated_looks']['fail_rate_upper95']:.1f}%)")
    print(f"uniform +10% caught: {uniform_fails}/{power_trials // 5} (by design: below the 20% median threshold)")
    print(f"cost per evaluation at {size}/side: gate {gate_s * 1e3:.1f} ms vs bare Mann-Whitney U "
          f"{mwu_s * 1e3:.1f} ms (x{gate_s / mwu_s:.1f})")
    out = ROOT / "benchmarks" / "results" / "gate.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    ok = result["aa"]["fail_rate"] <= 0.01 and result["p99_plus_10pct_tail"]["catch_rate"] >= 0.95
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
