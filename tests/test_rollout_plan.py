"""Rollout plans are validated before any step runs; the journal, the command adapter, Ctrl-C,
status and abort; shadow replay of a pcap's requests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from core.errors import BadInput, WorkFailed
from agent.rollout.journal import Journal, last_run
from agent.rollout.plan import ShadowSettings, load_plan
from agent.rollout.shadow import pcap_requests, shadow_compare, split_requests

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def write_plan(tmp_path: Path, body: str | None = None, **replace: str) -> Path:
    weights_file = tmp_path / "weights.txt"
    marker = tmp_path / "prepared"
    text = body or textwrap.dedent(f"""\
        name = "unit"
        state_dir = "{tmp_path / 'state'}"
        evaluate_every_s = 0.2
        [prepare]
        commands = ["touch {marker}"]
        [validate]
        commands = ["true"]
        [traffic]
        adapter = "command"
        set_weights = "sh -c 'echo $0 $1 > {weights_file}' {{blue}} {{green}}"
        [kpi]
        url = "http://127.0.0.1:9/"
        concurrency = 1
        baseline_s = 1
        [[stage]]
        weight_pct = 10
        dwell_s = 30
        [[stage]]
        weight_pct = 100
        dwell_s = 30
        """)
    for old, new in replace.items():
        text = text.replace(old.replace("__", " "), new)
    path = tmp_path / "rollout.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("old,new,message", [
    ('adapter = "command"', 'adapter = "nginx"', "traffic.adapter: unknown adapter 'nginx'"),
    ("weight_pct = 100", "weight_pct = 5", "stage[1].weight_pct: weights must increase"),
    ('[prepare]\ncommands = ["touch', '[prepare]\nhooks = ["touch', "prepare.hooks: unknown key"),
    ('[validate]\ncommands = ["true"]\n', "", ": validate: missing"),
    ("{blue}", "{b}", "traffic.set_weights: must contain"),
    ("dwell_s = 30\n[[stage]]", "[[stage]]", "stage[0].dwell_s: missing"),
    ('url = "http://127.0.0.1:9/"', 'url = "ftp://x/"', "kpi.url"),
    ('url = "http://127.0.0.1:9/"', 'source = "statsd"', "kpi.source: unknown source 'statsd'"),
    ('url = "http://127.0.0.1:9/"', 'source = "haproxy-log"\nlisten = "5140"', "kpi.listen: expected HOST:PORT"),
])
def test_bad_plans_name_the_key(tmp_path, old, new, message):
    text = write_plan(tmp_path).read_text()
    assert old in text
    (tmp_path / "rollout.toml").write_text(text.replace(old, new))
    with pytest.raises(BadInput, match=message.replace("[", r"\[").replace("]", r"\]").replace("{", r"\{").replace("}", r"\}")):
        load_plan(tmp_path / "rollout.toml")


def test_bad_plan_is_rejected_before_any_step_runs(tmp_path, agent_cli):
    plan = write_plan(tmp_path)
    plan.write_text(plan.read_text().replace("weight_pct = 100", "weight_pct = 10"))
    result = agent_cli("rollout", "--plan", str(plan))
    assert result.returncode == 2
    assert "stage[1].weight_pct" in result.stderr and result.stderr.count("\n") == 1
    assert not (tmp_path / "prepared").exists() and not (tmp_path / "weights.txt").exists()
    assert not (tmp_path / "state").exists()


def test_check_only_validates(tmp_path, agent_cli):
    result = agent_cli("rollout", "run", "--plan", str(write_plan(tmp_path)), "--check")
    assert result.returncode == 0 and "10% → 100%" in result.stdout


def test_failed_prepare_hook_ends_on_blue(tmp_path, agent_cli):
    plan = write_plan(tmp_path)
    plan.write_text(plan.read_text().replace('commands = ["touch', 'commands = ["false", "touch'))
    result = agent_cli("rollout", "--plan", str(plan), timeout=60)
    assert result.returncode == 1, result.stderr
    assert (tmp_path / "weights.txt").read_text().split() == ["100", "0"]
    assert not (tmp_path / "prepared").exists()
    state = last_run(tmp_path / "state" / "unit.journal.jsonl")
    assert state.status == "failed" and "prepare hook 1 failed" in state.terminal["reason"]


def stacks_bundle(path: Path, stacks: dict[str, int]) -> Path:
    import pyarrow as pa

    from reports.bundle import BundleWriter, ProbeRecord

    writer = BundleWriter(path)
    writer.write_table("stacks", pa.table({"stack": list(stacks), "samples": list(stacks.values()),
                                           "thread": ["main"] * len(stacks)}), probe="stacks")
    writer.add_probe(ProbeRecord("stacks", "ok"))
    writer.finish()
    return path


@pytest.mark.live
def test_ctrl_c_mid_stage_rolls_back_and_status_abort_work(tmp_path, agent_cli):
    plan = write_plan(tmp_path)
    blue = stacks_bundle(tmp_path / "blue-stacks", {"main;loop;decode": 80, "main;loop;send": 20})
    green = stacks_bundle(tmp_path / "green-stacks", {"main;loop;decode": 40, "main;loop;send;retry": 60})
    plan.write_text(plan.read_text() + f'[postmortem]\nblue_stacks = "{blue}"\ngreen_stacks = "{green}"\n')
    weights = tmp_path / "weights.txt"
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    driver = subprocess.Popen([sys.executable, "-m", "agent.cli", "rollout", "--plan", str(plan)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=PROJECT_ROOT)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if weights.exists() and weights.read_text().split() == ["90", "10"]:
                break
            time.sleep(0.05)
        assert weights.read_text().split() == ["90", "10"]
        running = agent_cli("rollout", "status", "--plan", str(plan), "--json")
        assert json.loads(running.stdout)["status"] == "running"
        assert json.loads(running.stdout)["stage"] == 1
        driver.send_signal(signal.SIGINT)
        out, err = driver.communicate(timeout=20)
    finally:
        if driver.poll() is None:
            driver.kill()
    assert driver.returncode == 1, err
    assert weights.read_text().split() == ["100", "0"]
    status = json.loads(agent_cli("rollout", "status", "--plan", str(plan), "--json").stdout)
    assert status["status"] == "rolled_back" and "SIGINT" in status["reason"]
    from reports.bundle import Bundle

    postmortem = Bundle(Path(out.split("report: ")[1].split()[0]))
    assert postmortem.manifest["extras"] == ["stacks.diff.svg"]
    assert "retry" in (postmortem.path / "stacks.diff.svg").read_text()

    # abort works from the journal alone, even with the plan file gone.
    weights.write_text("0 100\n")
    plan.unlink()
    aborted = agent_cli("rollout", "abort", "--journal", str(tmp_path / "state" / "unit.journal.jsonl"))
    assert aborted.returncode == 0, aborted.stderr
    assert weights.read_text().split() == ["100", "0"]


def test_journal_survives_a_torn_last_line(tmp_path):
    journal = Journal(tmp_path / "j.jsonl")
    journal.append("start", run_id="r1", pid=999999999, traffic={})
    journal.append("stage_started", run_id="r1", stage=0, weight_pct=10, weights={"blue": 90, "green": 10})
    with open(tmp_path / "j.jsonl", "a") as handle:
        handle.write('{"ts": 1, "event": "deci')
    state = last_run(tmp_path / "j.jsonl")
    assert state.status == "interrupted" and state.weights == {"blue": 90, "green": 10}


def test_haproxy_log_line_parsing():
    from agent.rollout.collector import parse_log_line

    assert parse_log_line("<134>guardian-kpi app green 3 200 78 41") == ("app", "green", 3, 200, 78, 41)
    assert parse_log_line("guardian-kpi app <NOSRV> -1 503 78 0")[1:4] == ("<NOSRV>", -1, 503)
    assert parse_log_line("some other line") is None
    assert parse_log_line("guardian-kpi app green x 200 1 1") is None


def test_split_requests_from_a_stream():
    stream = (b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n"
              b"POST /order HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello"
              b"GET /c HTTP/1.1\r\nHost: x\r\n\r\n")
    requests = split_requests(stream)
    assert [(r.method, r.target, r.body) for r in requests] == [("GET", "/a", b""), ("POST", "/order", b"hello"),
                                                               ("GET", "/c", b"")]


@pytest.mark.live
def test_shadow_replays_pcap_requests_against_blue_and_green(tmp_path):
    from scapy.all import IP, TCP, Raw, wrpcap

    sys.path.insert(0, str(PROJECT_ROOT / "tests"))
    from test_rollout_live import free_ports, wait_for_port

    packets = []
    for flow in range(3):
        seq = 1000
        for index in range(10):
            payload = f"GET /q/{flow}/{index} HTTP/1.1\r\nHost: app\r\n\r\n".encode()
            packets.append(IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000 + flow, dport=8080, seq=seq,
                                                                    flags="PA") / Raw(payload))
            packets.append(IP(src="10.0.0.2", dst="10.0.0.1") / TCP(sport=8080, dport=40000 + flow, flags="PA")
                           / Raw(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))
            seq += len(payload)
    pcap = tmp_path / "capture.pcap"
    wrpcap(str(pcap), packets)
    assert len(pcap_requests(pcap, 8080)) == 30

    blue_port, green_port, other_port = free_ports(3)
    processes = [subprocess.Popen([sys.executable, str(PROJECT_ROOT / "tests" / "test_rollout_live.py"), "serve",
                                   str(port), name, "1", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for port, name in ((blue_port, "same"), (green_port, "same"), (other_port, "different"))]
    try:
        for port in (blue_port, green_port, other_port):
            wait_for_port(port)
        same = shadow_compare(ShadowSettings(pcap, f"http://127.0.0.1:{blue_port}/",
                                             f"http://127.0.0.1:{green_port}/", 8080))
        assert same["requests"] == 30 and same["mismatches"] == 0 and same["latency_verdict"] != "fail"
        differ = shadow_compare(ShadowSettings(pcap, f"http://127.0.0.1:{blue_port}/",
                                               f"http://127.0.0.1:{other_port}/", 8080))
        assert differ["mismatch_pct"] == 100.0
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=5)


def _driver(tmp_path, text_changes: dict | None = None, adapter=None):
    from agent.rollout.driver import RolloutDriver

    tmp_path.mkdir(parents=True, exist_ok=True)
    plan = write_plan(tmp_path)
    for old, new in (text_changes or {}).items():
        plan.write_text(plan.read_text().replace(old, new))
    driver = RolloutDriver(load_plan(plan), adapter=adapter)
    driver.run_id = "r1"
    driver.plan.state_dir.mkdir(parents=True)
    driver.journal.append("start", run_id="r1", pid=os.getpid(), traffic=driver.plan.traffic.as_dict())
    return driver


def _look(stage_index: int, elapsed_s: float, gate_verdict: str, metrics: list[tuple[str, bool, str, int]]):
    from agent.gate.verdict import GateVerdict, MetricVerdict
    from agent.rollout.driver import Evaluation

    verdicts = [MetricVerdict(metric=name, kind="shift", unit="ns", critical=critical, threshold_pct=5,
                              direction="increase", classification=classification, reason="",
                              baseline_count=500, candidate_count=green)
                for name, critical, classification, green in metrics]
    return Evaluation(stage_index, elapsed_s, GateVerdict(gate_verdict, float("nan"), "undecided", verdicts),
                      "blue in this stage")


@pytest.mark.parametrize("policy,metrics,expected", [
    # A failing non-critical metric is not hidden by an inconclusive critical one, even with advance.
    ("advance", [("turns.latency_ns", True, "inconclusive", 50), ("turns.latency_ns.p99", False, "fail", 50)],
     "turns.latency_ns.p99 failed"),
    # No green sample at all is no evidence, whatever on_inconclusive says.
    ("advance", [("turns.latency_ns", True, "skipped", 0)], "no green samples"),
    # The default holds, then rolls back.
    ("rollback", [("turns.latency_ns", True, "inconclusive", 50)], "still inconclusive"),
])
def test_undecided_stage_at_max_dwell(tmp_path, policy, metrics, expected):
    from agent.rollout.driver import Looks

    driver = _driver(tmp_path, {"evaluate_every_s = 0.2": f'evaluate_every_s = 0.2\non_inconclusive = "{policy}"'})
    stage = driver.plan.stages[0]
    assert driver._judge_look(_look(0, stage.max_dwell_s - 1, "inconclusive", metrics), stage, Looks(), False) \
        is None
    decision, reason = driver._judge_look(_look(0, stage.max_dwell_s, "inconclusive", metrics), stage, Looks(),
                                          False)
    assert decision == "rollback" and expected in reason


def test_advance_when_asked_and_pause_for_a_person(tmp_path):
    from agent.rollout.driver import Looks

    metrics = [("turns.latency_ns", True, "inconclusive", 50)]
    advance = _driver(tmp_path / "a", {"evaluate_every_s = 0.2": 'evaluate_every_s = 0.2\non_inconclusive = "advance"'})
    stage = advance.plan.stages[0]
    assert advance._judge_look(_look(0, stage.max_dwell_s, "inconclusive", metrics), stage, Looks(), False)[0] \
        == "advance"
    pause = _driver(tmp_path / "p", {"evaluate_every_s = 0.2": 'evaluate_every_s = 0.2\non_inconclusive = "pause"'})
    assert pause._judge_look(_look(0, stage.max_dwell_s, "inconclusive", metrics), stage, Looks(), False) is None
    assert pause.paused and last_run(pause.plan.journal_path).last["event"] == "paused"


def test_failed_looks_limit(tmp_path):
    from agent.rollout.driver import Looks

    driver = _driver(tmp_path, {"evaluate_every_s = 0.2": "evaluate_every_s = 0.2\nmax_failed_looks = 2"})
    stage, looks = driver.plan.stages[0], Looks()
    metrics = [("turns.latency_ns", True, "fail", 50)]
    assert driver._judge_look(_look(0, 1, "fail", metrics), stage, looks, False) is None
    assert driver._judge_look(_look(0, 2, "fail", metrics), stage, looks, False)[0] == "rollback"


def test_inconclusive_looks_limit_acts_before_max_dwell(tmp_path):
    from agent.rollout.driver import Looks

    driver = _driver(tmp_path, {"evaluate_every_s = 0.2": "evaluate_every_s = 0.2\nmax_inconclusive_looks = 2"})
    stage, looks = driver.plan.stages[0], Looks()
    metrics = [("turns.latency_ns", True, "inconclusive", 50)]
    assert driver._judge_look(_look(0, 1, "inconclusive", metrics), stage, looks, False) is None
    decision, reason = driver._judge_look(_look(0, 2, "inconclusive", metrics), stage, looks, False)
    assert decision == "rollback" and "2 undecided looks" in reason and 2 < stage.max_dwell_s


def test_adapter_error_during_rollback_still_writes_a_postmortem(tmp_path):
    from agent.rollout.adapters import TrafficAdapter
    from agent.rollout.collector import LoadCollector
    from reports.bundle import Bundle

    class Broken(TrafficAdapter):
        def check(self):
            return []

        def set_weights(self, blue_pct, green_pct):
            raise WorkFailed("balancer socket gone")

    driver = _driver(tmp_path, adapter=Broken())
    driver.collector = LoadCollector(driver.plan.kpi, "blue", "green")
    with pytest.raises(WorkFailed, match="the watchdog will retry; post-mortem"):
        driver.rollback("gate failed", 0)
    state = last_run(driver.plan.journal_path)
    assert state.terminal is None and state.last["event"] == "rollback_error"  # the watchdog keeps trying
    postmortem = next(driver.plan.state_dir.glob("*-postmortem"))
    assert Bundle(postmortem).manifest["rollout"]["status"] == "rollback_failed"


def test_watchdog_record_says_the_driver_is_gone(tmp_path):
    from agent.rollout.driver import restore_blue_from_journal

    driver = _driver(tmp_path)
    # Our own pid is alive, as a dying driver's still is for a moment: the watchdog knows better.
    record = restore_blue_from_journal(driver.plan.journal_path, "driver died", "rolled_back", driver_alive=False)
    assert record["driver_alive"] is False
    assert (tmp_path / "weights.txt").read_text().split() == ["100", "0"]


def test_traffic_share_checks():
    from agent.rollout.collector import Sample
    from agent.rollout.driver import traffic_share_problem

    def samples(green: int, blue: int) -> list[Sample]:
        return [Sample("green", 0, 0, 1, 200, False, 0, 0)] * green + [Sample("blue", 0, 0, 1, 200, False, 0, 0)] * blue

    # The restart: given 10%, green took 1.3%.
    assert "green took 1.3%" in traffic_share_problem(samples(13, 987), 0, 0, 10, 1.0)
    assert traffic_share_problem(samples(620, 380), 0, 0, 50, 1.0) == ""  # bursty round robin, not a fault
    assert "could not be attributed" in traffic_share_problem(samples(100, 900), 50, 0, 10, 1.0)
    assert traffic_share_problem(samples(1, 20), 5, 0, 10, 1.0) == ""  # too few to tell


def test_fractional_weight_is_fine_for_a_command_adapter_but_not_haproxy(tmp_path):
    plan = write_plan(tmp_path, **{"weight_pct = 10\n": "weight_pct = 0.5\n"})
    assert load_plan(plan).stages[0].weight_pct == 0.5
    text = plan.read_text().replace('adapter = "command"', 'adapter = "haproxy"\nsocket = "/x"\nbackend = "b"')
    text = text.replace("set_weights = ", "# set_weights = ")
    plan.write_text(text)
    with pytest.raises(BadInput, match=r"stage\[0\].weight_pct: 0.5 cannot be set on HAProxy"):
        load_plan(plan)


def test_gate_names_a_failing_non_critical_metric_while_a_critical_one_is_undecided():
    import numpy as np

    from agent.gate.config import GateSettings
    from agent.gate.kpi import MetricData
    from agent.gate.verdict import judge

    generator = np.random.default_rng(7)
    blue = generator.exponential(1.0, 400) + 1.0
    verdict = judge([MetricData("turns.error_rate", "proportion", "fraction", (0, 30), (0, 30)),
                     MetricData("syscalls.read.latency_ns", "shift", "ns", blue, blue * 3.0)], GateSettings())
    assert verdict.verdict == "inconclusive"
    assert "failed already: syscalls.read.latency_ns" in verdict.reason
