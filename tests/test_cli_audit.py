"""The audit command end to end: failure cases exit 2 and write nothing; a real audit writes a
complete bundle; SIGTERM mid-window still writes it, marked interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from reports.bundle import Bundle
from tests.conftest import PROJECT_ROOT, run_agent, syscall_load

BAD_INPUTS = [
    (["audit", "--duration", "0"], "'--duration': '0': give more than 0"),
    (["audit", "--duration", "-3"], "'--duration': '-3': give more than 0"),
    (["audit", "--pid", "999999999"], "--pid 999999999: no such process"),
    (["audit", "--probes", "host,warp_drive"], "unknown probe warp_drive"),
    (["audit", "--process", "no-such-process-xyz"], "--process no-such-process-xyz: no running process"),
    (["audit", "--duration", "abc"], "'abc' is not a number of seconds"),
    (["audit", "--no-such-flag"], "No such option '--no-such-flag'"),
]


@pytest.mark.parametrize("args,message", BAD_INPUTS, ids=[" ".join(a) for a, _ in BAD_INPUTS])
def test_bad_input_one_line_exit_2_nothing_written(cli_runner, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    result = cli_runner.invoke(args + ["--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "guardian-reports").exists()


def test_non_empty_out_is_refused_and_untouched(cli_runner, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("data")
    result = cli_runner.invoke(["audit", "--duration", "1", "--out", str(out)])
    assert result.exit_code == 2
    assert "not empty" in result.output
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_unwritable_out_subprocess():
    # Root ignores directory modes, so use a place even root cannot create directories in.
    result = run_agent("audit", "--duration", "1", "--out", "/proc/guardian-test/out")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "cannot create it" in result.stderr


def test_version_and_help():
    result = run_agent("--version")
    assert result.returncode == 0 and result.stdout.startswith("guardian-agent, version ")
    for command in (["--help"], ["audit", "--help"], ["probes", "--help"]):
        result = run_agent(*command)
        assert result.returncode == 0 and "Usage:" in result.stdout


@pytest.mark.live
def test_probes_lists_every_probe_with_availability():
    result = run_agent("probes", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["host"]["status"] == "available"
    assert rows["syscalls"]["status"] == "available", rows["syscalls"]["reason"]


@pytest.mark.live
def test_real_audit_writes_complete_bundle(tmp_path):
    out = tmp_path / "bundle"
    with syscall_load() as load_pid:
        result = run_agent("audit", "--duration", "2", "--probes", "host,syscalls", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "Probes:" in result.stdout and "Top syscalls by total time" in result.stdout
    bundle = Bundle(out)
    statuses = {p["name"]: p["status"] for p in bundle.manifest["probes"]}
    assert statuses == {"host": "ok", "syscalls": "ok"}
    syscalls = bundle.table("syscalls")
    load_calls = {row["syscall"] for row in syscalls.to_pylist() if row["pid"] == load_pid}
    assert {"getppid", "clock_nanosleep"} <= load_calls, load_calls
    assert {"pid", "comm", "syscall", "count", "total_ns", "max_ns"} <= set(syscalls.schema.names)
    buckets = bundle.table("syscall_buckets")  # format 2: buckets apart, sum(count) = calls
    assert {"pid", "syscall", "bucket_lo_ns", "bucket_hi_ns", "bucket_count"} <= set(buckets.schema.names)
    assert sum(buckets.column("bucket_count").to_pylist()) == sum(syscalls.column("count").to_pylist())
    assert bundle.table("host").num_rows > 0
    assert 1.5 <= bundle.manifest["duration_s"] < 60


@pytest.mark.live
def test_default_out_dir_under_guardian_reports(tmp_path):
    result = run_agent("audit", "--duration", "1", "--probes", "host", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    bundles = list((tmp_path / "guardian-reports").iterdir())
    assert len(bundles) == 1 and (bundles[0] / "manifest.json").exists()


SIGNALS = {"SIGTERM": signal.SIGTERM, "SIGINT": signal.SIGINT}


def signalled_audit(out, signum) -> dict:
    """One `audit --duration 60`, signalled 2 s into its window; returns what the test asserts on."""
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    process = subprocess.Popen([sys.executable, "-m", "agent.cli", "-v", "audit", "--duration", "60",
                                "--probes", "host,syscalls", "--out", str(out)],
                               cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        # -v prints progress on stderr: wait until the window has started (BPF compiled and attached).
        for line in process.stderr:
            if "collecting for" in line:
                break
        time.sleep(2)
        started = time.monotonic()
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    return {"returncode": process.returncode, "stderr": stderr, "signalled_to_exit_s": time.monotonic() - started}


@pytest.fixture(scope="module")
def signalled_audits(tmp_path_factory):
    """Both signals' audits run side by side (independent processes, separate bundles, one load
    both see): the two BPF compiles and 2 s windows cost one wall time instead of two."""
    from concurrent.futures import ThreadPoolExecutor

    base = tmp_path_factory.mktemp("signalled")
    with syscall_load() as load_pid, ThreadPoolExecutor(len(SIGNALS)) as pool:
        futures = {name: pool.submit(signalled_audit, base / name, signum) for name, signum in SIGNALS.items()}
        results = {name: dict(future.result(), out=base / name) for name, future in futures.items()}
    return load_pid, results


@pytest.mark.live
@pytest.mark.parametrize("name", list(SIGNALS))
def test_signal_ends_window_early_bundle_still_written(signalled_audits, name):
    load_pid, results = signalled_audits
    result = results[name]
    assert result["returncode"] == 0, result["stderr"]
    assert result["signalled_to_exit_s"] < 30
    bundle = Bundle(result["out"])
    assert bundle.manifest["interrupted"] is True
    assert {p["status"] for p in bundle.manifest["probes"]} == {"interrupted"}
    assert load_pid in bundle.table("syscalls").column("pid").to_pylist()
