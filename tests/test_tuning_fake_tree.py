"""Plan, apply, rollback and status on a fake /proc + /sys tree (tests/fixtures/proc_fake), through
the real CLI in a subprocess. Crash safety uses a real SIGKILL of the apply at every step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from core.host import Host
from agent.tuning.engine import Engine
from agent.tuning.journal import StateDir, read_journal
from probes.kernel_tuning.plan import build_plan
from probes.kernel_tuning.profiles import load_profile
from probes.base import ProbeConfig, Window
from probes.kernel import KernelProbe
from tests.conftest import run_agent

FAKE = Path(__file__).resolve().parent / "fixtures" / "proc_fake"


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file's bytes and every directory, to prove a rollback is byte-identical."""
    result: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        result[str(path.relative_to(root))] = None if path.is_dir() else path.read_bytes()
    return result


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    shutil.copytree(FAKE, root, symlinks=True)
    state = tmp_path / "state"
    return root, state


def tune(root: Path, state: Path, *args: str, env: dict | None = None):
    return run_agent("tune", *args, "--root", str(root), "--state-dir", str(state), env=env, timeout=60)


def test_plan_reports_sources_reboot_lines_and_topology(tree):
    root, state = tree
    result = tune(root, state, "plan", "--profile", "cpu-isolation", "--var", "isolated_cores=2", "--json")
    assert result.returncode == 3, result.stderr
    plan = json.loads(result.stdout)
    items = {item["item"]: item for item in plan["items"]}
    assert items["cmdline:isolcpus"]["current"] == "isolcpus=2-3"
    assert items["cmdline:isolcpus"]["status"] == "reboot" and items["cmdline:isolcpus"]["reboot_required"]
    assert items["cmdline:skew_tick"]["status"] == "ok"
    assert "isolcpus=managed_irq,domain,2 nohz_full=2 rcu_nocbs=2 irqaffinity=0-1,3" == plan["cmdline_add"]
    assert items["topology:smt:cpu2"]["compliant"] is False and "sibling cpu 0" in items["topology:smt:cpu2"]["note"]
    assert items["irq:1"]["status"] == "ok"  # affinity 0 is inside the housekeeping set
    assert items["irq:24"]["status"] == "drift"
    assert items["irq:default_smp_affinity"]["current"] == "f (cpus 0-3)"
    trading = json.loads(tune(root, state, "plan", "--profile", "trading-latency", "--json").stdout)
    rows = {item["item"]: item for item in trading["items"]}
    assert rows["vm.swappiness"]["source"] == "/etc/sysctl.d/99-late.conf:1"
    assert rows["net.core.busy_poll"]["source"] == "/etc/sysctl.d/10-base.conf:3"
    assert rows["kernel.timer_migration"]["source"] == "kernel default"
    assert rows["sysfs:thp_enabled"]["current"] == "madvise"
    assert rows["pm_qos:cpu_dma_latency"]["status"] == "n/a"  # a plain file is not the PM QoS device


def test_apply_persist_rollback_is_byte_identical(tree):
    root, state = tree
    before = snapshot(root)
    shown = tune(root, state, "apply", "--profile", "trading-latency")
    assert shown.returncode == 0 and "re-run with --yes" in shown.stdout
    assert snapshot(root) == before and not (state / "journal.jsonl").exists()

    applied = tune(root, state, "apply", "--profile", "trading-latency", "--yes", "--persist")
    assert applied.returncode == 0, applied.stderr
    assert (root / "proc/sys/vm/swappiness").read_bytes() == b"10\n"
    assert (root / "sys/kernel/mm/transparent_hugepage/enabled").read_bytes() == b"never\n"
    assert "99-late.conf:1 sets 60" in applied.stderr  # the boot-time override warning
    persisted = (root / "etc/sysctl.d/90-guardian-agent.conf").read_text()
    assert "vm.swappiness = 10" in persisted

    stacked = tune(root, state, "apply", "--profile", "postgres-oltp", "--yes")
    assert stacked.returncode == 2 and "journal is pending" in stacked.stderr

    status = tune(root, state, "status", "--json")
    assert status.returncode == 0
    assert all(row["state"] == "applied" for row in json.loads(status.stdout)["steps"])

    rolled = tune(root, state, "rollback")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert snapshot(root) == before
    assert not (state / "journal.jsonl").exists() and len(list((state / "history").iterdir())) == 1


