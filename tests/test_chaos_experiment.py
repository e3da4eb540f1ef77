"""Chaos experiments: validation before anything runs, the environment refusal, and the verdict
rules (recorded samples; no faults are injected here)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from agent.chaos.checks import Check, recovery_check, tolerance_check, verdict_of
from agent.chaos.experiment import check_environment, load_experiment, parse_experiment
from agent.rollout.collector import Sample
from core.errors import BadInput

AS_WRITTEN = Path(__file__).parent / "fixtures" / "chaos" / "exchange-slow.toml"


def document(**changes) -> dict:
    data = tomllib.loads(AS_WRITTEN.read_text())
    for dotted, value in changes.items():
        *parents, key = dotted.split("__")
        table = data
        for parent in parents:
            table = table[parent] if not parent.isdigit() else table[int(parent)]
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value
    return data


def error_of(data: dict) -> str:
    with pytest.raises(BadInput) as caught:
        parse_experiment(data, Path("x.toml"))
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_the_issue_experiment_loads_as_written():
    experiment = load_experiment(AS_WRITTEN)
    assert experiment.environment == "paper-trading"
    steady = experiment.steady_state
    assert (steady.url, steady.control_url) == ("http://127.0.0.1:8200/order", "http://127.0.0.1:8201/order")
    assert (steady.rate_per_s, steady.before_s, steady.after_s) == (40, 8, 8)
    assert steady.ok_status == (200, 503) and steady.max_p99_ms == 50 and steady.max_error_rate_pct == 1
    assert [(f.kind, f.spec["target"], f.spec["delay_ms"], f.duration_s) for f in experiment.faults] == \
        [("latency", "127.0.0.1:8300", 500, 10)]
    assert experiment.expects[0].contains == "paused" and experiment.expects[0].within_s == 5
    assert experiment.safeguards[0].describe() == "control_error_rate_pct > 5"
    assert experiment.planned_s == 26


@pytest.mark.parametrize("changes, expected", [
    ({"titel": "x"}, "x.toml: titel: unknown key"),
    ({"steady_state__rate_per_s": 0}, "x.toml: steady_state.rate_per_s: expected a number in 1..1000"),
    ({"steady_state__url": "ftp://h/x"}, "x.toml: steady_state.url: expected an http://"),
    ({"steady_state__url": "http://me:secret@h/x"}, "x.toml: steady_state.url: credentials do not belong"),
    ({"steady_state__max_p99_ms": None}, "x.toml: steady_state.max_p99_ms: missing required key"),
    ({"steady_state__ok_status": [200, 999]}, "x.toml: steady_state.ok_status: expected HTTP statuses"),
    ({"steady_state__windows_s": 3}, "x.toml: steady_state.windows_s: unknown key"),
    ({"fault__0__kind": "meteor"}, "x.toml: fault[0].kind: unknown fault kind 'meteor'"),
    ({"fault__0__delay_ms": "slow"}, "x.toml: fault[0].delay_ms"),
    ({"fault__0__duration_s": None}, "x.toml: fault[0].duration_s"),
    ({"fault__0__colour": 1}, "x.toml: fault[0].colour: unknown key"),
    ({"expect__0__within_s": 30}, "x.toml: expect[0].within_s: is longer than the fault phase (10 s)"),
    ({"expect__0__contains": None}, "x.toml: expect[0].contains: missing required key"),
    ({"abort__0__metric": "mood"}, "x.toml: abort[0].metric: expected one of"),
    ({"abort__0__below": 1}, "x.toml: abort[0]: give exactly one of above or below"),
    ({"steady_state__control_url": None}, "x.toml: abort[0].metric: control_error_rate_pct needs steady_state.control_url"),
    ({"gate": {"confidence": 2}}, "x.toml: gate.confidence"),
    ({"fault": []}, "x.toml: fault: expected at least one table"),
])
def test_a_bad_key_is_one_line_naming_it(changes, expected):
    assert error_of(document(**changes)).startswith(expected)


def test_the_environment_marker_is_required_and_must_match():
    experiment = load_experiment(AS_WRITTEN)
    check_environment(experiment, "paper-trading", "--environment")
    with pytest.raises(BadInput, match="refused: .*carries no environment marker"):
        check_environment(experiment, None, "config")
    with pytest.raises(BadInput, match="refused: .*this host is 'production'"):
        check_environment(experiment, "production", "config /etc/guardian-agent/config.toml")


def samples(latencies_ms, start_ns=0, step_ms=25.0, status=200, error=False, stage=2):
    return [Sample("experiment", stage, int(start_ns + i * step_ms * 1e6), int(value * 1e6), status, error, 60, 20)
            for i, value in enumerate(latencies_ms)]


def test_recovery_is_the_first_point_after_which_the_steady_state_holds():
    steady = load_experiment(AS_WRITTEN).steady_state
    slow = samples([400.0] * 40)                                  # 1 s still slow after the removal
    fast = samples([1.0] * 120, start_ns=1_000_000_000)           # then 3 s steady
    check, recovery_s = recovery_check(slow + fast, 0, steady)
    assert check.classification == "pass"
    assert 0.9 <= recovery_s <= 1.05
    check, recovery_s = recovery_check(samples([400.0] * 200), 0, steady)
    assert check.classification == "fail" and recovery_s is None


def test_tolerances_count_statuses_outside_ok_status_as_errors():
    steady = load_experiment(AS_WRITTEN).steady_state
    assert tolerance_check("s", samples([1.0] * 100), steady).classification == "pass"
    broken = samples([1.0] * 95) + samples([1.0] * 5, error=True)
    check = tolerance_check("s", broken, steady)
    assert check.classification == "fail" and "error rate 5.00% > 1%" in check.reason
    assert tolerance_check("s", samples([1.0] * 3), steady).classification == "inconclusive"


@pytest.mark.parametrize("checks, aborted, verdict", [
    ([Check("steady_state.before", "fail", "slow"), Check("recovery", "pass", "")], "", "not-steady"),
    ([Check("steady_state.before", "pass", ""), Check("fault_bit[0]", "fail", "no delay")], "", "invalid"),
    ([Check("steady_state.before", "pass", ""), Check("fault_bit[0]", "pass", ""),
      Check("control_unaffected", "inconclusive", "wide")], "", "invalid"),
    ([Check("steady_state.before", "pass", ""), Check("fault_bit[0]", "pass", ""),
      Check("expect[0]", "fail", "never paused")], "", "refuted"),
    ([Check("steady_state.before", "pass", ""), Check("fault_bit[0]", "pass", ""),
      Check("experiment_vs_control", "inconclusive", "")], "", "held"),
    ([Check("steady_state.before", "pass", ""), Check("steady_state.during", "fail", "")], "safeguard", "aborted"),
])
def test_verdict_precedence(checks, aborted, verdict):
    assert verdict_of(checks, aborted)[0] == verdict


def test_bad_file_on_the_command_line_exits_2_with_one_line_and_injects_nothing(cli_runner, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(AS_WRITTEN.read_text().replace("delay_ms = 500", "delay_ms = -5"))
    state = tmp_path / "state"
    result = cli_runner.invoke(["chaos", "run", str(bad), "--environment", "paper-trading", "--state-dir", str(state)])
    assert result.exit_code == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "fault[0].delay_ms" in lines[0] and "Traceback" not in result.stderr
    assert not (state / "journal.jsonl").exists()


def test_a_target_that_does_not_resolve_is_bad_input(cli_runner, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(AS_WRITTEN.read_text().replace('target = "127.0.0.1:8300"', 'target = "no-such-host.invalid:8300"'))
    state = tmp_path / "state"
    result = cli_runner.invoke(["chaos", "run", str(bad), "--environment", "paper-trading", "--state-dir", str(state)])
    assert result.exit_code == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "target" in result.stderr
    assert not (state / "journal.jsonl").exists()


def test_refused_without_the_marker_or_with_another_one(cli_runner, tmp_path):
    state = tmp_path / "state"
    config = tmp_path / "config.toml"
    config.write_text('environment = "production"\n')
    result = cli_runner.invoke(["chaos", "run", str(AS_WRITTEN), "--config", str(config), "--state-dir", str(state)])
    assert result.exit_code == 2 and "refused" in result.stderr and "'production'" in result.stderr
    missing = tmp_path / "empty.toml"
    missing.write_text("")
    result = cli_runner.invoke(["chaos", "run", str(AS_WRITTEN), "--config", str(missing), "--state-dir", str(state)])
    assert result.exit_code == 2 and "no environment marker" in result.stderr
    assert not state.exists() or not (state / "journal.jsonl").exists()


def test_the_kill_switch_refuses_new_runs(cli_runner, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "kill-switch").touch()
    result = cli_runner.invoke(["chaos", "run", str(AS_WRITTEN), "--environment", "paper-trading", "--state-dir", str(state)])
    assert result.exit_code == 2 and "kill switch" in result.stderr
    assert not (state / "journal.jsonl").exists()


def test_doctor_lists_every_kind_with_its_backend(cli_runner, monkeypatch):
    import json

    from agent.chaos.faults import REGISTRY

    monkeypatch.setenv("GUARDIAN_AGENT_CHAOS_DIR", "/nonexistent-chaos-dir")
    result = cli_runner.invoke(["chaos", "doctor", "--json"])
    assert result.exit_code == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [row["kind"] for row in rows] == [injector.kind for injector in REGISTRY]
    for row in rows:
        assert row["status"] in ("available", "unavailable")
        assert row["backend"] or row["reason"]


def test_config_accepts_the_environment_marker():
    from agent.config import parse_config

    assert parse_config('environment = "paper-trading"\n').environment == "paper-trading"
    with pytest.raises(BadInput, match="environment"):
        parse_config("environment = 3\n")


def test_run_after_promotion_reports_a_refusal_and_rollout_findings_name_it(tmp_path):
    from agent.chaos.session import rollout_findings, run_after_promotion

    empty = tmp_path / "config.toml"
    empty.write_text("")
    results = run_after_promotion([AS_WRITTEN], state_dir=tmp_path / "state", config_path=empty)
    assert [r["verdict"] for r in results] == ["invalid"] and "no environment marker" in results[0]["reason"]
    rows = rollout_findings(results + [{"experiment": "b.toml", "verdict": "refuted", "reason": "no timeout",
                                        "bundle": "/x"}, {"experiment": "c.toml", "verdict": "held"}])
    assert [(r["subject"], r["severity"]) for r in rows] == [(str(AS_WRITTEN), "warning"), ("b.toml", "critical")]
    assert "no timeout" in rows[1]["message"] and "/x" in rows[1]["message"]
