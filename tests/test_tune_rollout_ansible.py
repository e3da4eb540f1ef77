"""The fleet rollout of tuning (packaging/ansible/tune-rollout.yml) run for real by ansible-core.

Each "host" of the inventory is a fake /proc + /sys tree (the `Host` seam: `tune --root`) with its
own tune state directory and its own service: a TCP ping-pong server on loopback that a client
keeps busy (tests/ping_pong_host.py, a process per host). The KPI is the playbook's default,
`audit --probes capture` of that service's traffic (real tcpdump, real request -> response
turns), judged by the real gate.

Three fleets run side by side (one wall-clock cost):
- "pass": tuning changes nothing the services touch -> every stage passes and all four hosts end
  up tuned, stage by stage (1 host, then 1, then the last 2, which have no untuned control left
  and are judged against themselves before tuning).
- "canary": the canary's service really slows down once its tree is tuned (it reads the tuned
  vm.swappiness on every request) -> the gate fails the first stage, the canary is rolled back,
  the play stops, and every tree is byte-identical to before.
- "second" (tune_rollout_rollback_earlier=true): the canary passes and stays tuned, the second
  stage's host slows down once tuned (judged against itself before) -> that stage fails, is
  rolled back, and so is the canary of the earlier stage: every tree byte-identical again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import PROJECT_ROOT, VENV_BIN
from tests.test_ansible import ansible_playbook
from tests.test_tuning_fake_tree import FAKE, snapshot

PLAYBOOK = PROJECT_ROOT / "packaging" / "ansible" / "tune-rollout.yml"
HOSTS = 4
# The services run SCHED_FIFO (tests/ping_pong_host.py), yet on this shared 2-core host other
# engineers' real-time meters (oslat, cyclictest) starve them now and then: two identical services
# were measured up to +250% apart at the median. The gate's threshold is set above that noise and
# the slowed canary is 20x slower, far above the threshold; the tail is left to the median's
# verdict (non-critical, wide), since one starved millisecond is a whole p99 at these counts.
# Load adds the same milliseconds to both delays: at 10x, 2.5 ms of added delay already brought
# +900% under the 400% threshold (a CI run with CPU hogs beside it); at 20x it takes 7.5 ms.
BASE_DELAY_S = 0.002
SLOW_DELAY_S = 0.040
GATE_TOML = """
[metrics."turns.latency_ns"]
threshold_pct = 400
critical = true
[metrics."turns.latency_ns.p99"]
threshold_pct = 2000
"""
TUNED_SWAPPINESS = b"10\n"  # what trading-latency sets (fixture: 60)
WINDOW_S = 1.5
PLAY_TIMEOUT_S = 300  # each playbook; the services outlive it, then end by themselves
SERVICE = Path(__file__).resolve().parent / "ping_pong_host.py"


def start_service(root: Path, slow: bool) -> tuple[subprocess.Popen, int]:
    command = [sys.executable, str(SERVICE), "--root", str(root), "--delay-s", str(BASE_DELAY_S),
               "--lifetime-s", str(PLAY_TIMEOUT_S + 60)]
    if slow:
        command += ["--slow-when-tuned", str(SLOW_DELAY_S)]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    return process, int(process.stdout.readline())


def stop_service(process: subprocess.Popen) -> None:
    process.stdin.close()  # it ends by itself; by pid if it does not
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def make_fleet(base: Path, name: str, size: int, slow_index: int | None, services: list):
    hosts = {}
    for index in range(1, size + 1):
        root = base / name / f"root{index}"
        shutil.copytree(FAKE, root, symlinks=True)
        process, port = start_service(root, index == slow_index)
        services.append(process)
        hosts[f"{name}{index}"] = {
            "ansible_connection": "local", "ansible_python_interpreter": "/usr/bin/python3",
            "tune_rollout_root": str(root), "tune_rollout_state_dir": str(base / name / f"state{index}"),
            "tune_rollout_kpi_iface": "lo", "tune_rollout_kpi_filter": f"tcp port {port}",
        }
    inventory = base / name / "inventory.json"
    inventory.write_text(json.dumps({"trading": {"hosts": hosts}}))
    return inventory, hosts


def start_playbook(base: Path, name: str, inventory: Path, extra: dict) -> subprocess.Popen:
    gate_config = base / name / "gate.toml"
    gate_config.write_text(GATE_TOML)
    variables = {"tune_rollout_profile": "trading-latency", "tune_rollout_window_s": WINDOW_S,
                 "tune_rollout_gate_config": str(gate_config),
                 "tune_rollout_remote_dir": str(base / name / "remote"),
                 "tune_rollout_controller_dir": str(base / name / "controller"), **extra}
    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_RETRY_FILES_ENABLED="0", ANSIBLE_PIPELINING="1",
               ANSIBLE_HOST_KEY_CHECKING="0", ANSIBLE_FORKS="8",
               ANSIBLE_LOCAL_TEMP=str(base / name / "ansible-tmp"), ANSIBLE_ASYNC_DIR=str(base / name / "async"),
               ANSIBLE_REMOTE_TEMP=str(base / name / "ansible-remote"), ANSIBLE_LOG_PATH=str(base / name / "timed.log"),
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=str(PROJECT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    log = open(base / name / "ansible.log", "w")
    return subprocess.Popen([ansible_playbook(), "-i", str(inventory), str(PLAYBOOK), "-e", json.dumps(variables)],
                            stdout=log, stderr=subprocess.STDOUT, text=True, env=env, cwd=base / name)


def recap(output: str) -> dict[str, dict[str, int]]:
    import re

    rows = {}
    for line in output.split("PLAY RECAP", 1)[-1].splitlines():
        match = re.match(r"(\S+)\s*:\s*(.*)", line.strip())
        if match:
            rows[match.group(1)] = {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", match.group(2))}
    return rows


def decisions(controller: Path) -> list[dict]:
    return pq.read_table(controller / "decisions").to_pylist() if (controller / "decisions").exists() else []


# name -> (hosts, the host whose service slows down once tuned, extra playbook variables)
# (the failing fleets need only one host past the failing stage to show it was never touched)
FLEETS = {"pass": (HOSTS, None, {}),
          "canary": (2, 1, {}),
          "second": (2, 2, {"tune_rollout_rollback_earlier": True})}


def critical_verdicts(base: Path, name: str) -> list[dict]:
    return [row for row in decisions(base / name / "controller") if row["metric"] == "turns.latency_ns"]


def assert_untouched(hosts: dict, before: dict) -> None:
    for host, variables in hosts.items():
        assert snapshot(Path(variables["tune_rollout_root"])) == before[host], f"{host} not byte-identical"
        assert not (Path(variables["tune_rollout_state_dir"]) / "journal.jsonl").exists(), host


@pytest.mark.live
def test_staged_tuning_rollout_passes_stage_by_stage_and_a_failing_stage_stops_and_rolls_back(tmp_path):
    if shutil.which("tcpdump") is None:
        pytest.fail("tcpdump missing: the rollout's default KPI captures the service's traffic (make setup)")
    fleets, services, runs = {}, [], {}
    try:
        for name, (size, slow_index, extra) in FLEETS.items():
            inventory, hosts = make_fleet(tmp_path, name, size, slow_index, services)
            fleets[name] = (hosts, {host: snapshot(Path(v["tune_rollout_root"])) for host, v in hosts.items()})
        for name, (_, _, extra) in FLEETS.items():
            runs[name] = start_playbook(tmp_path, name, tmp_path / name / "inventory.json", extra)
        deadline = time.monotonic() + PLAY_TIMEOUT_S
        for process in runs.values():
            process.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        for process in runs.values():
            if process.poll() is None:
                process.kill()
                process.wait()
        for process in services:
            stop_service(process)
    outputs = {name: (tmp_path / name / "ansible.log").read_text() for name in runs}

    # --- pass: every stage judged and passed; all four trees tuned, each journal pending
    output = outputs["pass"]
    assert runs["pass"].returncode == 0, output[-4000:]
    hosts, _ = fleets["pass"]
    assert all(row["failed"] == 0 and row["ok"] > 0 for row in recap(output).values()), output[-3000:]
    for host, variables in hosts.items():
        assert (Path(variables["tune_rollout_root"]) / "proc/sys/vm/swappiness").read_bytes() == TUNED_SWAPPINESS
        assert (Path(variables["tune_rollout_state_dir"]) / "journal.jsonl").exists(), host
    assert [row["classification"] for row in critical_verdicts(tmp_path, "pass")] == ["pass"] * HOSTS
    # the stages are Ansible's serial batches: 1 host, 10% (1 host), 50% (the last 2)
    controller = tmp_path / "pass" / "controller"
    assert sorted(path.name for path in controller.glob("stage-*")) == ["stage-0", "stage-1", "stage-2"]
    assert sorted(p.name for p in (controller / "stage-2").iterdir() if p.is_dir()) == ["pass3", "pass4"]
    assert "pass1 vs pass2:" in output and "pass3 vs itself before tuning:" in output

    # --- canary: its gate fails, it is rolled back, the play stops after the first stage
    output = outputs["canary"]
    assert runs["canary"].returncode != 0, output[-4000:]
    assert "stage stage-0 failed and was rolled back" in output and "gate: FAIL" in output
    rows = recap(output)
    assert rows["canary1"]["failed"] == 1 and set(rows) == {"canary1", "canary2"}
    hosts, before = fleets["canary"]
    assert_untouched(hosts, before)
    assert len(list((Path(hosts["canary1"]["tune_rollout_state_dir"]) / "history").iterdir())) == 1
    verdicts = critical_verdicts(tmp_path, "canary")
    assert [row["classification"] for row in verdicts] == ["fail"]
    assert verdicts[0]["effect_pct"] > 500  # ~20x slower, measured by the capture
    assert not (tmp_path / "canary" / "controller" / "stage-1").exists()

    # --- second: the canary passes, stage 2 fails; tune_rollout_rollback_earlier also undoes the canary
    output = outputs["second"]
    assert runs["second"].returncode != 0, output[-4000:]
    assert [row["classification"] for row in critical_verdicts(tmp_path, "second")] == ["pass", "fail"]
    assert "stage stage-1 failed and was rolled back" in output
    assert "Roll back the earlier stages too" in output and "second2 -> second1" in output
    hosts, before = fleets["second"]
    assert_untouched(hosts, before)  # second1 (tuned by the passed canary stage) restored too
    assert not (tmp_path / "second" / "controller" / "stage-2").exists()
