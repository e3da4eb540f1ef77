"""Live: real py-spy and perf against real child processes, through the real CLI.

Each child is bounded (it exits by itself after at most 60 s) and killed at teardown.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from reports.bundle import Bundle
from tests.conftest import PROJECT_ROOT, run_agent

pytestmark = [pytest.mark.live, pytest.mark.timeout(120)]

HOT_FUNCTION = textwrap.dedent(
    """
    import os, sys, time

    def {name}(n):
        total = 0
        for i in range(n):
            total += i * i
        return total
    """
)

HOT_SCRIPT = HOT_FUNCTION + textwrap.dedent(
    """
    deadline = time.monotonic() + float(sys.argv[1])
    print("ready", flush=True)
    while time.monotonic() < deadline:
        {name}(20000)
    """
)

# Exits one second after a `py-spy record` of it starts, so "exits mid-window" does not depend on
# how long the agent takes to start on a loaded machine.
SHORT_LIVED_SCRIPT = HOT_FUNCTION + textwrap.dedent(
    """
    def sampler_attached():
        me = str(os.getpid()).encode()
        for entry in os.listdir("/proc"):
            try:
                argv = open(f"/proc/{{entry}}/cmdline", "rb").read().split(b"\\0")
            except OSError:
                continue
            if b"record" in argv and me in argv and any(a.endswith(b"py-spy") for a in argv):
                return True
        return False

    give_up = time.monotonic() + float(sys.argv[1])
    print("ready", flush=True)
    while not sampler_attached() and time.monotonic() < give_up:
        {name}(20000)
    end = time.monotonic() + 1.0
    while time.monotonic() < end:
        {name}(20000)
    """
)


def start_hot_child(directory: Path, function: str, seconds: float, script_name: str | None = None,
                    template: str = HOT_SCRIPT) -> subprocess.Popen:
    script = directory / (script_name or f"{function}.py")
    script.write_text(template.format(name=function))
    child = subprocess.Popen([sys.executable, str(script), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


@pytest.fixture
def children():
    started: list[subprocess.Popen] = []
    yield started
    for child in started:
        child.kill()
        child.wait()


def leaf_share(bundle: Bundle, function: str) -> float:
    rows = bundle.table("stacks").select(["stack", "samples"]).to_pylist()
    total = sum(row["samples"] for row in rows)
    hits = sum(row["samples"] for row in rows if row["stack"].rsplit(";", 1)[-1].startswith(function + " "))
    return hits / total if total else 0.0


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """Two bundles recorded at the same time: one child hot in alpha (by --pid), one hot in beta
    (selected by --process NAME)."""
    work = tmp_path_factory.mktemp("stacks-runs")
    alpha = start_hot_child(work, "guardian_hot_alpha", 60)
    beta = start_hot_child(work, "guardian_hot_beta", 60, script_name="guardian_beta_worker.py")
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    runs = {
        "alpha": subprocess.Popen([sys.executable, "-m", "agent.cli", "audit", "--probes", "stacks",
                                   "--pid", str(alpha.pid), "--duration", "2", "--out", str(work / "alpha")],
                                  cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
        "beta": subprocess.Popen([sys.executable, "-m", "agent.cli", "audit", "--probes", "stacks",
                                  "--process", "guardian_beta_worker.py", "--duration", "2", "--out", str(work / "beta")],
                                 cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
    }
    outputs = {}
    try:
        for name, run in runs.items():
            stdout, stderr = run.communicate(timeout=90)
            outputs[name] = (run.returncode, stdout, stderr)
    finally:
        for child in (alpha, beta):
            child.kill()
            child.wait()
    return work, outputs


def test_hot_function_dominates_and_extras_load(two_runs):
    work, outputs = two_runs
    code, stdout, stderr = outputs["alpha"]
    assert code == 0, stderr
    bundle = Bundle(work / "alpha")
    record = bundle.probe("stacks")
    assert record["status"] == "ok", record
    assert leaf_share(bundle, "guardian_hot_alpha") >= 0.8
    table = bundle.table("stacks")
    assert set(table.column("source").to_pylist()) == {"py-spy"}
    assert set(table.column("blocking").to_pylist()) == {False}
    assert "MainThread" in table.column("thread").to_pylist()
    # About 97 samples a second for 2 s (the CPU is shared, so leave room for scheduling).
    assert 60 <= sum(table.column("samples").to_pylist()) <= 300
    svg = (work / "alpha" / "stacks.svg").read_text()
    root = ET.fromstring(svg)
    names = [g.get("data-name") for g in root.iter("{http://www.w3.org/2000/svg}g") if g.get("data-name")]
    assert any(name.startswith("guardian_hot_alpha (guardian_hot_alpha.py") for name in names)
    speedscope = json.loads((work / "alpha" / "stacks.speedscope.json").read_text())
    assert "guardian_hot_alpha" in {frame["name"] for frame in speedscope["shared"]["frames"]}
    assert sorted(bundle.manifest["extras"]) == ["stacks.speedscope.json", "stacks.svg"]
    assert "guardian_hot_alpha" in stdout  # the audit summary names the hot function


def test_process_selected_by_name(two_runs):
    work, outputs = two_runs
    code, _stdout, stderr = outputs["beta"]
    assert code == 0, stderr
    assert leaf_share(Bundle(work / "beta"), "guardian_hot_beta") >= 0.8


def test_differential_graph_shows_both_hot_functions(two_runs, tmp_path):
    work, _ = two_runs
    out = tmp_path / "diff.svg"
    result = run_agent("stacks", "diff", str(work / "alpha"), str(work / "beta"), "--out", str(out))
    assert result.returncode == 0, result.stderr
    names = {g.get("data-name") for g in ET.fromstring(out.read_text()).iter("{http://www.w3.org/2000/svg}g")}
    assert "guardian_hot_alpha (guardian_hot_alpha.py)" in names
    assert "guardian_hot_beta (guardian_beta_worker.py)" in names
    grew_section = result.stdout.split("frames that shrank")[0]
    assert "guardian_hot_beta" in grew_section and "guardian_hot_alpha" not in grew_section
    as_json = json.loads(run_agent("stacks", "diff", str(work / "alpha"), str(work / "beta"), "--out",
                                   str(out), "--json").stdout)
    assert as_json["grew"][0]["frame"].startswith("guardian_hot_beta") and as_json["grew"][0]["change_pts"] > 50


def test_process_exits_mid_window_keeps_samples(tmp_path, children):
    child = start_hot_child(tmp_path, "guardian_short_lived", 60, template=SHORT_LIVED_SCRIPT)
    children.append(child)
    started = time.monotonic()
    result = run_agent("audit", "--probes", "stacks", "--pid", str(child.pid), "--duration", "4",
                       "--out", str(tmp_path / "bundle"))
    assert result.returncode == 0, result.stderr
    bundle = Bundle(tmp_path / "bundle")
    record = bundle.probe("stacks")
    assert record["status"] == "ok"
    assert "exited" in record["reason"] and "kept the" in record["reason"], record
    assert record["tables"]["stacks"] >= 1
    assert leaf_share(bundle, "guardian_short_lived") >= 0.5
    assert time.monotonic() - started < 30


def test_idle_target_gives_an_empty_table_not_a_failure(tmp_path, children):
    child = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
                             stdout=subprocess.PIPE, text=True)
    children.append(child)
    assert child.stdout.readline().strip() == "ready"
    result = run_agent("audit", "--probes", "stacks", "--pid", str(child.pid), "--duration", "1",
                       "--out", str(tmp_path / "bundle"))
    assert result.returncode == 0, result.stderr
    bundle = Bundle(tmp_path / "bundle")
    record = bundle.probe("stacks")
    assert record["status"] == "ok" and "no samples" in record["reason"], record
    assert bundle.table("stacks").num_rows == 0
    ET.fromstring((tmp_path / "bundle" / "stacks.svg").read_text())


@pytest.mark.skipif(shutil.which("perf") is None, reason="LIVE TEST SKIPPED: perf not installed (make setup)")
def test_native_process_sampled_with_perf(tmp_path, children):
    # dd with 1-byte blocks spends its time in read/write syscalls: user and kernel frames.
    # Bounded by count (a minute or more at a few MB/s) and killed at teardown.
    child = subprocess.Popen(["dd", "if=/dev/zero", "of=/dev/null", "bs=1", "count=300000000"],
                             stderr=subprocess.DEVNULL)
    children.append(child)
    result = run_agent("audit", "--probes", "stacks", "--pid", str(child.pid), "--duration", "2",
                       "--out", str(tmp_path / "bundle"))
    assert result.returncode == 0, result.stderr
    bundle = Bundle(tmp_path / "bundle")
    assert bundle.probe("stacks")["status"] == "ok", bundle.probe("stacks")
    table = bundle.table("stacks")
    assert set(table.column("source").to_pylist()) == {"perf"}
    stacks = table.column("stack").to_pylist()
    assert any("[k]" in stack for stack in stacks), "kernel frames from the syscalls"
    assert (tmp_path / "bundle" / "stacks.svg").exists()


def test_not_python_without_perf_is_unavailable_with_reason(tmp_path, children):
    child = subprocess.Popen(["sleep", "60"])
    children.append(child)
    # No perf on PATH (py-spy is found beside the interpreter).
    result = run_agent("audit", "--probes", "stacks", "--pid", str(child.pid), "--duration", "1",
                       "--out", str(tmp_path / "bundle"), env={"PATH": str(tmp_path / "empty")})
    assert result.returncode == 1, result.stderr  # the only probe could not run: not "all clear"
    record = Bundle(tmp_path / "bundle").probe("stacks")
    assert record["status"] == "unavailable"
    assert "not a Python process" in record["reason"] and "linux-perf" in record["reason"]


def test_mixed_targets_without_perf_keep_the_python_one(tmp_path, children):
    sleeper = subprocess.Popen(["sleep", "60"])
    children.append(sleeper)
    hot = start_hot_child(tmp_path, "guardian_mixed_hot", 60)
    children.append(hot)
    result = run_agent("audit", "--probes", "stacks", "--pid", str(sleeper.pid), "--pid", str(hot.pid),
                       "--duration", "1", "--out", str(tmp_path / "bundle"), env={"PATH": str(tmp_path / "empty")})
    assert result.returncode == 0, result.stderr
    bundle = Bundle(tmp_path / "bundle")
    record = bundle.probe("stacks")
    assert record["status"] == "ok" and f"pid {sleeper.pid} (sleep) is not a Python process" in record["reason"]
    assert leaf_share(bundle, "guardian_mixed_hot") >= 0.8


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="LIVE TEST SKIPPED: setpriv missing (util-linux)")
def test_permission_denied_names_cap_sys_ptrace(tmp_path, children):
    child = start_hot_child(tmp_path, "guardian_root_owned", 30)
    children.append(child)
    # pytest's own temp root is 0700: the unprivileged agent needs a directory it can reach.
    tmp_path = Path(tempfile.mkdtemp(prefix="guardian-stacks-nobody-"))
    tmp_path.chmod(0o777)
    command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "agent.cli",
               "audit", "--probes", "stacks", "--pid", str(child.pid), "--duration", "1",
               "--out", str(tmp_path / "bundle")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=PROJECT_ROOT,
                            env=dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), HOME=str(tmp_path)))
    assert result.returncode == 1, result.stderr  # the only probe could not run: not "all clear"
    record = Bundle(tmp_path / "bundle").probe("stacks")
    assert record["status"] == "unavailable"
    assert "CAP_SYS_PTRACE" in record["reason"] and "kernel.yama.ptrace_scope" in record["reason"]
    shutil.rmtree(tmp_path)


def test_diff_bad_input_is_one_line_exit_2(tmp_path):
    (tmp_path / "not-a-bundle").mkdir()
    result = run_agent("stacks", "diff", str(tmp_path / "not-a-bundle"), str(tmp_path / "not-a-bundle"),
                       "--out", str(tmp_path / "d.svg"))
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "incomplete bundle" in result.stderr
    assert not (tmp_path / "d.svg").exists()


FAMILY_SCRIPT = textwrap.dedent(
    """
    import subprocess, sys, threading, time

    def guardian_parent_spin():
        total = 0
        for i in range(20000):
            total += i
        return total

    def guardian_idle_helper():
        while True:
            time.sleep(0.05)

    CHILD = '''
    import time
    def guardian_child_spin():
        return sum(range(20000))
    end = time.monotonic() + 60
    while time.monotonic() < end:
        guardian_child_spin()
    '''
    child = subprocess.Popen([sys.executable, "-c", CHILD])
    threading.Thread(target=guardian_idle_helper, name="idle-helper", daemon=True).start()
    print(child.pid, flush=True)
    end = time.monotonic() + 60
    try:
        while time.monotonic() < end:
            guardian_parent_spin()
    finally:
        child.kill()
    """
)


@pytest.fixture
def family(tmp_path, children):
    script = tmp_path / "guardian_family.py"
    script.write_text(FAMILY_SCRIPT)
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    children.append(parent)
    child_pid = int(parent.stdout.readline())
    yield parent.pid, child_pid
    parent.kill()
    parent.wait()
    try:
        os.kill(child_pid, 9)
    except ProcessLookupError:
        pass


def test_subprocesses_are_sampled_into_their_own_rows(tmp_path, family):
    parent_pid, child_pid = family
    result = run_agent("audit", "--probes", "stacks", "--pid", str(parent_pid), "--subprocesses",
                       "--duration", "2", "--out", str(tmp_path / "bundle"))
    assert result.returncode == 0, result.stderr
    rows = Bundle(tmp_path / "bundle").table("stacks").to_pylist()
    by_pid = {row["pid"] for row in rows}
    assert {parent_pid, child_pid} <= by_pid
    assert any(r["pid"] == child_pid and "guardian_child_spin (<string>:" in r["stack"].rsplit(";", 1)[-1] for r in rows)
    assert all("\n" not in r["stack"] and "process " not in r["stack"] for r in rows)
    svg = (tmp_path / "bundle" / "stacks.svg").read_text()
    assert f"({child_pid})" in svg, "two processes: each gets a root frame in the flame graph"


def test_idle_threads_blocking_and_native_are_flagged(tmp_path, family):
    parent_pid, _child_pid = family
    result = run_agent("audit", "--probes", "stacks", "--pid", str(parent_pid), "--stack-threads", "all",
                       "--blocking", "--native", "--duration", "2", "--out", str(tmp_path / "bundle"))
    assert result.returncode == 0, result.stderr
    rows = Bundle(tmp_path / "bundle").table("stacks").to_pylist()
    python_rows = [r for r in rows if r["source"] == "py-spy"]
    assert python_rows and all(r["includes_idle"] and r["blocking"] for r in python_rows)
    idle = sum(r["samples"] for r in python_rows if r["thread"] == "idle-helper")
    assert idle >= 30, "the sleeping thread is sampled when idle threads are included"
    if shutil.which("perf"):
        native_rows = [r for r in rows if r["source"] == "perf"]
        assert native_rows and not any(r["blocking"] or r["includes_idle"] for r in native_rows)
        svg = (tmp_path / "bundle" / "stacks.svg").read_text()
        assert "python (py-spy)" in svg and "native (perf)" in svg
