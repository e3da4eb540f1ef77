"""Chaos runner lifecycle: how fast a fault is active after the decision, gone after its planned
removal or an abort (kill switch), and gone after a SIGKILL of the agent (watchdog / kernel).

The chaos budgets (docs/chaos.md): active within 100 ms of the decision, gone within 100 ms of
the removal or the abort, nothing left 2 s after the agent's death. Measured on the paper-trading stack of the tests
(tests/paper_trading.py) with two kinds: `latency` (nft owner table + fault proxy: dies with the
agent) and `pause` (cgroup freezer: journal + watchdog). Times come from the fsync'd journal:
  decision -> active   phase "fault" record -> fault_applied record (includes the journal fsync
                       of fault_applying and the injector's apply)
  removal              the runner's decision to remove -> the fault stopped acting (remove_ms:
                       the holder/proxy/stress child exited, the cgroup thawed; the check that
                       the nft table is gone and the stream clean-up come after, clean_ms)
  abort                kill-switch file touched -> the fault stopped acting (gone_at; 20 ms poll)
  SIGKILL -> gone      kill -9 at the kill point after apply -> no object of the run left
                       (nft table, freezer cgroup, proxy/holder processes, watchdog)
Per kind (every kind available here but postgres_latency, which is latency's mechanism on
another port, and kill, which has nothing to remove): the runner's own steps without the KPI
phases, 5 rounds each: check() at validation (standby children start there, not counted), then
decision -> fault_applying journaled (fsync) -> apply() returned = active; removal decision ->
remove() until the fault stopped acting = gone.
Writes benchmarks/results/chaos_runner.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from tests.paper_trading import Stack  # noqa: E402
from tests.test_chaos_live import (journal_records, residue, short_experiment, start_agent,  # noqa: E402
                                   wait_for_event)
from tests.test_rollout_live import free_ports  # noqa: E402


def experiment_for(kind: str, work: Path, ports: list[int], exchange_pid: int, duration_s: float) -> Path:
    path = short_experiment(work / f"{kind}-{duration_s:g}s.toml", ports, before_s=1, duration_s=duration_s, after_s=1)
    if kind == "pause":
        path.write_text(path.read_text().replace(
            f'kind = "latency"\ntarget = "127.0.0.1:{ports[1]}"\ndelay_ms = 300', f'kind = "pause"\npid = {exchange_pid}'))
    return path


def run_args(experiment: Path, state: Path) -> list[str]:
    return ["chaos", "run", str(experiment), "--environment", "paper-trading", "--state-dir", str(state),
            "--no-publish", "--json"]


def not_steady(state: Path) -> bool:
    return any(r.get("verdict") == "not-steady" for r in journal_records(state))


def retried(measure, experiment: Path, state: Path, attempts: int = 3):
    """A run whose steady state did not hold injected nothing (a busy shared host): run again,
    in a fresh state dir, and say so; the figure is of the run that injected."""
    for attempt in range(attempts):
        where = state if attempt == 0 else state.with_name(f"{state.name}-retry{attempt}")
        try:
            return measure(experiment, where)
        except NotSteady:
            print(f"{state.name}: not steady, running again", file=sys.stderr)
    raise RuntimeError(f"{state.name}: not steady {attempts} times")


class NotSteady(Exception):
    pass


def normal_run(experiment: Path, state: Path) -> dict:
    process = start_agent(*run_args(experiment, state))
    process.communicate(timeout=60)
    if not_steady(state):
        raise NotSteady
    records = journal_records(state)
    fault_phase = next(r for r in records if r["event"] == "phase" and r["phase"] == "fault")
    applied = next(r for r in records if r["event"] == "fault_applied")
    removed = next(r for r in records if r["event"] == "fault_removed")
    return {"decision_to_active_ms": (applied["ts"] - fault_phase["ts"]) * 1000.0, "apply_ms": applied["apply_ms"],
            "remove_ms": removed["remove_ms"], "clean_ms": removed.get("clean_ms", removed["remove_ms"])}


def abort_run(experiment: Path, state: Path) -> float:
    process = start_agent(*run_args(experiment, state))
    try:
        try:
            wait_for_event(state, "fault_applied", stop=lambda: not_steady(state))
        except AssertionError:
            if not_steady(state):
                process.communicate(timeout=60)
                raise NotSteady from None
            process.kill()
            out, err = process.communicate()
            raise RuntimeError(f"the run never applied its fault: {out[-800:]} {err[-800:]}") from None
        touched = time.time()
        (state / "kill-switch").touch()
        removed = wait_for_event(state, "fault_removed")
        return (removed.get("gone_at", removed["ts"]) - touched) * 1000.0
    finally:
        if process.poll() is None:
            process.communicate(timeout=30)


def sigkill_run(experiment: Path, state: Path) -> float:
    process = start_agent(*run_args(experiment, state), env={"GUARDIAN_AGENT_TEST_KILL_AT": "chaos:applied:0"})
    process.communicate(timeout=60)
    died = time.monotonic()
    if process.returncode == 1 and not_steady(state):
        raise NotSteady
    assert process.returncode == -signal.SIGKILL, process.returncode
    while residue(state):
        if time.monotonic() - died > 10:
            raise RuntimeError(f"residue after 10 s: {residue(state)}")
        time.sleep(0.005)
    return (time.monotonic() - died) * 1000.0


KIND_SPECS = {
    "latency": {"delay_ms": 50}, "jitter": {"delay_ms": 50, "jitter_ms": 10}, "loss": {"share_pct": 10},
    "reset": {"share_pct": 30}, "http_error": {"share_pct": 50}, "bandwidth": {"rate_bytes_per_s": 100000},
    "cpu": {"cpus": str(max(os.sched_getaffinity(0))), "load_pct": 20}, "memory": {"size_bytes": 64 << 20},
    "pause": {},
}


def kind_lifecycle(kind: str, target: str, victim_pid: int, work: Path, rounds: int) -> dict:
    from agent.chaos import journal
    from agent.chaos.faults import injector_for
    from core.host import Host

    cls = injector_for(kind)
    extra = {"pid": victim_pid} if kind == "pause" else {} if kind in ("cpu", "memory") else {"target": target}
    active, gone = [], []
    for round_index in range(rounds):
        injector = cls(cls.validate({"kind": kind, "duration_s": 5, **extra, **KIND_SPECS[kind]}, "fault[0]"),
                       Host.real())
        injector.check()
        decided = time.time_ns()
        journal.append(work, "fault_applying", run_id=f"bench-{kind}", index=round_index, kind=kind,
                       undo=injector.undo_record(), plan=injector.plan())
        injector.apply()
        active.append((time.time_ns() - decided) / 1e6)
        time.sleep(0.3)
        injector.gone_ns = None
        removal = time.time_ns()
        injector.remove()
        gone.append(((injector.gone_ns or time.time_ns()) - removal) / 1e6)
        journal.append(work, "fault_removed", run_id=f"bench-{kind}", index=round_index, kind=kind, by="bench")
    return {"decision_to_active": summary(active), "removal_to_gone": summary(gone)}


def summary(values: list[float]) -> dict:
    return {"median_ms": round(statistics.median(values), 1), "max_ms": round(max(values), 1),
            "runs": len(values)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kind-rounds", type=int, default=5)
    parser.add_argument("--skip-runs", action="store_true", help="only the per-kind lifecycle figures")
    args = parser.parse_args()
    results: dict = {"area": "chaos_runner", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                 "kernel": platform.release()}, "rounds": args.rounds, "kinds": {}}
    with tempfile.TemporaryDirectory(prefix="bench-chaos-") as temp:
        work = Path(temp)
        ports = free_ports(4)
        with Stack(*ports, timeout_ms=30) as stack:
            victim = subprocess.Popen(["sleep", "600"])
            try:
                results["per_kind"] = {kind: kind_lifecycle(kind, f"127.0.0.1:{ports[1]}", victim.pid, work,
                                                            args.kind_rounds) for kind in KIND_SPECS}
            finally:
                victim.kill()
                victim.wait()
            for kind in () if args.skip_runs else ("latency", "pause"):
                normal, aborts, kills = [], [], []
                for round_index in range(args.rounds):
                    short = experiment_for(kind, work, ports, stack.pids[0], 1)
                    long = experiment_for(kind, work, ports, stack.pids[0], 30)
                    normal.append(retried(normal_run, short, work / f"{kind}-n{round_index}"))
                    aborts.append(retried(abort_run, long, work / f"{kind}-a{round_index}"))
                    kills.append(retried(sigkill_run, short, work / f"{kind}-k{round_index}"))
                results["kinds"][kind] = {
                    "decision_to_active": summary([n["decision_to_active_ms"] for n in normal]),
                    "apply": summary([n["apply_ms"] for n in normal]),
                    "removal_to_gone": summary([n["remove_ms"] for n in normal]),
                    "remove_and_clean_up": summary([n["clean_ms"] for n in normal]),
                    "kill_switch_to_gone": summary(aborts),
                    "sigkill_to_gone": summary(kills),
                }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "chaos_runner.json").write_text(json.dumps(results, indent=2) + "\n")
    for kind, figures in list(results["per_kind"].items()) + [(f"{k} run", v) for k, v in results["kinds"].items()]:
        for name, value in figures.items():
            print(f"{kind:12} {name:20} median {value['median_ms']:7.1f} ms  max {value['max_ms']:7.1f} ms"
                  f"  ({value['runs']} runs)")
    print(f"results: {HERE / 'results' / 'chaos_runner.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
