"""Prometheus textfile output: parsed with prometheus_client's own parser, checked by Debian's
`promtool check metrics` (installed by `make setup`), and compared with the Parquet the same
window wrote to the dataset."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401 - pa.compute
import pyarrow.parquet as pq
import pytest

from reports.metrics import AGENT_FILE, WINDOW_FILE, TextfileExporter, parse_listen, write_families, window_families
from reports.html_data import open_source

PROMTOOL = shutil.which("promtool") or "/var/lib/guardian-agent/tools/promtool"


def parse(text: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {family.name: family for family in text_string_to_metric_families(text)}


def promtool_check(path: Path) -> None:
    if not Path(PROMTOOL).exists():
        pytest.skip("promtool not installed (make setup extracts it from Debian's prometheus package)")
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=path.read_text(), capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def histogram_series(family) -> dict[tuple, dict]:
    series: dict[tuple, dict] = {}
    for sample in family.samples:
        key = (sample.labels["syscall"], sample.labels["comm"])
        entry = series.setdefault(key, {"buckets": [], "count": None, "sum": None})
        if sample.name.endswith("_bucket"):
            entry["buckets"].append((float(sample.labels["le"]), sample.value))
        elif sample.name.endswith("_count"):
            entry["count"] = sample.value
        elif sample.name.endswith("_sum"):
            entry["sum"] = sample.value
    return series


@pytest.mark.live
def test_daemon_textfile_and_listen_match_the_window_in_the_dataset(tmp_path, free_port):
    from agent.daemon import Daemon
    from probes import REGISTRY
    from tests.conftest import syscall_load
    from tests.test_fleet import make_config

    root, textfiles = tmp_path / "dataset", tmp_path / "textfile"
    config = make_config(root, probes=("host", "syscalls", "tcp"))
    config.daemon.window_s = 1.5
    config.daemon.cpu_budget_pct = 100.0
    # The daemon runs inside pytest here, whose own heap (pyarrow, matplotlib, earlier tests) is
    # not the daemon's: its RSS limit is for production processes, not this test.
    config.daemon.rss_limit_mb = 64 * 1024
    exporter = TextfileExporter(textfiles, parse_listen(f"127.0.0.1:{free_port}"))
    daemon = Daemon(config, REGISTRY, max_windows=2, metrics=exporter)
    codes = []
    # The daemon runs in this process, whose own calls the probe leaves out: bring a load.
    with syscall_load(tcp=True):
        runner = threading.Thread(target=lambda: codes.append(daemon.run()))
        runner.start()
        scraped = ""
        deadline = time.monotonic() + 90
        while runner.is_alive() and time.monotonic() < deadline:
            try:
                scraped = urllib.request.urlopen(f"http://127.0.0.1:{free_port}/metrics", timeout=2).read().decode()
            except OSError:
                scraped = ""
            if "guardian_syscall_latency_seconds_bucket" in scraped:
                break
            time.sleep(0.3)
        runner.join(timeout=120)
    assert codes == [0]
    # On failure, say what each probe's windows ended as (the daemon logs only changes).
    assert "guardian_syscall_latency_seconds_bucket" in scraped, daemon.state["probes"]  # served while running
    window = textfiles / WINDOW_FILE
    families = parse(window.read_text())
    promtool_check(window)
    promtool_check(textfiles / AGENT_FILE)
    series = histogram_series(families["guardian_syscall_latency_seconds"])
    assert series
    for entry in series.values():
        counts = [count for _le, count in sorted(entry["buckets"])]
        assert counts == sorted(counts) and counts[-1] == entry["count"]  # cumulative, +Inf last
    # The last window's Parquet in the dataset holds the same calls, bucket by bucket summed.
    last_run = sorted(p.stem for p in root.glob("table=syscalls/**/*.parquet"))[-1]
    syscalls = pa.concat_tables([pq.read_table(p) for p in root.glob(f"table=syscalls/**/{last_run}.parquet")])
    calls: dict[tuple, int] = {}
    for row in syscalls.to_pylist():
        key = (row["syscall"], row["comm"] or "")
        calls[key] = calls.get(key, 0) + row["count"]  # format 2: one row per pid x syscall
    ranked = sorted(series, key=lambda key: -series[key]["sum"])[:20]
    for key in ranked:
        assert series[key]["count"] == calls[key], key
    busy = {s.labels["cpu"] for s in families["guardian_cpu_busy_ratio"].samples}
    assert "0" in busy and "-1" in busy
    # sRTT per peer role: the connections the same window's tcp table has samples for, role by role.
    tcp = [pq.read_table(p) for p in root.glob(f"table=tcp/**/{last_run}.parquet")]
    expected_roles: dict[str, int] = {}
    for row in (pa.concat_tables(tcp).to_pylist() if tcp else []):
        if row["srtt_us_p50"] is not None:
            role = row.get("role") or "unlabelled"
            expected_roles[role] = expected_roles.get(role, 0) + 1
    shown_roles = {s.labels["role"]: s.value for s in families["guardian_tcp_connections"].samples}
    assert expected_roles and shown_roles == expected_roles
    assert {s.labels["role"] for s in families["guardian_tcp_srtt_median_seconds"].samples} == set(expected_roles)
    agent = parse((textfiles / AGENT_FILE).read_text())
    assert agent["guardian_agent_cpu_seconds"].samples[0].value > 0
    assert agent["guardian_agent_windows"].samples[0].value == 2
    assert agent["guardian_agent_resident_memory_bytes"].samples[0].value > 10e6
    with pytest.raises(OSError):  # the server stopped with the daemon
        urllib.request.urlopen(f"http://127.0.0.1:{free_port}/metrics", timeout=2)


@pytest.mark.live
def test_findings_tuning_drift_and_gate_verdict_from_a_real_audit(agent_cli, tmp_path):
    bundle = tmp_path / "audit"
    result = agent_cli("audit", "--duration", "1", "--probes", "host,kernel", "--profile", "trading-latency",
                       "--out", str(bundle), "--no-html")
    assert result.returncode == 0, result.stderr
    assert not (bundle / "report.html").exists()
    from tests.test_report_html import FIXTURES  # noqa: F401 - same fixtures tree

    record = tmp_path / "decisions"
    gate = agent_cli("gate", "--baseline", str(bundle), "--candidate", str(bundle), "--record", str(record))
    assert gate.returncode in (0, 1, 4), gate.stderr  # pass, fail or inconclusive (4): any verdict is recorded
    path = write_families(tmp_path / "textfile", WINDOW_FILE, window_families(open_source(bundle), record))
    promtool_check(path)
    families = parse(path.read_text())
    kernel = pq.read_table(bundle / "kernel.parquet").to_pylist()
    drift = families["guardian_tuning_drift_items"].samples[0]
    assert drift.labels["profile"] == "trading-latency"
    assert drift.value == sum(1 for row in kernel if row["compliant"] is False)
    findings = pq.read_table(bundle / "findings.parquet").to_pylist()
    shown = {(s.labels["severity"], s.labels["probe"]): s.value for s in families["guardian_findings"].samples}
    for severity in ("critical", "warning", "info"):
        expected = sum(1 for row in findings if row["severity"] == severity)
        assert sum(v for (sev, _), v in shown.items() if sev == severity) == expected
    decisions = pa.concat_tables([pq.read_table(p) for p in record.glob("*.parquet")]).to_pylist()
    verdicts = {s.labels["verdict"]: s.value for s in families["guardian_gate_last_verdict"].samples}
    assert verdicts[decisions[0]["verdict"]] == 1 and sum(verdicts.values()) == 1
    up = {s.labels["probe"]: s.value for s in families["guardian_probe_up"].samples}
    assert up == {"host": 1, "kernel": 1}


def test_bad_listen_and_textfile_are_refused_before_any_window(agent_cli, tmp_path):
    (tmp_path / "file").write_text("x")
    result = agent_cli("daemon", "--dataset", str(tmp_path / "d"), "--textfile", str(tmp_path / "file"))
    assert result.returncode == 2 and "--textfile" in result.stderr and result.stderr.count("\n") == 1
    result = agent_cli("daemon", "--dataset", str(tmp_path / "d"), "--listen", "nonsense")
    assert result.returncode == 2 and "--listen nonsense: give HOST:PORT" in result.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.live
def test_collect_textfile_is_written_from_the_window_before_staging(tmp_path):
    from agent.fleet.collect import collect_once
    from probes import REGISTRY
    from tests.test_fleet import make_config

    exporter = TextfileExporter(tmp_path / "textfile")
    outcome = collect_once(make_config(tmp_path / "dataset", probes=("host",)), REGISTRY, duration_s=1.0,
                           before_stage=exporter.window_done)
    assert not outcome.drain.error
    window = tmp_path / "textfile" / WINDOW_FILE
    promtool_check(window)
    families = parse(window.read_text())
    host = pa.concat_tables([pq.read_table(p) for p in (tmp_path / "dataset").glob("table=host/**/*.parquet")])
    totals = host.filter(pa.compute.equal(host["cpu"], -1))
    busy = {s.labels["cpu"]: s.value for s in families["guardian_cpu_busy_ratio"].samples}
    assert busy["-1"] == pytest.approx(pa.compute.mean(totals["busy_pct"]).as_py() / 100)
    assert [p.name for p in (tmp_path / "textfile").iterdir()] == [WINDOW_FILE]  # no temp file left