def test_cpu_isolation_apply_rollback_creates_and_removes_cpuset(tree):
    root, state = tree
    before = snapshot(root)
    result = tune(root, state, "apply", "--profile", "cpu-isolation", "--var", "isolated_cores=2-3", "--yes")
    assert result.returncode == 0, result.stderr
    assert (root / "proc/irq/24/smp_affinity_list").read_bytes() == b"0-1\n"
    assert (root / "proc/irq/default_smp_affinity").read_bytes() == b"3\n"
    assert (root / "sys/devices/virtual/workqueue/cpumask").read_bytes() == b"3\n"
    assert (root / "sys/fs/cgroup/cpuset/guardian-housekeeping/cpuset.cpus").read_bytes() == b"0-1\n"
    assert "need a reboot" in result.stdout and "nohz_full=2-3" in result.stdout
    assert tune(root, state, "rollback").returncode == 0
    assert snapshot(root) == before


def test_drift_is_reported_and_kept_unless_forced(tree):
    root, state = tree
    assert tune(root, state, "apply", "--profile", "trading-latency", "--yes").returncode == 0
    (root / "proc/sys/vm/swappiness").write_text("33\n")  # a third party
    status = tune(root, state, "status")
    assert status.returncode == 3 and "drifted          vm.swappiness  (now '33')" in status.stdout
    rolled = tune(root, state, "rollback")
    assert rolled.returncode == 3
    assert "kept         vm.swappiness  (changed by someone else since apply: now '33'" in rolled.stdout
    assert (root / "proc/sys/vm/swappiness").read_bytes() == b"33\n"
    assert (root / "proc/sys/kernel/timer_migration").read_bytes() == b"1\n"

    assert tune(root, state, "apply", "--profile", "trading-latency", "--yes").returncode == 0
    (root / "proc/sys/vm/swappiness").write_text("34\n")
    forced = tune(root, state, "rollback", "--force")
    assert forced.returncode == 0 and "forced       vm.swappiness" in forced.stdout
    assert (root / "proc/sys/vm/swappiness").read_bytes() == b"33\n"  # the original of the 2nd apply


def _steps(root: Path) -> int:
    plan = build_plan(Host(root), load_profile("trading-latency", host=Host(root)))
    return sum(len(item.actions) for item in plan.applicable) + 1  # + the persist file


@pytest.mark.parametrize("stage", ["begin", "intent:1", "write:1", "done:1", "intent:9", "write:9",
                                   "intent:LAST", "write:LAST"])
def test_kill_9_at_every_step_then_rollback_restores_exactly(tree, stage):
    root, state = tree
    before = snapshot(root)
    stage = stage.replace("LAST", str(_steps(root)))
    killed = tune(root, state, "apply", "--profile", "trading-latency", "--yes", "--persist",
                  env={"GUARDIAN_AGENT_TEST_KILL_AT": stage})
    assert killed.returncode == -9, (stage, killed.stderr)
    journal = read_journal(state / "journal.jsonl")
    assert not journal.finished
    if stage.startswith("write:"):  # the value is written but `done` never reached the journal
        seq = int(stage.split(":")[1])
        assert seq not in journal.done and journal.intents[-1]["seq"] == seq
        written = journal.intents[-1]["action"]["path"]
        assert (root / written.lstrip("/")).read_bytes() != before.get(written.lstrip("/"))
    status = tune(root, state, "status")
    assert "DID NOT FINISH" in status.stdout
    refused = tune(root, state, "apply", "--profile", "trading-latency", "--yes")
    assert refused.returncode == 2
    rolled = tune(root, state, "rollback")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert snapshot(root) == before


def test_torn_journal_tail_and_earlier_boot(tree):
    root, state = tree
    assert tune(root, state, "apply", "--profile", "trading-latency", "--yes", "--persist").returncode == 0
    with open(state / "journal.jsonl", "ab") as handle:
        handle.write(b'{"op":"intent","seq":99,"ite')  # a crash mid-record
    assert read_journal(state / "journal.jsonl").torn_tail
    (root / "proc/sys/kernel/random/boot_id").write_text("00000000-1111-2222-3333-444444444444\n")
    status = json.loads(tune(root, state, "status", "--json").stdout)
    assert status["boot"] == "earlier boot"
    rolled = tune(root, state, "rollback")
    assert rolled.returncode == 0, rolled.stderr
    assert "not replayed" in rolled.stdout
    assert not (root / "etc/sysctl.d/90-guardian-agent.conf").exists()  # the file is restored
    assert (root / "proc/sys/vm/swappiness").read_bytes() == b"10\n"  # runtime values are not replayed


