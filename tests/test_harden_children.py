"""Every child the agent starts dies with it; its temp directories are swept at the next start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from core import children
from tests.conftest import PROJECT_ROOT

PYTHON_TARGET = """
import sys, time
deadline = time.monotonic() + float(sys.argv[1])
def guardian_busy():
    total = 0
    for i in range(20000):
        total += i * i
    return total
while time.monotonic() < deadline:
    guardian_busy()
"""


def descendants(pid: int) -> dict[int, str]:
    """pid -> comm of every live process below `pid` (walks /proc, so re-parented ones drop out)."""
    parents: dict[int, int] = {}
    comms: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        comms[int(entry.name)] = text[text.index("(") + 1:text.rindex(")")]
        parents[int(entry.name)] = int(text[text.rindex(")") + 2:].split()[1])
    found: dict[int, str] = {}
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        for child, its_parent in parents.items():
            if its_parent == parent and child not in found:
                found[child] = comms[child]
                frontier.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def own_temp_dirs(pid: int) -> list[Path]:
    return sorted(Path(tempfile.gettempdir()).glob(f"guardian-*-{pid}.*"))


def test_spawned_child_survives_its_spawning_thread_and_dies_with_the_process(tmp_path):
    """PR_SET_PDEATHSIG follows the forking thread: a child started from a short-lived thread
    (as the runner's prepare threads are) must live on, and must die when the process does."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, threading, time\n"
        f"sys.path.insert(0, {str(PROJECT_ROOT)!r})\n"
        "from core.children import spawn\n"
        "box = []\n"
        "t = threading.Thread(target=lambda: box.append(spawn(['sleep', '60'])))\n"
        "t.start(); t.join()\n"
        "time.sleep(0.5)\n"
        "print(box[0].pid, box[0].poll(), flush=True)\n"
        "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        sleeper_pid, returncode = parent.stdout.readline().split()
        sleeper_pid = int(sleeper_pid)
        assert returncode == "None", "the child died with the thread that spawned it"
        assert alive(sleeper_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 2
        while alive(sleeper_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(sleeper_pid), "the child outlived the SIGKILLed parent"
    finally:
        parent.kill()
        parent.wait()


def test_run_matches_subprocess_run():
    result = children.run(["sh", "-c", "echo out; echo err >&2; exit 3"], capture_output=True, text=True,
                          timeout=10)
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
    with pytest.raises(subprocess.TimeoutExpired):
        children.run(["sleep", "5"], timeout=0.2)
    with pytest.raises(FileNotFoundError):
        children.spawn(["/nonexistent/guardian-no-such-binary"])


def test_stale_temp_dirs_are_swept_and_live_ones_kept(tmp_path):
    # A dead owner: a process that has exited (its pid and start time no longer match).
    gone = subprocess.Popen(["true"])
    gone.wait()
    stale = tmp_path / f"guardian-capture-{gone.pid}.12345-abc"
    stale.mkdir()
    (stale / "ring.pcap0").write_bytes(b"x" * 10)
    # A recycled pid: our own pid with a start time that is not ours.
    recycled = tmp_path / f"guardian-stacks-{os.getpid()}.1-def"
    recycled.mkdir()
    mine = tmp_path / f"guardian-stacks-{os.getpid()}.{children._start_time_ticks(os.getpid())}-ghi"
    mine.mkdir()
    unrelated = tmp_path / "guardian-other-1.1-x"
    unrelated.mkdir()
    removed = children.clean_stale_temp_dirs(tmp_path)
    assert sorted(removed) == sorted([stale, recycled])
    assert mine.exists() and unrelated.exists() and not stale.exists()


@pytest.mark.live
def test_sigkill_of_audit_takes_tcpdump_and_py_spy_along(tmp_path):
    if not Path("/sys/class/net/lo").exists():
        pytest.fail("no loopback interface")
    target = subprocess.Popen([sys.executable, "-c", PYTHON_TARGET, "60"])
    spawned: dict[int, str] = {}
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    audit = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "audit", "--probes", "capture,stacks", "--iface", "lo",
         "--pid", str(target.pid), "--duration", "60", "--out", str(tmp_path / "bundle")],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        # The stacks temp dir appears when the window's sampler starts (prepare's `py-spy dump`
        # comes and goes before it).
        deadline = time.monotonic() + 45
        temp_dirs: list[Path] = []
        while time.monotonic() < deadline:
            temp_dirs = own_temp_dirs(audit.pid)
            if {p.name.split("-")[1] for p in temp_dirs} == {"capture", "stacks"}:
                break
            time.sleep(0.1)
        assert {p.name.split("-")[1] for p in temp_dirs} == {"capture", "stacks"}, temp_dirs
        time.sleep(1.0)  # mid-window: the prepare threads that started tcpdump have returned
        spawned = descendants(audit.pid)
        assert {"tcpdump", "py-spy"} <= set(spawned.values()), f"children seen: {spawned}"

        audit.send_signal(signal.SIGKILL)
        audit.wait()
        killed_at = time.monotonic()
        while any(alive(pid) for pid in spawned) and time.monotonic() - killed_at < 2.0:
            time.sleep(0.02)
        left = {pid: comm for pid, comm in spawned.items() if alive(pid)}
        assert not left, f"still running 2 s after the agent's SIGKILL: {left}"
        assert all(path.exists() for path in temp_dirs), "nothing could have cleaned them yet"

        # The next start sweeps them (an audit that only lists nothing: the cheapest real start).
        again = subprocess.run([sys.executable, "-m", "agent.cli", "audit", "--probes", "host",
                                "--duration", "0.3", "--out", str(tmp_path / "next")],
                               cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert again.returncode == 0, again.stderr
        assert not any(path.exists() for path in temp_dirs), "stale temp dirs survived the next audit"
    finally:
        audit.kill()
        audit.wait()
        for pid in spawned:  # only when the test failed: the children it saw outlived the agent
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        target.kill()
        target.wait()


def test_spawn_works_in_a_forked_child():
    """The daemon forks a child per window; the spawner must start afresh there."""
    children.run(["true"], timeout=10)  # the parent's spawner thread exists now
    pid = os.fork()
    if pid == 0:
        try:
            result = children.run(["sh", "-c", "echo $PPID"], capture_output=True, text=True, timeout=10)
            os._exit(0 if int(result.stdout) == os.getpid() else 3)
        except BaseException:
            os._exit(4)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_bare_fork_armed_with_die_with_parent_dies_with_it(tmp_path):
    """The daemon's per-window child is a bare os.fork(): it must not outlive a SIGKILLed daemon."""
    script = tmp_path / "daemon_like.py"
    script.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(PROJECT_ROOT)!r})\n"
        "from core.children import die_with_parent\n"
        "parent = os.getpid()\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    die_with_parent(parent)\n"
        "    time.sleep(60)\n"
        "    os._exit(0)\n"
        "print(pid, flush=True)\n"
        "time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        window_pid = int(parent.stdout.readline())
        time.sleep(0.2)
        assert alive(window_pid)
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 2
        while alive(window_pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(window_pid), "the forked window outlived its daemon"
    finally:
        parent.kill()
        parent.wait()
