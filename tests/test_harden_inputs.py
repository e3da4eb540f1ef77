"""Bad input gets one clear line on stderr and exit 2, before anything is written or changed."""

from __future__ import annotations

import pytest

from tests.conftest import run_agent


def one_line_exit_2(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("guardian-agent: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("args", [
    ["audit", "--probes", "host", "--duration", value] for value in ("nan", "inf", "-inf", "1e12", "1e400", "NaN", "0")
] + [
    ["audit", "--probes", "host", "--interval", "nan"],
    ["audit", "--probes", "host", "--interval", "inf"],
    ["daemon", "--window", "nan"],
    ["daemon", "--window", "1e12"],
    ["collect", "--duration", "nan"],
])
def test_seconds_must_be_finite_and_bounded(cli_runner, tmp_path, args):
    out = tmp_path / "out"
    extra = ["--out", str(out)] if args[0] == "audit" else ["--dataset", str(tmp_path / "ds"), "--spool",
                                                            str(tmp_path / "spool")]
    result = cli_runner.invoke(args + extra)
    one_line_exit_2(result, args[-2])
    assert not out.exists() and not (tmp_path / "ds").exists() and not (tmp_path / "spool").exists()


def test_seconds_type_accepts_ordinary_values():
    from agent.cli import Seconds

    assert Seconds().convert(" 2.5", None, None) == 2.5
    assert Seconds(10).convert(10, None, None) == 10.0


# --- a probe asked for by its option that cannot run is bad input, before the window ----------

PROBE_OPTION_CASES = [
    (["--probes", "kernel", "--profile", "nosuch-profile"], "--profile nosuch-profile"),
    (["--probes", "capture", "--iface", "nosuch0"], "--iface nosuch0: no such interface"),
    (["--probes", "capture", "--iface", "lo", "--capture-filter", "tcp prot 5432"], "--capture-filter 'tcp prot 5432'"),
    (["--probes", "capture", "--iface", "lo", "--capture-filter", "tcp port 99999"], "illegal port number"),
    (["--probes", "jitter", "--jitter-cpus", "99"], "--jitter-cpus 99"),
    (["--probes", "jitter", "--jitter-cpus", "two"], "--jitter-cpus 'two'"),
]


@pytest.mark.live
@pytest.mark.parametrize("args, message", PROBE_OPTION_CASES, ids=[" ".join(a) for a, _ in PROBE_OPTION_CASES])
def test_probe_option_that_cannot_run_is_exit_2_before_the_window(tmp_path, args, message):
    out = tmp_path / "out"
    # A 60 s window: the refusal must come before it (the test's own timeout would catch a wait).
    result = run_agent("audit", "--duration", "60", "--out", str(out), *args, timeout=30)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_every_probe_unavailable_is_not_a_clean_bill_of_health(cli_runner, tmp_path):
    # stacks without a target and capture without --iface cannot run anywhere.
    out = tmp_path / "out"
    result = cli_runner.invoke(["audit", "--probes", "stacks,capture", "--duration", "0.2", "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "NOTHING MEASURED" in result.output and "Findings: none" not in result.output
    assert (out / "manifest.json").exists(), "the bundle still records why"


def test_summary_of_a_run_that_measured_something_is_unchanged():
    from types import SimpleNamespace

    from agent.summary import nothing_collected, render_summary
    from probes.base import FINDINGS_SCHEMA

    outcome = SimpleNamespace(name="host", status="ok", reason="", tables={}, detail="")
    missing = SimpleNamespace(name="capture", status="unavailable", reason="no interface", tables={}, detail="")
    result = SimpleNamespace(outcomes=[outcome, missing], findings=FINDINGS_SCHEMA.empty_table(),
                             headlines=[], interrupted=False, manifest={"run_id": "r"})
    assert not nothing_collected(result)
    assert render_summary(result, tmp_path_placeholder := "x").startswith("Findings: none")
    result.outcomes = [missing]
    assert nothing_collected(result)
    assert render_summary(result, tmp_path_placeholder).startswith("NOTHING MEASURED: every requested probe "
                                                                   "was unavailable")


@pytest.mark.live
def test_wrong_postgres_password_is_exit_2_before_the_window(tmp_path):
    from tests.pg_server import AUDITOR_PASSWORD, AUDITOR_ROLE, PgServer, postgres_available

    reason = postgres_available()
    if reason:
        pytest.fail(f"PostgreSQL 15 is part of this host's setup: {reason}")
    wrong = "wrong-" + AUDITOR_PASSWORD
    with PgServer(statement_logging=False) as server:
        dsn = server.dsn(AUDITOR_ROLE, password=wrong)
        out = tmp_path / "out"
        result = run_agent("audit", "--probes", "host,postgres", "--duration", "60", "--pg-dsn", dsn,
                           "--out", str(out), timeout=40)
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--pg-dsn: authentication failed" in lines[0], result.stderr
    assert wrong not in result.stdout + result.stderr and not out.exists()


# --- --pid/--process filter the tcp probe too: its status says so -----------------------------

def test_pid_filter_note_names_the_pids():
    from probes.tcp import pid_filter_note

    assert pid_filter_note([7, 3, 7]) == "only connections of pid 3, 7 (--pid/--process/--unit filter this probe too)"
    assert "and 2 more" in pid_filter_note(range(10))


@pytest.mark.live
def test_tcp_status_says_it_was_filtered(tmp_path):
    import json
    import subprocess
    import sys

    target = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        out = tmp_path / "out"
        result = run_agent("audit", "--probes", "tcp", "--pid", str(target.pid), "--duration", "0.5",
                           "--out", str(out), timeout=90)
    finally:
        target.kill()
        target.wait()
    assert result.returncode == 0, result.stderr
    record = next(p for p in json.loads((out / "manifest.json").read_text())["probes"] if p["name"] == "tcp")
    assert record["status"] == "ok", record
    assert f"only connections of pid {target.pid}" in record["reason"]
    assert f"only connections of pid {target.pid}" in result.stdout