def test_bad_input_is_one_line_exit_2(tree, tmp_path):
    root, state = tree
    bad = tmp_path / "bad.toml"
    bad.write_text('[sysctl."vm.swappiness"]\nvalue = 1\nwhy = 3\n')
    result = tune(root, state, "plan", "--profile", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and f'{bad}:3: sysctl."vm.swappiness".why' in result.stderr
    nothing = tune(root, state, "rollback")
    assert nothing.returncode == 2 and "nothing to roll back" in nothing.stderr
    assert tune(root, state, "apply", "--profile", "trading-latency", "--yes").returncode == 0
    elsewhere = run_agent("tune", "rollback", "--force", "--state-dir", str(state))  # no --root: the real host
    assert elsewhere.returncode == 2 and f"applied to host root {root}" in elsewhere.stderr
    assert tune(root, state, "rollback").returncode == 0


def test_kernel_probe_table_and_findings(tree):
    root, _ = tree
    host = Host(root)
    unavailable = KernelProbe(ProbeConfig(host=host))
    with pytest.raises(Exception, match="needs --profile"):
        unavailable.check()
    probe = KernelProbe(ProbeConfig(host=host, options={"profile": "cpu-isolation",
                                                        "profile_vars": {"isolated_cores": "2-3"}}))
    probe.check()
    tables = probe.collect(Window(0.1, root))
    kernel = tables["kernel"]
    assert {"item", "current", "expected", "compliant", "source", "reboot_required"} <= set(kernel.schema.names)
    rows = {row["item"]: row for row in kernel.to_pylist()}
    assert rows["cmdline:nohz_full"]["compliant"] is False and rows["cmdline:nohz_full"]["reboot_required"]
    assert rows["cmdline:isolcpus"]["compliant"] is False  # 2-3 without managed_irq,domain flags
    findings = tables["findings"].to_pylist()
    assert any(f["subject"] == "cmdline:nohz_full" and "reboot" in f["recommendation"] for f in findings)
    assert KernelProbe.headlines(tables)[0].startswith("kernel: profile cpu-isolation:")


def test_engine_refuses_stacking_in_process(tree):
    root, state = tree
    host = Host(root)
    engine = Engine(host, StateDir(state))
    plan = build_plan(host, load_profile("postgres-oltp", host=host))
    report = engine.apply(plan)
    assert [s.result for s in report.steps].count("applied") == len(report.steps) > 0
    # vm.dirty_bytes: original 0 is restored through its companion vm.dirty_ratio (the kernel
    # refuses 0 for *_bytes); the journal carries the companion's original too.
    journal = read_journal(state / "journal.jsonl")
    dirty = next(i for i in journal.intents if i["item"] == "vm.dirty_bytes")
    assert dirty["action"]["companion"] == "/proc/sys/vm/dirty_ratio"
    engine.rollback()
    assert (root / "proc/sys/vm/dirty_bytes").read_bytes() == b"0\n"
    assert (root / "proc/sys/vm/dirty_ratio").read_bytes() == b"20\n"


def test_audit_profile_adds_kernel_table_to_bundle(tree, tmp_path):
    from reports.bundle import Bundle

    out = tmp_path / "bundle"
    result = run_agent("audit", "--duration", "0.5", "--probes", "kernel", "--profile", "postgres-oltp",
                       "--out", str(out))
    assert result.returncode == 0, result.stderr
    bundle = Bundle(out)
    assert bundle.probe("kernel")["status"] == "ok"
    kernel = bundle.table("kernel")
    assert kernel.num_rows > 0 and {"item", "current", "expected", "compliant", "source",
                                    "reboot_required"} <= set(kernel.schema.names)
    assert bundle.manifest["host"]["tuning_profile"] == "postgres-oltp"
    assert "kernel: profile postgres-oltp:" in result.stdout
