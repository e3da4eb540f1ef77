"""The daemon: rolling windows into the dataset, its CPU budget, RSS limit and SIGTERM."""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pytest

from agent.daemon import Daemon, budget_pause_s, process_cpu_s
from agent.fleet.query import run_query
from probes.base import ProbeBase, rows_to_table
from tests.conftest import PROJECT_ROOT, syscall_load
from tests.test_fleet import LoadavgProbe, make_config

BURN_SCHEMA = pa.schema([("spins", pa.int64())])


class BurnProbe(ProbeBase):
    """Burns a fixed 0.15 s of its own CPU per window (whatever the machine's load): a probe far
    over a 20% budget for a 0.2 s window."""

    name = "burn"
    schema = BURN_SCHEMA
    finish_grace_s = 10.0
    burn_cpu_s = 0.15

    def collect(self, window):
        spins, started = 0, time.thread_time()
        while time.thread_time() - started < self.burn_cpu_s:
            spins += 1
        window.wait()
        return {"burn": rows_to_table([{"spins": spins}], BURN_SCHEMA)}


def test_budget_pause_brings_the_average_back_to_the_budget():
    history = collections.deque([(0.003, 1.0), (0.002, 1.0)])
    assert budget_pause_s(history, 0.5) == 0.0  # 0.25% < 0.5%
    history.append((0.5, 1.0))  # one expensive window (a BPF compile)
    pause = budget_pause_s(history, 0.5)
    cpu = sum(c for c, _ in history)
    assert cpu / (3.0 + pause) == pytest.approx(0.005)


def test_daemon_writes_rolling_windows_and_keeps_rolling_probes_attached(tmp_path):
    root = tmp_path / "dataset"
    config = make_config(root)
    config.daemon.window_s = 0.3
    config.daemon.cpu_budget_pct = 100.0  # this test is about windows, not the budget
    LoadavgProbe.prepared = 0
    daemon = Daemon(config, (LoadavgProbe,), max_windows=3)
    assert daemon.run() == 0
    assert LoadavgProbe.prepared == 1, "a rolling probe is prepared once, not once per window"
    _, rows = run_query(str(root), "SELECT count(DISTINCT run_id), count(*) FROM loadavg")
    assert rows[0][0] == 3 and rows[0][1] >= 3
    state = json.loads((root / "_spool" / "daemon-state.json").read_text())
    assert state["windows"] == 3 and state["uploaded_runs"] == 3 and state["pending_runs"] == 0
    assert 0 < state["rss_bytes"] <= state["rss_peak_bytes"]
    assert state["probes"]["loadavg"]["ok"] == 3


def test_daemon_enforces_its_cpu_budget_by_pausing(tmp_path):
    config = make_config(tmp_path / "dataset", probes=("burn",))
    config.daemon.window_s = 0.2
    config.daemon.cpu_budget_pct = 20.0
    logged = []
    daemon = Daemon(config, (BurnProbe,), log=logged.append, max_windows=2)
    daemon.run()
    state = daemon.state
    # Each window burns >= 0.15 s of CPU; at 20% that needs >= 0.75 s of wall per window. On an
    # idle machine a window takes ~0.3 s, so the daemon must pause; on a loaded one the window
    # may already be slow enough. Either way the whole run ends up at the budget.
    assert state["cpu_s_total"] >= 2 * BurnProbe.burn_cpu_s, state
    if state["cpu_pct_last_window"] > 20.0:
        assert state["paused_s_total"] > 0, state
        assert any("over the CPU budget" in line for line in logged)
    assert state["cpu_pct_avg"] <= 20.0 * 1.25, state


def test_daemon_exits_for_a_restart_past_its_rss_limit(tmp_path):
    config = make_config(tmp_path / "dataset")
    config.daemon.window_s = 0.2
    config.daemon.rss_limit_mb = 1  # any Python process is over 1 MB
    config.daemon.cpu_budget_pct = 100.0
    logged = []
    assert Daemon(config, (LoadavgProbe,), log=logged.append, max_windows=5).run() == 1
    assert any("over the 1 MB limit" in line for line in logged)


