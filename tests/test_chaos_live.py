"""Chaos experiments end to end on the real kernel: a paper-trading stack on loopback, real nft
owner tables and the fault proxy, real SIGKILLs of the agent.

The issue's experiment runs exactly as written (ports 8200/8201/8300/8301): it holds with the
strategy that times out and pauses, and is refuted, with a finding naming the missing timeout,
with the one that does not. Both variants run at once, each stack and agent in a network
namespace of its own (the fixed ports exist once per namespace): the 26 s experiment once, not
twice, on the suite's clock. The other tests use free ports and short phases; status/abort,
the frozen-process kill and the plan share one resilient stack (a module fixture: each removes
its fault and asserts no residue), and the five SIGKILL points run at once on stacks of their own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.conftest import PROJECT_ROOT
from tests.paper_trading import Stack
from tests.test_rollout_live import free_ports

pytestmark = pytest.mark.live

AS_WRITTEN = Path(__file__).parent / "fixtures" / "chaos" / "exchange-slow.toml"
OBJECT_PREFIX = "guardian_chaos_"


def in_netns(netns: str | None) -> list[str]:
    return ["ip", "netns", "exec", netns] if netns else []


def agent(*args: str, env: dict | None = None, timeout: float = 120,
          netns: str | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), **(env or {}))
    return subprocess.run([*in_netns(netns), sys.executable, "-m", "agent.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=full_env, cwd=PROJECT_ROOT, preexec_fn=lambda: os.nice(-5))


def start_agent(*args: str, env: dict | None = None, netns: str | None = None) -> subprocess.Popen:
    full_env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), **(env or {}))
    return subprocess.Popen([*in_netns(netns), sys.executable, "-m", "agent.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=full_env, cwd=PROJECT_ROOT,
                            preexec_fn=lambda: os.nice(-5))


class Netns:
    """A network namespace of this test's own (unique name), loopback up, deleted on exit."""

    def __init__(self, label: str):
        self.name = f"{OBJECT_PREFIX}test_{os.getpid()}_{label}_{os.urandom(2).hex()}"

    def __enter__(self) -> str:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "-n", self.name, "link", "set", "lo", "up"], check=True)
        return self.name

    def __exit__(self, *exc) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


def short_experiment(path: Path, ports: list[int], *, before_s=2, duration_s=3, after_s=1, extra="") -> Path:
    strategy, exchange, control_strategy, _ = ports
    path.write_text(f"""
title = "exchange slow (short)"
hypothesis = "the strategy pauses"
environment = "paper-trading"
[steady_state]
url = "http://127.0.0.1:{strategy}/order"
control_url = "http://127.0.0.1:{control_strategy}/order"
rate_per_s = 40
before_s = {before_s}
after_s = {after_s}
ok_status = [200, 503]
max_error_rate_pct = 1
max_p99_ms = 200           # short windows on a shared 2-core host: a 50 ms p99 of 40 requests is its max
[[fault]]
kind = "latency"
target = "127.0.0.1:{exchange}"
delay_ms = 300
duration_s = {duration_s}
{extra}
""")
    return path


class SharedStack:
    """One resilient stack (free ports) for every test of this module that does not need its
    own: `with resilient as stack:` waits until the strategy trades again (the previous test's
    fault is gone: each asserts no residue) and leaves the stack running."""

    def __init__(self, stack: Stack):
        self.stack = stack
        self.ports = list(stack.ports.values())

    def __enter__(self) -> Stack:
        import http.client

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.ports[0], timeout=1)
                connection.request("GET", "/status")
                if connection.getresponse().read() == b"trading\n":
                    return self.stack
            except (OSError, http.client.HTTPException):
                pass
            time.sleep(0.05)
        raise AssertionError("the shared stack's strategy did not trade again within 10 s")

    def __exit__(self, *exc) -> None:
        pass


@pytest.fixture(scope="module")
def resilient():
    with Stack(*free_ports(4), timeout_ms=30) as stack:
        yield SharedStack(stack)


def journal_records(state: Path) -> list[dict]:
    path = state / "journal.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def our_object_names(state: Path) -> set[str]:
    """Every kernel object name the run's undo records mention (nft tables, cgroups, ...)."""
    names = set()

    def walk(value):
        if isinstance(value, str) and OBJECT_PREFIX in value:
            names.add(value)
        elif isinstance(value, dict):
            for item in value.values():
                walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    for record in journal_records(state):
        if record["event"] == "fault_applying":
            walk(record["undo"])
    return names


