"""stacks probe: folding py-spy and perf output (recorded), error reasons, target resolution."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import BadInput, Unavailable
from core.host import Host
from probes.base import ProbeConfig
from probes.stacks import (
    SCHEMA,
    StacksProbe,
    graph_stacks,
    hot_functions,
    perf_script_rows,
    perf_failure_reason,
    ptrace_problem,
    pyspy_command,
    pyspy_failure_reason,
    pyspy_sample_counts,
    pyspy_speedscope_rows,
    pyspy_target_exited,
    short_filename,
)
from probes.targets import pids_by_name, pids_of_unit, resolve_targets

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "stacks"


def test_pyspy_speedscope_fold_with_subprocesses():
    """Recorded: `py-spy record --threads --function --subprocesses -f speedscope` of a parent
    spinning in parent_spin() whose child spins in child_hot() (child cmdline has newlines)."""
    document = json.loads((FIXTURES / "pyspy_subprocesses.speedscope.json").read_text())
    rows = pyspy_speedscope_rows(document, default_pid=1)
    by_pid: dict[int, int] = {}
    for row in rows:
        by_pid[row["pid"]] = by_pid.get(row["pid"], 0) + row["samples"]
        assert "process " not in row["stack"] and "thread (" not in row["stack"]
        assert "\n" not in row["stack"]
    assert set(by_pid) == {15556, 15604}
    parent = [r for r in rows if r["pid"] == 15556]
    assert parent[0]["stack"] == "<module> (parent.py:1);parent_spin (parent.py:3)"
    assert parent[0]["thread"] == "MainThread" and parent[0]["thread_id"] == 15556
    child_hot = sum(r["samples"] for r in rows if r["pid"] == 15604 and r["stack"].endswith("child_hot (<string>:2)"))
    assert child_hot > 0.5 * by_pid[15604]
    # Every sample of the recording is accounted for exactly once.
    assert sum(by_pid.values()) == sum(len(p["samples"]) for p in document["profiles"])


def test_short_filename():
    assert short_filename("/usr/lib/python3/dist-packages/bcc/__init__.py") == "bcc/__init__.py"
    assert short_filename("/root/.pyenv/versions/3.11.7/lib/python3.11/threading.py") == "threading.py"
    assert short_filename("/root/.pyenv/versions/3.11.7/lib/python3.11/asyncio/events.py") == "asyncio/events.py"
    assert short_filename("/srv/app/feed.py") == "feed.py"
    assert short_filename("<string>") == "<string>"


def test_perf_script_fold_recorded_dd():
    """Recorded: `perf script -F comm,pid,tid,ip,sym,dso` of `dd bs=1` (kernel dso is a vmlinux path)."""
    rows = perf_script_rows((FIXTURES / "perf_script_dd.txt").read_text())
    assert sum(r["samples"] for r in rows) == 22
    assert {r["pid"] for r in rows} == {20230} and {r["thread"] for r in rows} == {"dd"}
    write = next(r for r in rows if r["stack"].endswith("write_null [k]"))
    frames = write["stack"].split(";")
    assert frames[0] == "__GI___libc_write", "root first: user space calls into the kernel"
    assert frames[1:3] == ["entry_SYSCALL_64_after_hwframe [k]", "do_syscall_64 [k]"]
    assert any(r["stack"] == "[dd]" for r in rows), "unresolved symbols show their binary"


def test_perf_script_comm_with_spaces_and_unknown_runs():
    text = (
        "tokio worker 7 4242/4250 \n"
        "\t    7f00000010 do_work (/srv/bin/engine)\n"
        "\t    7f00000020 [unknown] ([unknown])\n"
        "\t    7f00000030 [unknown] ([unknown])\n"
        "\n"
        "tokio worker 7 4242/4250 \n"
        "\t    7f00000010 do_work+0x10 (/srv/bin/engine)\n"
        "\t    7f00000020 [unknown] ([unknown])\n"
    )
    rows = perf_script_rows(text)
    assert rows == [{"pid": 4242, "thread": "tokio worker 7", "thread_id": 4250, "process": None,
                     "stack": "[unknown];do_work", "samples": 2}]


def test_pyspy_reasons_from_recorded_output():
    # Recorded from py-spy 0.4.3 run as uid 65534 against a root-owned Python process.
    denied = "Permission Denied: Try running again with elevated permissions by going 'sudo env \"PATH=$PATH\" !!'\n"
    reason = pyspy_failure_reason(denied, 123, "feed")
    assert "CAP_SYS_PTRACE" in reason and "kernel.yama.ptrace_scope" in reason and "123 (feed)" in reason
    # Recorded: py-spy against `sleep` (not Python).
    not_python = "Error: Failed to find python version from target process\n\nStack backtrace:\n   0: anyhow"
    assert "not a Python process" in pyspy_failure_reason(not_python, 9) and "--native" in pyspy_failure_reason(not_python, 9)
    unsupported = "Error: Unsupported version of Python: 3.15.0a1\n"
    reason = pyspy_failure_reason(unsupported, 7)
    assert "Python 3.15.0a1" in reason and "upgrade py-spy" in reason
    gone = "Error: Failed to get process executable name. Check that the process is running.\n"
    assert "exited" in pyspy_failure_reason(gone, 5)
    assert "perf_event_paranoid" in perf_failure_reason("Error:\nAccess to performance monitoring ... "
                                                        "perf_event_paranoid setting is 4", [5])


def test_pyspy_summary_lines():
    stderr = ("py-spy> Sampling process 97 times a second. Press Control-C to exit.\n\n"
              "py-spy> Stopped sampling because process exited\n"
              "py-spy> Wrote speedscope file to 'x.json'. Samples: 105 Errors: 3\n")
    assert pyspy_sample_counts(stderr) == (105, 3)
    assert pyspy_target_exited(stderr)
    assert not pyspy_target_exited("py-spy> Stopped sampling because Control-C pressed\n")


def test_pyspy_command_is_nonblocking_at_prime_rate_by_default():
    command = pyspy_command("py-spy", 42, 97, Path("/tmp/out.json"))
    assert "--nonblocking" in command and command[command.index("--rate") + 1] == "97"
    assert "--idle" not in command and "--gil" not in command and "--subprocesses" not in command
    blocking = pyspy_command("py-spy", 42, 97, Path("/tmp/out.json"), blocking=True, subprocesses=True,
                             thread_mode="all")
    assert "--nonblocking" not in blocking and "--subprocesses" in blocking and "--idle" in blocking
    assert "--gil" in pyspy_command("py-spy", 42, 97, Path("/x"), thread_mode="gil")


def test_graph_stacks_adds_roots_only_when_needed():
    one = [{"pid": 1, "process": "a", "source": "py-spy", "thread": "Main", "thread_id": 1, "stack": "f;g", "samples": 3}]
    assert graph_stacks(one) == {"f;g": 3}
    two = one + [{"pid": 2, "process": "b", "source": "perf", "thread": "b", "thread_id": 2, "stack": "h", "samples": 1}]
    assert graph_stacks(two) == {"a (1);python (py-spy);thread Main;f;g": 3, "b (2);native (perf);thread b;h": 1}


def test_hot_functions_use_self_samples_per_process():
    rows = [{"pid": 1, "process": "a", "source": "py-spy", "stack": "main (m.py:1);hot (m.py:5)", "samples": 70},
            {"pid": 1, "process": "a", "source": "py-spy", "stack": "main (m.py:1)", "samples": 30},
            {"pid": 2, "process": "b", "source": "perf", "stack": "x;y", "samples": 10}]
    hot = hot_functions(rows)
    assert hot[0] == (2, "b", "y", 1.0)
    assert (1, "a", "hot (m.py)", 0.7) in hot and (1, "a", "main (m.py)", 0.3) in hot


def test_schema_has_the_stable_columns():
    for column in ("stack", "samples", "thread"):
        assert column in SCHEMA.names
    assert StacksProbe.extras == ("stacks.svg", "stacks.speedscope.json")


# --- targets, on a fake /proc and /sys tree -------------------------------------------------


def fake_process(root: Path, pid: int, comm: str, argv: list[str], cgroup: str | None = None) -> None:
    proc = root / "proc" / str(pid)
    proc.mkdir(parents=True)
    (proc / "comm").write_text(comm + "\n")
    (proc / "cmdline").write_bytes(b"\0".join(arg.encode() for arg in argv) + b"\0")
    if cgroup:
        directory = root / "sys" / "fs" / "cgroup" / cgroup.lstrip("/")
        directory.mkdir(parents=True, exist_ok=True)
        procs = directory / "cgroup.procs"
        procs.write_text((procs.read_text() if procs.exists() else "") + f"{pid}\n")


@pytest.fixture
def fake_host(tmp_path: Path) -> Host:
    fake_process(tmp_path, 100, "python3", ["/usr/bin/python3", "feed_handler.py", "--live"],
                 "system.slice/feed.service")
    fake_process(tmp_path, 101, "python3", ["/usr/bin/python3", "-u", "risk.py"],
                 "system.slice/feed.service/workers")
    fake_process(tmp_path, 200, "order-gateway-m", ["/opt/bin/order-gateway-main"])
    fake_process(tmp_path, 300, "bash", ["bash"])
    return Host(tmp_path)


def test_targets_by_name(fake_host: Host):
    assert pids_by_name(fake_host, "feed_handler.py") == [100]
    assert pids_by_name(fake_host, "risk.py") == [101]
    assert pids_by_name(fake_host, "python3") == [100, 101]
    # comm is cut to 15 characters by the kernel; the full name still matches.
    assert pids_by_name(fake_host, "order-gateway-main") == [200]
    assert pids_by_name(fake_host, "nothing") == []
    # ... but only a 15-character (cut) comm stands for a longer name.
    assert pids_by_name(fake_host, "python3-feed-handler-long") == []


def test_targets_by_unit_include_nested_cgroups(fake_host: Host):
    assert pids_of_unit(fake_host, "feed") == [100, 101]
    assert pids_of_unit(fake_host, "feed.service") == [100, 101]
    assert pids_of_unit(fake_host, "absent") == []
    with pytest.raises(BadInput):
        pids_of_unit(fake_host, "../../etc")


def test_resolve_targets_dedupes_and_names_the_typo(fake_host: Host):
    targets = resolve_targets(fake_host, [200], ["feed_handler.py"], ["feed"])
    assert [(t.pid, t.selected_by) for t in targets] == [(200, "pid"), (100, "name:feed_handler.py"),
                                                         (101, "unit:feed.service")]
    with pytest.raises(BadInput, match="--process nope"):
        resolve_targets(fake_host, [], ["nope"], [])
    with pytest.raises(BadInput, match="--pid 999"):
        resolve_targets(fake_host, [999], [], [])


def test_probe_check_without_target_is_unavailable(fake_host: Host):
    with pytest.raises(Unavailable, match="no target"):
        StacksProbe(ProbeConfig(host=fake_host)).check()
    with pytest.raises(Unavailable, match="--process ghost"):
        StacksProbe(ProbeConfig(host=fake_host, process_names=("ghost",))).check()
    with pytest.raises(Unavailable, match="--rate"):
        StacksProbe(ProbeConfig(host=fake_host, pids=(100,), options={"sample_rate_hz": 0})).check()


def test_ptrace_scope_three_blocks_even_root(tmp_path: Path):
    scope = tmp_path / "proc" / "sys" / "kernel" / "yama"
    scope.mkdir(parents=True)
    (scope / "ptrace_scope").write_text("3\n")
    assert "ptrace_scope is 3" in ptrace_problem(Host(tmp_path))
    (scope / "ptrace_scope").write_text("1\n")
    import os

    if os.geteuid() == 0:
        assert ptrace_problem(Host(tmp_path)) is None
