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

from core.errors import BadInput
from agent.rollout.journal import Journal, last_run
from agent.rollout.plan import load_plan
from agent.rollout.shadow import split_requests

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
    ('[validate]\ncommands = ["true"]\n', "", "plan.validate: missing"),
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

    from agent.rollout.plan import ShadowSettings
    from agent.rollout.shadow import pcap_requests, shadow_compare

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
