"""Rollout figures on this machine, with the default gate settings and on_inconclusive policy:

1. false-rollback rate: real A/A rollouts (green identical to blue) through a real HAProxy 2.6
   with health checks, blue and green being the same small Python HTTP service (1 ms service
   time), the driver's own load (4 keep-alive workers) plus users' traffic through the frontend;
2. time from a bad green's first sample to blue at 100%, per kind of defect: slow (+2 ms), errors
   (2% 500s), fat tail (3% of requests +20 ms, median unchanged), DOWN (health check failing from
   the 50% stage on, and from green's first full-load window at 100% on: measured from the
   moment /health starts failing).

Only the dwell times are set (they are settings): A/A 50% -> 100%, then A/A and the defects with
10% -> 50% -> 100%. Writes benchmarks/results/rollout.json. `--quick`: 4 A/A rollouts of each
instead of 10. About 6 minutes.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.conftest import run_agent  # noqa: E402
from tests.test_rollout_live import ClientLoad, Setup  # noqa: E402

AA_STAGES = [(50, 3, 25), (100, 4, 25)]
DEFECT_STAGES = [(10, 2, 20), (50, 3, 25), (100, 4, 25)]
DEFECTS = {"slow": {"green_delay_ms": 3.0}, "errors": {"green_error_rate": 0.02},
           "fat tail": {"green_tail_ms": 20.0}, "down": {}, "down at 100%": {}}
# The DOWN defects: /health starts failing once green has this weight (at 100% blue has weight 0,
# so HAProxy has nothing to fall back on: the driver's reaction is the only protection).
SICK_AT_WEIGHT = {"down": 50, "down at 100%": 100}


def events(setup: Setup) -> list[dict]:
    path = setup.dir / "state" / "test-green.journal.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def rollout(setup: Setup, stages, **start) -> tuple[int, list[dict], str, dict]:
    setup.start(**start)
    plan = setup.plan(stages, extra="", gate="", baseline_s=1)
    with ClientLoad(setup.frontend) as users:
        result = run_agent("rollout", "--plan", str(plan), timeout=150)
    return result.returncode, events(setup), result.stdout, {"errors": users.errors, "served": users.served}


def first_green_sample_s(stdout: str) -> float | None:
    from reports.bundle import Bundle

    if "report: " not in stdout:
        return None
    turns = Bundle(Path(stdout.split("report: ")[1].split()[0])).table("turns")
    versions = turns.column("version").to_pylist()
    stamps = turns.column("ts").cast("int64").to_pylist()
    green = [ts for ts, version in zip(stamps, versions, strict=True) if version == "green"]
    return min(green) / 1e9 if green else None


def aa_run(index: int, stages=AA_STAGES) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as directory:
        setup = Setup(Path(directory))
        try:
            code, journal, stdout, users = rollout(setup, stages)
        finally:
            setup.stop()
    decisions = [e for e in journal if e["event"] == "decision"]
    return {"run": index, "exit_code": code, "promoted": code == 0, "user_errors": users["errors"],
            "decisions": [(d["stage"] + 1, d["decision"], d["verdict"], d["reason"][:160],
                           {name: values for name, values in (d.get("metrics") or {}).items()})
                          for d in decisions],
            "seconds": round(journal[-1]["ts"] - journal[0]["ts"], 1)}


def defect_run(kind: str) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-rollout-") as directory:
        setup = Setup(Path(directory))
        sick_at: list[float] = []
        try:
            if kind in SICK_AT_WEIGHT:
                def make_sick():
                    deadline = time.monotonic() + 60
                    while time.monotonic() < deadline:
                        try:
                            if setup.weight("green") == SICK_AT_WEIGHT[kind]:
                                setup.sick("green")
                                sick_at.append(time.time())
                                return
                        except OSError:
                            pass
                        time.sleep(0.05)
                threading.Thread(target=make_sick, daemon=True).start()
            code, journal, stdout, users = rollout(setup, DEFECT_STAGES, **DEFECTS[kind])
            first_green_s = first_green_sample_s(stdout)
        finally:
            setup.stop()
    end = next((e for e in reversed(journal) if e["event"] in ("rolled_back", "promoted", "failed")), journal[-1])
    start = sick_at[0] if sick_at else first_green_s
    # The terminal record: a refusal read from the balancer (green DOWN) has no gate decision.
    return {"defect": kind, "exit_code": code, "outcome": end["event"], "user_errors": users["errors"],
            "stage": None if end.get("stage") is None else end["stage"] + 1,
            "reason": end.get("reason", "")[:200],
            "first_bad_sample_to_blue_s": None if start is None else round(end["ts"] - start, 2),
            "decision_to_blue_ms": end.get("decision_to_blue_ms")}


def upper_bound_95(failures: int, trials: int) -> float:
    """Clopper-Pearson one-sided 95% upper bound of a rate."""
    from scipy.stats import beta

    return 1.0 if failures == trials else float(beta.ppf(0.95, failures + 1, trials - failures))


def main() -> int:
    quick = "--quick" in sys.argv
    started = time.monotonic()
    load_at_start = os.getloadavg()[0]
    runs = 4 if quick else 10
    aa = [aa_run(index) for index in range(runs)]
    # The same A/A with the defects' stages: a 10% stage judges green on a tenth of the samples.
    aa_from_10 = [aa_run(index, DEFECT_STAGES) for index in range(runs)]
    for label, group in (("A/A 50%->100%", aa), ("A/A 10%->50%->100%", aa_from_10)):
        for run in group:
            print(f"{label} {run['run'] + 1}: {'promoted' if run['promoted'] else 'ROLLED BACK'} in {run['seconds']} s, "
                  f"user errors {run['user_errors']}: {run['decisions'][-1] if run['decisions'] else ''}", flush=True)
    defects = [defect_run(kind) for kind in DEFECTS]
    for run in defects:
        print(f"{run['defect']}: {run['outcome']} at stage {run['stage']}, first bad sample -> blue "
              f"{run['first_bad_sample_to_blue_s']} s, user errors {run['user_errors']}: {run['reason']}", flush=True)
    false_rollbacks = sum(not run["promoted"] for run in aa)
    false_from_10 = sum(not run["promoted"] for run in aa_from_10)
    summary = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "note": f"{os.cpu_count()}-CPU VM shared with other jobs; 1-minute load average "
                       f"{load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end",
               "aa_rollouts": len(aa), "false_rollbacks": false_rollbacks,
               "false_rollback_rate_pct": round(100.0 * false_rollbacks / len(aa), 1),
               "false_rollback_upper_95_pct": round(100.0 * upper_bound_95(false_rollbacks, len(aa)), 1),
               "aa_from_10pct": {"stages": DEFECT_STAGES, "rollouts": len(aa_from_10), "false_rollbacks": false_from_10,
                                 "false_rollback_upper_95_pct": round(100.0 * upper_bound_95(false_from_10,
                                                                                             len(aa_from_10)), 1),
                                 "runs": aa_from_10},
               "aa": aa, "defects": defects, "seconds": round(time.monotonic() - started)}
    out = ROOT / "benchmarks" / "results" / "rollout.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, default=str))
    print(f"false rollbacks {false_rollbacks}/{len(aa)} (95% upper bound "
          f"{summary['false_rollback_upper_95_pct']}%), from 10%: {false_from_10}/{len(aa_from_10)} (95% upper bound "
          f"{summary['aa_from_10pct']['false_rollback_upper_95_pct']}%); {out} in {summary['seconds']} s")
    caught = all(run["outcome"] == "rolled_back" for run in defects)
    return 0 if caught and not math.isnan(summary["false_rollback_rate_pct"]) else 1


if __name__ == "__main__":
    sys.exit(main())