def processes_mentioning(word: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if word.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


def residue(state: Path, netns: str | None = None) -> list[str]:
    """Our own objects still present: nft tables, tc qdiscs, cgroups and processes named in the
    journal's undo records, and the run's watchdog (nft and tc of the run's network namespace)."""
    left = []
    ruleset = subprocess.run([*in_netns(netns), "nft", "list", "ruleset"], capture_output=True, text=True).stdout
    qdiscs = subprocess.run([*in_netns(netns), "tc", "qdisc", "show"], capture_output=True, text=True).stdout
    for name in our_object_names(state):
        if name in ruleset:
            left.append(f"nft {name}")
        if name in qdiscs:
            left.append(f"tc {name}")
        if name.startswith("/"):
            left += [f"path {name}"] if Path(name).exists() else []   # a cgroup the fault created
            continue
        left += [f"cgroup {p}" for p in Path("/sys/fs/cgroup").rglob(f"*{name}*")][:3]
        left += [f"process {pid} ({name})" for pid in processes_mentioning(name)]
    for record in journal_records(state):
        if record["event"] == "watchdog_started" and Path(f"/proc/{record['pid']}").exists():
            status = Path(f"/proc/{record['pid']}/status").read_text()
            if "State:\tZ" not in status:
                left.append(f"watchdog {record['pid']}")
    return left


def wait_no_residue(state: Path, within_s: float) -> tuple[list[str], float]:
    started = time.monotonic()
    while True:
        left = residue(state)
        elapsed = time.monotonic() - started
        if not left or elapsed > within_s:
            return left, elapsed
        time.sleep(0.05)


def wait_for_event(state: Path, event: str, timeout_s: float = 30, stop=lambda: False) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop():
        for record in journal_records(state):
            if record["event"] == event:
                return record
        time.sleep(0.05)
    raise AssertionError(f"no {event} record within {timeout_s} s")


def run_as_written_side_by_side(runs: dict[str, tuple[str, Path, list[str]]]) -> dict[str, subprocess.CompletedProcess]:
    """{name: (netns, out, args)} -> {name: result}: every run at once, one per namespace.

    The as-written experiment keeps its 50 ms p99: on a CI host shared with other jobs the
    steady state itself may not hold. `not-steady` injects nothing and is a precondition, not the
    outcome under test, so such a run is retried (twice at most, and said) instead of failing."""
    results: dict[str, subprocess.CompletedProcess] = {}
    pending = dict(runs)
    for attempt in range(3):
        started = {}
        for name, (netns, out, args) in pending.items():
            target = out if attempt == 0 else out.with_name(f"{out.name}-retry{attempt}")
            command = ("chaos", "run", str(AS_WRITTEN), "--json", "--out", str(target), *args)
            started[name] = (start_agent(*command, netns=netns), command)
        for name, (process, command) in started.items():
            stdout, stderr = process.communicate(timeout=180)
            results[name] = subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
        pending = {name: run for name, run in pending.items()
                   if json.loads(results[name].stdout or "{}").get("verdict") == "not-steady"}
        if not pending:
            break
        print(f"as-written attempt {attempt + 1}: {sorted(pending)} not-steady on this busy host, running again")
    return results


# --- the experiment, as written ------------------------------------------------------------
def test_as_written_holds_with_a_strategy_that_times_out_and_is_refuted_without(tmp_path):
    config = tmp_path / "config.toml"
    dataset = tmp_path / "dataset"
    config.write_text(f'environment = "paper-trading"\n[dataset]\nroot = "{dataset}"\n')
    held_state, refuted_state = tmp_path / "held-state", tmp_path / "refuted-state"
    with Netns("held") as held_ns, Netns("refuted") as refuted_ns, \
            Stack(8200, 8300, 8201, 8301, timeout_ms=30, netns=held_ns), \
            Stack(8200, 8300, 8201, 8301, timeout_ms=None, netns=refuted_ns):
        results = run_as_written_side_by_side({
            "held": (held_ns, tmp_path / "held", ["--config", str(config), "--state-dir", str(held_state)]),
            "refuted": (refuted_ns, tmp_path / "refuted", ["--environment", "paper-trading", "--state-dir",
                                                            str(refuted_state), "--no-publish"]),
        })
        held_residue, refuted_residue = residue(held_state, held_ns), residue(refuted_state, refuted_ns)
    assert_held_with_timeouts(results["held"], held_state, dataset)
    assert_refuted_without_timeout(results["refuted"])
    assert held_residue == [] and refuted_residue == []


def assert_held_with_timeouts(result: subprocess.CompletedProcess, state: Path, dataset: Path) -> None:
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads(result.stdout)
    out = Path(data["bundle"])
    checks = {check["name"]: check for check in data["checks"]}
    assert data["verdict"] == "held"
    assert checks["fault_bit[0]"]["classification"] == "pass"
    assert 475 <= checks["fault_bit[0]"]["details"]["measured"] <= 525   # the added delay, measured
    assert checks["control_unaffected"]["classification"] == "pass"
    assert checks["control_unaffected"]["gate"]["metrics"] == {"turns.latency_ns": "pass", "turns.error_rate": "pass"}
    assert checks["expect[0]"]["details"]["seen_after_s"] <= 5
    assert checks["steady_state.during"]["classification"] == "pass"
    assert data["recovery_s"] is not None and data["recovery_s"] <= 8

    turns = pq.read_table(out / "turns.parquet").to_pylist()
    seen = {(row["group"], row["phase"]) for row in turns}
    assert seen == {(g, p) for g in ("experiment", "control") for p in ("before", "fault", "after")}
    fault = pq.read_table(out / "chaos_faults.parquet").to_pylist()[0]
    active_s = (fault["removed_at"] - fault["applied_at"]).total_seconds()
    assert 9.9 <= active_s <= 10.5 and fault["removed_by"] == "runner" and fault["proof_bit"]
    assert pq.read_table(out / "findings.parquet").column("severity").to_pylist() == ["info"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["chaos"]["verdict"] == "held" and "journal.jsonl" in manifest["extras"]
    journal_events = [json.loads(line)["event"] for line in (out / "journal.jsonl").read_text().splitlines()]
    assert "fault_applied" in journal_events, journal_events  # the run's own records, copied whole
    assert data["report"] == str(out / "report.html") and "held" in (out / "report.html").read_text()
    _report_loads_and_shows_the_fault(out, fault, state)
    runs = ds.dataset(dataset / "table=chaos_runs", format="parquet", partitioning="hive").to_table().to_pylist()
    assert [row["verdict"] for row in runs if row["run_id"] == data["run_id"]] == ["held"]
    assert {row["verdict"] for row in runs} <= {"held", "not-steady"}
    decisions = pq.read_table(state / "decisions").to_pylist()
    assert {row["context"].rsplit(" ", 1)[-1] for row in decisions} >= {"control_unaffected"}


def assert_refuted_without_timeout(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    data = json.loads(result.stdout)
    out = Path(data["bundle"])
    checks = {check["name"]: check["classification"] for check in data["checks"]}
    assert data["verdict"] == "refuted"
    assert checks["steady_state.during"] == "fail" and checks["expect[0]"] == "fail"
    assert checks["control_unaffected"] == "pass" and checks["fault_bit[0]"] == "pass"
    findings = pq.read_table(out / "findings.parquet").to_pylist()
    critical = [row for row in findings if row["severity"] == "critical"]
    assert critical and "no timeout" in critical[0]["message"] and "127.0.0.1:8300" in critical[0]["message"]
    assert "timeout" in critical[0]["recommendation"]


# --- safety ----------------------------------------------------------------------------------------
def _report_loads_and_shows_the_fault(bundle: Path, fault: dict, scratch: Path) -> None:
    """The chaos run's report.html in Chromium: no console error, not blank, the fault's row as
    chaos_faults.parquet holds it."""
    from tests.report_browser import check_page, chromium_missing_reason

    if chromium_missing_reason():
        pytest.skip(chromium_missing_reason())  # after every other check of the run
    cells = check_page(bundle / "report.html", scratch)
    assert cells["chaos_faults:0:removed_by"] == fault["removed_by"]
    assert cells["chaos_faults:0:kind"] == fault["kind"]


def test_a_safeguard_aborts_at_once(tmp_path):
    ports = free_ports(4)
    experiment = short_experiment(tmp_path / "e.toml", ports, before_s=1, duration_s=8, extra="""
[[abort]]
metric = "p99_ms"
above = 100
window_s = 1
""")
    state = tmp_path / "state"
    with Stack(*ports, timeout_ms=None):
        result = agent("chaos", "run", str(experiment), "--json", "--environment", "paper-trading",
                       "--state-dir", str(state), "--no-publish", "--no-html")
    assert result.returncode == 1, result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert data["verdict"] == "aborted" and data["aborted_by"] == "safeguard"
    assert "p99_ms > 100" in data["reason"]
    fault = data["faults"][0]
    assert fault["removed_by"] == "safeguard" and fault["remove_ms"] < 100
    removed = [r for r in journal_records(state) if r["event"] == "fault_removed"][0]
    applied = [r for r in journal_records(state) if r["event"] == "fault_applied"][0]
    assert removed["ts"] - applied["ts"] < 3.0      # first evaluation after 1 s, 300 ms requests
    assert residue(state) == []


def abort_mid_fault(tmp_path: Path, how: str, ports: list[int]) -> None:
    """One run aborted in its fault phase, by `chaos abort` or by the kill-switch file."""
    experiment = short_experiment(tmp_path / f"e-{how}.toml", ports, before_s=1, duration_s=30)
    state = tmp_path / how
    process = start_agent("chaos", "run", str(experiment), "--json", "--environment", "paper-trading",
                          "--state-dir", str(state), "--no-publish", "--no-html")
    try:
        wait_for_event(state, "fault_applied")
        status = json.loads(agent("chaos", "status", "--json", "--state-dir", str(state)).stdout)
        assert status["run"]["status"] == "running" and status["run"]["phase"] == "fault"
        assert [f["kind"] for f in status["active_faults"]] == ["latency"]
        if how == "abort":
            result = agent("chaos", "abort", "--state-dir", str(state))
            assert result.returncode == 0, result.stderr
            decided = wait_for_event(state, "abort_requested")["ts"]
        else:
            decided = time.time()
            (state / "kill-switch").touch()
        # The exit waits for the bundle and report.html (slow on a busy host); the budget
        # under test is the removal's, asserted from the journal below.
        stdout, _ = process.communicate(timeout=90)
        removed = wait_for_event(state, "fault_removed")
        assert removed["ts"] - decided < 0.3, f"{how}: the fault outlived the abort decision by >300 ms"
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    data = json.loads(stdout)
    assert process.returncode == 1 and data["verdict"] == "aborted", how
    assert data["aborted_by"] == ("signal" if how == "abort" else "kill-switch")
    assert residue(state) == [], how
    after = json.loads(agent("chaos", "status", "--json", "--state-dir", str(state)).stdout)
    assert after["active_faults"] == [] and after["run"]["verdict"] == "aborted", how


def test_status_abort_and_the_kill_switch(tmp_path, resilient):
    """The two ways to stop a run side by side (one wall time): `chaos abort` on the shared
    stack, the kill-switch on a stack of its own (free ports, so their faults never overlap)."""
    from concurrent.futures import ThreadPoolExecutor

    own = Stack(*free_ports(4), timeout_ms=30)
    try:
        with resilient, ThreadPoolExecutor(2) as pool:
            own.start()
            cases = [pool.submit(abort_mid_fault, tmp_path, "abort", resilient.ports),
                     pool.submit(abort_mid_fault, tmp_path, "kill-switch", list(own.ports.values()))]
            for case in cases:
                case.result()
    finally:
        own.stop()


KILL_POINTS = ("chaos:before", "chaos:applying:0", "chaos:applied:0", "chaos:removed:0", "chaos:after")


def killed_run(tmp_path: Path, kill_at: str, ports: list[int]) -> dict:
    """One agent SIGKILLed at `kill_at`; the residue is watched from the moment it died."""
    experiment = short_experiment(tmp_path / f"{kill_at.replace(':', '_')}.toml", ports, before_s=1, duration_s=1,
                                  after_s=1)
    for attempt in range(2):
        state = tmp_path / f"state-{kill_at.replace(':', '_')}-{attempt}"
        process = start_agent("chaos", "run", str(experiment), "--environment", "paper-trading",
                              "--state-dir", str(state), "--no-publish", env={"GUARDIAN_AGENT_TEST_KILL_AT": kill_at})
        process.communicate(timeout=90)
        # A run that was not steady injects nothing and never reaches the later kill points: a
        # precondition on this busy host, not the outcome under test; run again once (and said).
        if process.returncode == 1 and any(r.get("verdict") == "not-steady" for r in journal_records(state)):
            print(f"{kill_at}: not-steady, running again")
            continue
        break
    left, elapsed = wait_no_residue(state, within_s=2.0) if process.returncode == -signal.SIGKILL else (["?"], 0.0)
    status = agent("chaos", "status", "--json", "--state-dir", str(state))
    return {"returncode": process.returncode, "left": left, "elapsed": elapsed, "state": state,
            "status": json.loads(status.stdout or "{}")}


def test_sigkill_of_the_agent_at_every_phase_leaves_nothing_within_2_s(tmp_path):
    """Every kill point at once, each agent on a stack of its own (free ports), each watched by
    its own thread from the moment its agent died: five runs in the wall time of one."""
    from concurrent.futures import ThreadPoolExecutor

    stacks = [Stack(*free_ports(4), timeout_ms=30) for _ in KILL_POINTS]
    try:
        with ThreadPoolExecutor(len(stacks)) as pool:
            list(pool.map(Stack.start, stacks))
            runs = dict(zip(KILL_POINTS, pool.map(lambda pair: killed_run(tmp_path, *pair),
                                                  [(k, list(s.ports.values())) for k, s in zip(KILL_POINTS, stacks)])))
    finally:
        for stack in stacks:
            stack.stop()
    for kill_at, run in runs.items():
        assert run["returncode"] == -signal.SIGKILL, kill_at
        assert run["left"] == [], f"{kill_at}: still present {run['elapsed']:.2f} s after the SIGKILL: {run['left']}"
        events = [r["event"] for r in journal_records(run["state"])]
        if "fault_applying" in events:
            assert our_object_names(run["state"]), f"{kill_at}: the undo record names the fault's objects"
        # the next chaos command finds nothing left to sweep, and the run is closed in the journal
        assert run["status"]["active_faults"] == [] and run["status"]["swept"] == 0, kill_at
        assert run["status"]["run"]["verdict"] == "aborted", kill_at
    assert "fault_applying" in [r["event"] for r in journal_records(runs["chaos:applying:0"]["state"])]


def test_sigkill_while_a_process_is_frozen_the_watchdog_thaws_it(tmp_path, resilient):
    """pause is not kernel-owned (a freezer cgroup outlives its creator): the journal + watchdog
    path, with the exchange frozen when the agent dies."""
    import http.client

    ports = resilient.ports
    state = tmp_path / "state"
    with resilient as stack:
        exchange_pid = stack.pids[0]
        experiment = short_experiment(tmp_path / "e.toml", ports, before_s=1, duration_s=5)
        experiment.write_text(experiment.read_text().replace(
            f'kind = "latency"\ntarget = "127.0.0.1:{ports[1]}"\ndelay_ms = 300',
            f'kind = "pause"\npid = {exchange_pid}'))
        process = start_agent("chaos", "run", str(experiment), "--environment", "paper-trading",
                              "--state-dir", str(state), "--no-publish",
                              env={"GUARDIAN_AGENT_TEST_KILL_AT": "chaos:applied:0"})
        process.communicate(timeout=60)
        assert process.returncode == -signal.SIGKILL
        assert our_object_names(state), "the pause fault's freezer cgroup is in its undo record"
        left, elapsed = wait_no_residue(state, within_s=2.0)
        assert left == [], f"still present {elapsed:.2f} s after the SIGKILL: {left}"
        removed = [r for r in journal_records(state) if r["event"] == "fault_removed"]
        assert [r["by"] for r in removed] == ["watchdog"]
        connection = http.client.HTTPConnection("127.0.0.1", ports[1], timeout=2)
        connection.request("GET", "/quote")
        assert connection.getresponse().status == 200      # thawed: it answers again


def test_plan_resolves_and_evaluates_without_injecting(tmp_path, resilient):
    ports = resilient.ports
    experiment = short_experiment(tmp_path / "e.toml", ports, extra="""
[[abort]]
metric = "control_error_rate_pct"
above = 5
""")
    state = tmp_path / "state"
    with resilient:
        result = agent("chaos", "plan", str(experiment), "--json", "--state-dir", str(state))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    fault = data["faults"][0]
    assert fault["target"] == f"127.0.0.1:{ports[1]}" and fault["backend"] and fault["undo"]
    assert data["refused"] and "no environment marker" in data["refused"]
    assert data["evaluation"]["steady_state"]["experiment"]["classification"] == "pass"
    assert data["evaluation"]["safeguards"][0]["would_abort"] is False
    # the objects the plan names (its undo says which nft table) were never created
    named = set(re.findall(rf"{OBJECT_PREFIX}\w+", fault["undo"]))
    assert named
    ruleset = subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout
    assert [name for name in named if name in ruleset] == []
    assert not (state / "journal.jsonl").exists()
