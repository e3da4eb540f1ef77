"""Rollouts that cannot cause the outage they exist to prevent, live: a real HAProxy
2.6 with `option httpchk`, two real services, and the users' own traffic (ClientLoad) through the
frontend counting every non-2xx answer and connection error, independently of the driver."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_rollout_live import ClientLoad, journal_events, lb  # noqa: F401 - lb is the fixture

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ADVANCE = 'on_inconclusive = "advance"'


def start_driver(plan: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    return subprocess.Popen([sys.executable, "-m", "agent.cli", "rollout", *args, "--plan", str(plan)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=PROJECT_ROOT)


def wait_until(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def finish(driver: subprocess.Popen, timeout_s: float = 60) -> tuple[int, str, str]:
    try:
        out, err = driver.communicate(timeout=timeout_s)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    return driver.returncode, out, err


@pytest.mark.live
def test_a_down_green_is_never_given_traffic_even_with_advance(lb, agent_cli):
    # The outage: /health answers 503, HAProxy marks green DOWN, and on_inconclusive =
    # "advance" used to walk it to 100%. The validate hook does not look at /health here: the
    # balancer's own health state is what must stop the rollout.
    lb.start(green_sick=True)
    time.sleep(0.5)  # two failed checks at 100 ms
    plan = lb.plan([(10, 0.5, 1), (100, 0.5, 1)], extra=ADVANCE, validate="true")
    with ClientLoad(lb.frontend) as users:
        result = agent_cli("rollout", "--plan", str(plan), timeout=60)
    assert result.returncode == 1, result.stderr + result.stdout
    assert "green (green) is DOWN" in result.stdout and "never given traffic" in result.stdout
    assert users.errors == 0 and users.served.get("green", 0) == 0 and users.served["blue"] > 50, users.__dict__
    assert lb.weight("green") == 0 and lb.weight("blue") == 100
    events = journal_events(lb)
    assert "promoted" not in [e["event"] for e in events] and events[-1]["event"] == "failed"
    assert not [e for e in events if e["event"] == "stage_started"]


@pytest.mark.live
def test_green_going_down_mid_stage_rolls_back_without_client_errors(lb, agent_cli):
    lb.start()
    plan = lb.plan([(50, 30, 60), (100, 30, 60)], extra=ADVANCE)
    with ClientLoad(lb.frontend) as users:
        driver = start_driver(plan)
        wait_until(lambda: lb.weight("green") == 50, 30, "the 50% stage")
        time.sleep(0.5)
        lb.sick("green")
        code, out, err = finish(driver)
    assert code == 1, err + out
    assert "green is DOWN in the balancer" in out, out
    assert users.errors == 0 and users.served.get("green", 0) > 0, users.__dict__
    assert lb.weight("green") == 0 and lb.weight("blue") == 100


@pytest.mark.live
def test_green_going_down_while_it_serves_alone_is_rolled_back_at_once(lb, agent_cli):
    # At 100% blue has weight 0: HAProxy has nothing to fall back on, so a DOWN green is an
    # outage until blue's weight is back. The stage's guard reads green's state every 50 ms.
    lb.start()
    plan = lb.plan([(100, 30, 60)], extra="crossover_s = 0")
    with ClientLoad(lb.frontend) as users:
        driver = start_driver(plan)
        wait_until(lambda: lb.weight("green") == 100, 30, "the 100% stage")
        time.sleep(0.3)
        served_before = sum(users.served.values())
        lb.sick("green")
        sick_at = time.time()
        code, out, err = finish(driver)
    assert code == 1, err + out
    # Seen at the first failed check ("UP 1/2": HAProxy still routes to it) or once DOWN.
    assert re.search(r"green serving alone: green \(green\) is (UP 1/2|DOWN) in the balancer", out), out
    rolled_back = [e for e in journal_events(lb) if e["event"] == "rolled_back"][-1]
    # A failed check takes up to 100 ms + the 1 s check timeout; the guard acts within 50 ms of it
    # (the reason says it was the guard, not a look).
    assert "the guard put blue back" in out, out
    assert rolled_back["ts"] - sick_at < 3.0, rolled_back
    assert lb.weight("green") == 0 and lb.weight("blue") == 100
    # Without the guard (only the loop watching) 150-236 user requests failed in the benchmark; with
    # it, none.
    assert served_before > 50 and users.errors < 0.05 * served_before, users.__dict__


@pytest.mark.live
def test_a_balancer_restart_mid_stage_is_detected_and_never_promoted(lb, agent_cli):
    lb.start()
    # advance on undecided stages, as in the issue: the restart must be caught all the same.
    plan = lb.plan([(10, 30, 60), (100, 1, 2)], extra=ADVANCE)
    driver = start_driver(plan)
    wait_until(lambda: lb.weight("green") == 10, 30, "the 10% stage")
    time.sleep(0.5)
    lb.restart_haproxy()  # comes back with the config file's weights: blue 100, green 0
    code, out, err = finish(driver)
    assert code == 1, err + out
    # Seen during the restart (socket gone) or after it (new pid, the config file's weights).
    assert any(sign in out for sign in ("the balancer restarted", "the balancer says blue 100 / green 0",
                                        "balancer unreadable")), out
    events = [e["event"] for e in journal_events(lb)]
    assert "promoted" not in events and events[-1] == "rolled_back"
    assert lb.weight("green") == 0


@pytest.mark.live
def test_a_balancer_reload_in_the_crossover_stage_is_detected(lb, agent_cli):
    # The 100% stage rewrites the weights every 0.25 s window: a reload between two looks must be
    # seen at the next write's read-back, not papered over by it (same weights, new instance).
    lb.start()
    plan = lb.plan([(50, 1, 10), (100, 30, 60)], extra="")
    driver = start_driver(plan)
    journal = lb.dir / "state" / "test-green.journal.jsonl"

    def crossover_flips() -> int:
        return journal.exists() and sum("crossover" in str(e.get("reason")) for e in journal_events(lb)
                                        if e["event"] == "weights")

    wait_until(lambda: driver.poll() is not None or crossover_flips() >= 2, 40, "the 100% stage's crossover")
    assert driver.poll() is None, driver.communicate()
    lb.reload_haproxy()  # seamless: the admin socket never goes away, the config file's weights return
    code, out, err = finish(driver)
    assert code == 1, err + out
    assert "the balancer restarted" in out, out
    events = [e["event"] for e in journal_events(lb)]
    assert "promoted" not in events and events[-1] == "rolled_back"
    assert lb.weight("green") == 0 and lb.weight("blue") == 100


@pytest.mark.live
def test_when_the_rollback_itself_fails_a_postmortem_is_written_and_the_watchdog_restores_blue(lb, agent_cli):
    lb.start()
    plan = lb.plan([(10, 30, 60), (100, 30, 60)])
    driver = start_driver(plan)
    wait_until(lambda: lb.weight("green") == 10, 30, "the 10% stage")
    lb.haproxy.kill()  # the balancer is gone: the next look cannot read it, the rollback cannot write
    lb.haproxy.wait(timeout=5)
    journal = lb.dir / "state" / "test-green.journal.jsonl"
    wait_until(lambda: any(e["event"] == "rollback_error" for e in journal_events(lb)), 20, "the failed rollback")
    # It comes back with a split in its config file: blue must be restored by the watchdog.
    lb.processes.remove(lb.haproxy)
    lb.green_weight = 10
    lb.start_haproxy()
    code, out, err = finish(driver)
    assert code == 1, err + out
    assert "the watchdog will retry; post-mortem" in err, err
    assert err.strip().splitlines()[-1].startswith("guardian-agent: rollback to blue failed"), err
    wait_until(lambda: journal_events(lb)[-1]["event"] == "rolled_back", 10, "the watchdog's record")
    record = journal_events(lb)[-1]
    assert record["driver_alive"] is False and "the driver's own rollback failed" in record["reason"], record
    assert "died" not in record["reason"]
    assert lb.weight("green") == 0 and lb.weight("blue") == 100
    from reports.bundle import Bundle

    postmortem = Bundle(next((lb.dir / "state").glob("*-postmortem")))
    assert postmortem.manifest["rollout"]["status"] == "rollback_failed"
    assert postmortem.table("turns").num_rows > 0
    status = agent_cli("rollout", "status", "--journal", str(journal))
    assert status.returncode == 0 and "rolled_back" in status.stdout, status.stdout


def test_fractional_weights_are_refused_at_check(lb, agent_cli):
    plan = lb.plan([(0.4, 1, 2), (100, 1, 2)])
    result = agent_cli("rollout", "--plan", str(plan), "--check")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "stage[0].weight_pct: 0.4 cannot be set on HAProxy" in result.stderr


@pytest.mark.live
def test_check_connects_to_the_balancer(lb, agent_cli):
    lb.start()
    good = agent_cli("rollout", "--plan", str(lb.plan([(10, 1, 2), (100, 1, 2)])), "--check")
    assert good.returncode == 0, good.stderr
    assert "green green UP weight 0" in good.stdout and "blue blue UP weight 100" in good.stdout
    text = lb.plan([(10, 1, 2), (100, 1, 2)]).read_text()
    for old, new in (('backend = "app"', 'backend = "nope"'), ('backend = "app"', 'backend = "app"\ngreen = "nope"'),
                     (f'socket = "{lb.socket}"', f'socket = "{lb.dir / "nope.sock"}"')):
        (lb.dir / "wrong.toml").write_text(text.replace(old, new))
        refused = agent_cli("rollout", "--plan", str(lb.dir / "wrong.toml"), "--check")
        assert refused.returncode == 2 and "nope" in refused.stderr and refused.stderr.count("\n") == 1, \
            (new, refused.stderr)


@pytest.mark.live
def test_an_identical_green_is_promoted_with_the_default_settings(lb, agent_cli):
    # The plan's gate settings are the defaults (gate=""), on_inconclusive is the default (hold,
    # then roll back). Only the dwell times are short: they are settings.
    lb.start()
    plan = lb.plan([(50, 3, 25), (100, 4, 25)], extra="", gate="", baseline_s=1)
    with ClientLoad(lb.frontend) as users:
        result = agent_cli("rollout", "--plan", str(plan), timeout=90)
    assert result.returncode == 0, result.stderr + result.stdout
    assert users.errors == 0, users.__dict__
    decisions = [e for e in journal_events(lb) if e["event"] == "decision"]
    assert [d["verdict"] for d in decisions] == ["pass", "pass"], decisions
    assert decisions[-1]["baseline_scope"] == "blue in this stage's crossover windows"


@pytest.mark.live
def test_killing_driver_and_watchdog_together_leaves_a_status_that_says_what_to_run(lb, agent_cli):
    lb.start()
    plan = lb.plan([(10, 30, 60), (100, 30, 60)], extra=ADVANCE)
    driver = start_driver(plan)
    try:
        wait_until(lambda: lb.weight("green") == 10, 30, "the 10% stage")
        watchdog_pid = next(e["watchdog_pid"] for e in journal_events(lb) if e["event"] == "watchdog")
        os.kill(watchdog_pid, signal.SIGKILL)
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=5)
    finally:
        if driver.poll() is None:
            driver.kill()
    time.sleep(0.5)
    assert lb.weight("green") == 10  # nobody is left to restore blue
    journal = lb.dir / "state" / "test-green.journal.jsonl"
    status = agent_cli("rollout", "status", "--plan", str(plan))
    assert status.returncode == 1, status.stdout + status.stderr
    assert f"rollout abort --journal {journal}" in status.stdout, status.stdout
    assert "balancer now: blue 90 UP, green 10 UP" in status.stdout
    assert agent_cli("rollout", "abort", "--journal", str(journal)).returncode == 0
    assert lb.weight("green") == 0 and lb.weight("blue") == 100
    after = agent_cli("rollout", "status", "--plan", str(plan), "--json")
    assert after.returncode == 0 and json.loads(after.stdout)["status"] == "aborted"
