"""Chaos experiments after a rollout's promotion: the plan's [after_promotion] table is
validated with the plan (a missing or bad experiment is one line, exit 2, before any hook or
weight moves), and a refuted hypothesis lands in the rollout's bundle, JSON and exit code while
the promotion stands. The live test runs the real HAProxy rollout stack of test_rollout_live.py
with a short experiment on the paper-trading stack (tests/paper_trading.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from core.errors import BadInput
from agent.rollout.plan import load_plan
from tests.paper_trading import Stack
from tests.test_chaos_live import residue, short_experiment
from tests.test_rollout_live import free_ports, lb  # noqa: F401 - lb is the HAProxy stack fixture
from tests.test_rollout_plan import write_plan


def after_promotion(tmp_path: Path, body: str) -> Path:
    plan = write_plan(tmp_path)
    plan.write_text(plan.read_text() + "[after_promotion]\n" + body)
    return plan


def test_after_promotion_experiments_are_validated_with_the_plan(tmp_path, cli_runner):
    (tmp_path / "chaos").mkdir()
    experiment = short_experiment(tmp_path / "chaos" / "slow.toml", [9001, 9002, 9003, 9004])
    plan = load_plan(after_promotion(tmp_path, 'experiments = ["chaos/slow.toml"]\nenvironment = "paper-trading"\n'
                                               'state_dir = "chaos-state"\n'))
    assert plan.after_promotion.experiments == [experiment]          # relative to the plan file
    assert plan.after_promotion.state_dir == tmp_path / "chaos-state"
    bad = tmp_path / "chaos" / "bad.toml"
    bad.write_text(experiment.read_text().replace("delay_ms = 300", "delay_ms = -1"))
    cases = {
        'experiments = ["chaos/missing.toml"]\nenvironment = "paper-trading"\n':
            "after_promotion.experiments: [0] " + str(tmp_path / "chaos" / "missing.toml") + " does not exist",
        'experiments = ["chaos/slow.toml", "chaos/bad.toml"]\nenvironment = "paper-trading"\n':
            "after_promotion.experiments: [1] ",
        'experiments = ["chaos/slow.toml"]\nenvironment = "production"\n': "refused",
        'experiments = []\n': "after_promotion.experiments: empty",
        'experiments = ["chaos/slow.toml"]\nrun_at = 3\n': "after_promotion.run_at: unknown key",
    }
    for body, message in cases.items():
        with pytest.raises(BadInput) as raised:
            load_plan(after_promotion(tmp_path, body))
        assert message in str(raised.value), (body, str(raised.value))
    assert "fault[0].delay_ms" in str(pytest.raises(BadInput, load_plan, after_promotion(
        tmp_path, 'experiments = ["chaos/bad.toml"]\nenvironment = "paper-trading"\n')).value)
    # The CLI: one line on stderr, exit 2, and the prepare hook never ran.
    result = cli_runner.invoke(["rollout", "--plan", str(after_promotion(tmp_path, 'experiments = ["chaos/missing.toml"]\n'))])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "missing.toml does not exist" in result.stderr and not (tmp_path / "prepared").exists()


PROMOTING_GATE = """\
[gate]
min_samples = 30
[metrics."turns.latency_ns"]
threshold_pct = 1000
[metrics."turns.latency_ns.p99"]
threshold_pct = 10000
[metrics."turns.error_rate"]
threshold_pct = 5.0
"""


@pytest.mark.live
def test_a_refuted_experiment_after_promotion_is_in_the_rollout_bundle_and_exit_code(lb, tmp_path, agent_cli):  # noqa: F811
    ports = free_ports(4)
    # The strategy has no timeout on its exchange calls: the experiment must be refuted.
    # 4 s of fault: the proof alone takes ~3 s (3 batches of 3 exchanges 300 ms slower each).
    experiment = short_experiment(tmp_path / "slow.toml", ports, before_s=1, duration_s=4, after_s=1)
    # Without the control group: 3 s of it cannot show "control unaffected" (the gate needs ~3,000
    # requests a side for the error rate), which would make the run invalid, not refuted.
    experiment.write_text("\n".join(line for line in experiment.read_text().splitlines()
                                    if not line.startswith("control_url")))
    config = tmp_path / "agent.toml"
    config.write_text(f'environment = "paper-trading"\n[dataset]\nroot = "{tmp_path / "dataset"}"\n')
    chaos_state = tmp_path / "chaos-state"
    tables = (f'[after_promotion]\nexperiments = ["slow.toml"]\nconfig = "agent.toml"\n'
              f'state_dir = "{chaos_state}"')
    lb.start(green_delay_ms=1.0)
    # The rollout itself is not under test: one 100% stage and a gate that only an outage
    # fails, so that a p99 blip of this shared host does not roll back before the experiment.
    plan = lb.plan([(100, 1, 5)], extra="crossover_s = 0", tables=tables, baseline_s=1, gate=PROMOTING_GATE)
    with Stack(*ports, timeout_ms=None):
        result = agent_cli("rollout", "--plan", str(plan), "--json", timeout=120)
    green_weight = lb.weight("green")
    assert result.returncode == 1, result.stderr + result.stdout
    data = json.loads(result.stdout)
    assert data["status"] == "promoted" and data["promotion_stands"] and green_weight == 100, result.stderr
    assert data["chaos_refuted"] and [r["verdict"] for r in data["after_promotion"]] == ["refuted"], \
        [(r["verdict"], r["reason"]) for r in data["after_promotion"]]
    chaos_bundle = Path(data["after_promotion"][0]["bundle"])
    assert (chaos_bundle / "manifest.json").exists() and residue(chaos_state) == []
    report = Path(data["report"])
    rows = pq.read_table(report / "chaos_after_promotion.parquet").to_pylist()
    assert [(r["experiment"], r["verdict"], r["bundle"]) for r in rows] == [(str(experiment), "refuted",
                                                                            str(chaos_bundle))]
    assert "steady_state.during" in rows[0]["checks_failed"]
    findings = pq.read_table(report / "findings.parquet").to_pylist()
    assert [(f["probe"], f["severity"]) for f in findings] == [("rollout", "warning"), ("chaos", "critical")]
    assert "promotion stands" in findings[0]["message"] and str(chaos_bundle) in findings[1]["message"]
    manifest = json.loads((report / "manifest.json").read_text())
    assert manifest["rollout"]["after_promotion"][0]["verdict"] == "refuted"
    assert "chaos experiment" in (report / "report.html").read_text() and data["html"]
    events = [json.loads(line)["event"] for line in (tmp_path / "state" / "test-green.journal.jsonl").read_text()
              .splitlines()]
    assert events.index("promoted") < events.index("after_promotion") and events[-1] == "roles"
