"""The tuning impact ledger (agent/tuning/ledger.py) on real Parquet files, and its way into the
fleet dataset (the bundle path `chaos_runs` takes)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from agent.config import parse_config
from agent.tuning.ledger import FILE_NAME, IMPACT_SCHEMA, append_impact, last_effects, read_ledger
from core.errors import BadInput, WorkFailed
from core.host import Host
from reports.bundle import Bundle, BundleWriter, ProbeRecord


def row(item="vm.stat_interval", run_id="run-1", host="alpha", verdict="improves", effect=-38.0, **extra):
    base = {"run_id": run_id, "host": host, "kernel": "6.18.0", "profile": "trading-latency", "item": item,
            "value_before": "1", "value_after": "10", "workload": "timer-jitter", "metric": "p99_ns",
            "effect_pct": effect, "effect_low_pct": effect - 7, "effect_high_pct": effect + 8,
            "p_value": 0.001, "verdict": verdict}
    base.update(extra)
    return base


def test_append_writes_bundle_and_ledger_and_accumulates(tmp_path):
    state, bundle = tmp_path / "state", tmp_path / "bundle"
    ledger = append_impact([row(), row("net.core.busy_poll", verdict="no measurable effect", effect=0.4)],
                           state_dir=state, out_dir=bundle)
    assert ledger == state / FILE_NAME
    in_bundle = pq.read_table(bundle / FILE_NAME)
    assert in_bundle.schema.equals(IMPACT_SCHEMA, check_metadata=False)
    assert in_bundle.column("item").to_pylist() == ["vm.stat_interval", "net.core.busy_poll"]
    assert in_bundle.schema.metadata[b"table"] == b"tuning_impact"
    ts = in_bundle.column("ts").to_pylist()
    assert all(abs(datetime.now(timezone.utc) - t) < timedelta(minutes=1) for t in ts)

    # a second experiment on the same host: a new bundle, the ledger grows
    append_impact([row(run_id="run-2", verdict="worsens", effect=12.0)], state_dir=state, out_dir=tmp_path / "b2")
    assert pq.read_table(tmp_path / "b2" / FILE_NAME).num_rows == 1
    assert read_ledger(ledger).column("run_id").to_pylist() == ["run-1", "run-1", "run-2"]
    assert not any(name.startswith(".") and "tmp" in name for name in os.listdir(state))


def test_last_effects_is_the_latest_row_per_item_of_that_host(tmp_path):
    old = datetime(2026, 11, 1, tzinfo=timezone.utc)
    append_impact([row(run_id="r-old", ts=old, verdict="worsens", effect=9.0),
                   row("kernel.numa_balancing", run_id="r-old", ts=old)], state_dir=tmp_path)
    append_impact([row(run_id="r-new", verdict="improves", effect=-20.0),
                   row(run_id="r-beta", host="beta", verdict="worsens")], state_dir=tmp_path)
    effects = last_effects(tmp_path, "alpha")
    assert set(effects) == {"vm.stat_interval", "kernel.numa_balancing"}
    assert effects["vm.stat_interval"]["run_id"] == "r-new"
    assert effects["vm.stat_interval"]["effect_pct"] == -20.0
    assert effects["kernel.numa_balancing"]["run_id"] == "r-old"
    assert last_effects(tmp_path, "beta")["vm.stat_interval"]["verdict"] == "worsens"
    assert last_effects(tmp_path / "nothing-here", "alpha") == {}


@pytest.mark.parametrize("bad, words", [
    ({"verdict": "better"}, "verdict 'better'"),
    ({"item": ""}, "missing item"),
    ({"p_value": 1.5}, "outside [0, 1]"),
    ({"effect_pct": "a lot"}, "effect_pct must be a number"),
    ({"colour": "red"}, "unknown column(s) colour"),
])
def test_bad_rows_are_refused_before_anything_is_written(tmp_path, bad, words):
    with pytest.raises(BadInput, match=words.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        append_impact([row(), row(**bad)], state_dir=tmp_path / "state", out_dir=tmp_path / "bundle")
    assert not (tmp_path / "state" / FILE_NAME).exists() and not (tmp_path / "bundle" / FILE_NAME).exists()
    with pytest.raises(BadInput, match="no rows"):
        append_impact([], state_dir=tmp_path / "state")


def test_a_damaged_ledger_is_named_not_overwritten(tmp_path):
    (tmp_path / FILE_NAME).write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(WorkFailed, match="unreadable tuning impact ledger"):
        append_impact([row()], state_dir=tmp_path)
    assert (tmp_path / FILE_NAME).read_bytes() == b"PAR1 this is not parquet"


def test_the_bundle_rows_join_the_fleet_dataset_as_tuning_impact(tmp_path):
    from agent.fleet.publish import publish

    dataset = tmp_path / "dataset"
    config = parse_config(f'[dataset]\nroot = "{dataset}"\n', source="test")
    writer = BundleWriter(tmp_path / "bundle", host=Host.real())
    append_impact([row(run_id=writer.run_id), row("kernel.numa_balancing", run_id=writer.run_id)],
                  state_dir=tmp_path / "state", out_dir=writer.out_dir)
    writer.add_probe(ProbeRecord("tune", "ok", "", {"tuning_impact": 2}, 1.0))
    writer.finish()
    where = publish(writer.out_dir, writer.run_id, config)
    assert where == f"published to {dataset}"
    table = ds.dataset(dataset / "table=tuning_impact", format="parquet", partitioning="hive").to_table()
    assert sorted(table.column("item").to_pylist()) == ["kernel.numa_balancing", "vm.stat_interval"]
    assert set(table.column("run_id").to_pylist()) == {writer.run_id}


# ------------------------------------------------------------------------------------------
# audit --profile: the last measured effect beside each kernel row

def test_kernel_probe_carries_the_last_effect_and_warns_on_an_applied_item_that_worsens(tmp_path):
    import shutil
    from pathlib import Path

    from probes.base import ProbeConfig, Window
    from probes.kernel import KernelProbe

    root = tmp_path / "root"
    shutil.copytree(Path(__file__).resolve().parent / "fixtures" / "proc_fake", root, symlinks=True)
    host = Host(root)
    (root / "proc/sys/vm/swappiness").write_text("10\n")  # compliant with trading-latency
    state = tmp_path / "state"
    append_impact([row("vm.swappiness", host=host.hostname(), verdict="worsens", effect=12.5),
                   row("kernel.timer_migration", host=host.hostname(), verdict="improves", effect=-21.0),
                   row("vm.stat_interval", host="some-other-host")], state_dir=state)
    probe = KernelProbe(ProbeConfig(host=host, options={"profile": "trading-latency", "tuning_state_dir": state}))
    tables = probe.collect(Window(0.1, tmp_path))
    rows = {r["item"]: r for r in tables["kernel"].to_pylist()}
    assert rows["vm.swappiness"]["compliant"] is True
    assert rows["vm.swappiness"]["measured_verdict"] == "worsens"
    assert rows["vm.swappiness"]["measured_effect_pct"] == 12.5
    assert rows["vm.swappiness"]["measured_effect_low_pct"] == 5.5 and rows["vm.swappiness"]["measured_run_id"] == "run-1"
    assert rows["kernel.timer_migration"]["measured_verdict"] == "improves"
    assert rows["vm.stat_interval"]["measured_verdict"] is None  # measured on another host only
    findings = {(f["subject"], f["severity"]): f for f in tables["findings"].to_pylist()}
    worse = findings[("vm.swappiness", "warning")]
    assert "worsens: p99_ns +12.5% [+5.5%, +20.5%]" in worse["message"] and "rollback" in worse["recommendation"]
    drifted = next(f for f in tables["findings"].to_pylist() if f["subject"] == "kernel.timer_migration")
    assert "measured here: improves: p99_ns -21.0%" in drifted["message"]
    headlines = KernelProbe.headlines(tables)
    assert headlines[1].startswith("kernel: measured on this host: 2/") and "1 improves, 1 worsens" in headlines[1]
    assert headlines[2].startswith("  kernel.timer_migration: improves")  # largest effect first

    (state / FILE_NAME).write_bytes(b"garbage")
    damaged = probe.collect(Window(0.1, tmp_path))
    assert damaged["kernel"].column("measured_verdict").null_count == damaged["kernel"].num_rows
    assert any(f["subject"] == "tuning impact ledger" for f in damaged["findings"].to_pylist())


def test_audit_profile_shows_measured_effects_in_bundle_summary_and_html(tmp_path):
    import socket

    from tests.conftest import run_agent
    from tests.report_browser import keyed_cells

    state, out = tmp_path / "state", tmp_path / "bundle"
    hostname = Host.real().hostname() or socket.gethostname()
    append_impact([row("vm.swappiness", host=hostname, verdict="no measurable effect", effect=0.3)], state_dir=state)
    result = run_agent("audit", "--duration", "0.5", "--probes", "kernel", "--profile", "postgres-oltp",
                       "--out", str(out), env={"GUARDIAN_AGENT_STATE_DIR": str(state)})
    assert result.returncode == 0, result.stderr
    kernel = {r["item"]: r for r in Bundle(out).table("kernel").to_pylist()}
    assert kernel["vm.swappiness"]["measured_verdict"] == "no measurable effect"
    assert {"item", "current", "expected", "compliant", "source", "reboot_required"} <= set(next(iter(kernel.values())))
    assert "kernel: measured on this host: 1/" in result.stdout
    assert "vm.swappiness: no measurable effect: p99_ns +0.3% [-6.7%, +8.3%]" in result.stdout
    cells = keyed_cells((out / "report.html").read_text())
    assert cells["kernel:vm.swappiness:measured"] == "no measurable effect: p99_ns +0.3% [-6.7%, +8.3%]"
    other = next(item for item in kernel if item != "vm.swappiness")
    assert cells[f"kernel:{other}:measured"] == "not measured"