@pytest.mark.live
def test_sigterm_ends_the_window_publishes_it_and_exits_zero(tmp_path):
    root = tmp_path / "dataset"
    config = tmp_path / "config.toml"
    config.write_text('[daemon]\nprobes = ["host"]\nwindow_s = 60\n')
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    process = subprocess.Popen([sys.executable, "-m", "agent.cli", "daemon", "--config", str(config),
                                "--dataset", str(root)], cwd=PROJECT_ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (root / "_spool" / "entries").is_dir():
            time.sleep(0.2)
        time.sleep(1.0)
        process.send_signal(signal.SIGTERM)
        stopped_at = time.monotonic()
        _, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, stderr
    assert time.monotonic() - stopped_at < 20
    assert "daemon stopped after 1 window(s)" in stderr
    _, rows = run_query(str(root), "SELECT probe, count(*) FROM runs GROUP BY probe")
    assert rows == [("host", 1)]
    manifest = json.loads(next((root / "manifests").rglob("*.json")).read_text())
    assert manifest["interrupted"] is True


PID_SCHEMA = pa.schema([("collector_pid", pa.int64())])


class PidProbe(ProbeBase):
    """Records which process collected the window."""

    name = "whoami"
    schema = PID_SCHEMA
    finish_grace_s = 5.0

    def collect(self, window):
        window.wait()
        return {"whoami": rows_to_table([{"collector_pid": os.getpid()}], PID_SCHEMA)}


def test_non_rolling_windows_run_in_a_child_that_returns_its_memory(tmp_path):
    root = tmp_path / "dataset"
    config = make_config(root, probes=("whoami",))
    config.daemon.window_s = 0.2
    config.daemon.cpu_budget_pct = 100.0
    daemon = Daemon(config, (PidProbe,), max_windows=2)
    assert daemon.run() == 0
    _, rows = run_query(str(root), "SELECT DISTINCT collector_pid FROM whoami")
    pids = {row[0] for row in rows}
    assert len(pids) == 2 and os.getpid() not in pids, "one fresh child per window"
    assert daemon.state["window_rss_peak_bytes"] > 0
    assert daemon.state["uploaded_runs"] == 2 and daemon.state["probes"]["whoami"]["ok"] == 2


@pytest.mark.live
@pytest.mark.timeout(180)
def test_rolling_ebpf_probes_compile_once_and_stay_attached_across_windows(tmp_path, monkeypatch):
    """The default daemon's eBPF probes are rolling: the first window compiles both programs,
    later windows only read the maps (their CPU is a small fraction of the first's)."""
    import probes.bpf
    import probes.syscalls
    import probes.tcp
    from probes.syscalls import SyscallsProbe
    from probes.tcp import TcpProbe

    compiled = []
    real_compile = probes.bpf.compile_program

    def counting_compile(source):
        compiled.append(len(source))
        return real_compile(source)

    monkeypatch.setattr(probes.bpf, "compile_program", counting_compile)
    monkeypatch.setattr(probes.syscalls, "compile_program", counting_compile)
    monkeypatch.setattr(probes.tcp, "compile_program", counting_compile)
    root = tmp_path / "dataset"
    config = make_config(root, probes=("syscalls", "tcp"))
    config.daemon.window_s = 1.0
    config.daemon.cpu_budget_pct = 100.0
    daemon = Daemon(config, (SyscallsProbe, TcpProbe), max_windows=3)
    window_cpu_s = []
    original = daemon._window_in_process

    def timed_window(probe_classes):
        started = process_cpu_s()
        result = original(probe_classes)
        window_cpu_s.append(process_cpu_s() - started)
        return result

    daemon._window_in_process = timed_window
    with syscall_load() as load_pid:
        assert daemon.run() == 0
    assert len(compiled) == 2, "one compile per probe for the daemon's life, not one per window"
    assert daemon.state["probes"]["syscalls"]["ok"] == 3 and daemon.state["probes"]["tcp"]["ok"] == 3
    assert daemon.probes.kept == {}, "detached at exit"
    assert len(window_cpu_s) == 3 and max(window_cpu_s[1:]) < 0.5 * window_cpu_s[0], window_cpu_s
    _, rows = run_query(str(root), f"SELECT count(DISTINCT run_id) FROM syscalls WHERE pid = {load_pid}")
    assert rows[0][0] == 3, "the load's calls in every window"
