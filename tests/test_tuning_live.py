"""Apply and rollback on the real /proc/sys of this machine.

net.* values are changed inside a fresh network namespace (`ip netns add`), where they are
per-namespace: the host's own network settings are never touched. The built-in trading-latency
profile is then applied and rolled back for real on the host (vm.*, kernel.*, THP, the PM QoS
holder), with a safety net that puts back any byte the rollback missed.
"""

from __future__ import annotations

import os
import secrets
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from core.host import Host
from probes.kernel_tuning.plan import build_plan
from probes.kernel_tuning.profiles import load_profile
from tests.conftest import PROJECT_ROOT, run_agent

pytestmark = pytest.mark.live

NET_PROFILE = """
[sysctl."net.core.somaxconn"]
value = 1024
[sysctl."net.ipv4.ip_local_port_range"]
value = "20000 40000"
why = "a multi-value sysctl: the kernel prints it tab-separated"
[sysctl."net.ipv4.tcp_fastopen"]
value = 3
"""
NET_KEYS = ("net/core/somaxconn", "net/ipv4/ip_local_port_range", "net/ipv4/tcp_fastopen",
            "net/ipv4/tcp_syn_retries")


@pytest.fixture
def netns():
    if shutil.which("ip") is None:
        pytest.skip("LIVE TEST SKIPPED: `ip` (iproute2) missing; run `make setup`")
    name = f"ga-tune-{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False)


def in_netns(netns: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT), **(env or {}))
    return subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-m", "agent.cli", *args],
                          capture_output=True, text=True, timeout=60, env=full_env, cwd=PROJECT_ROOT)


def netns_values(netns: str) -> dict[str, bytes]:
    script = "import sys\nfor k in sys.argv[1:]: sys.stdout.buffer.write(open('/proc/sys/'+k,'rb').read() + b'|')"
    out = subprocess.run(["ip", "netns", "exec", netns, sys.executable, "-c", script, *NET_KEYS],
                         capture_output=True, check=True).stdout
    return dict(zip(NET_KEYS, out.split(b"|")[:-1]))


@pytest.fixture
def profile_file(tmp_path):
    path = tmp_path / "net-test.toml"
    path.write_text(NET_PROFILE)
    return path


def test_netns_apply_rollback_byte_identical(netns, profile_file, tmp_path):
    state = str(tmp_path / "state")
    before = netns_values(netns)
    assert b"\t" in before["net/ipv4/ip_local_port_range"]
    applied = in_netns(netns, "tune", "apply", "--profile", str(profile_file), "--yes", "--state-dir", state)
    assert applied.returncode == 0, applied.stderr
    during = netns_values(netns)
    assert during["net/core/somaxconn"] == b"1024\n"
    assert during["net/ipv4/ip_local_port_range"] == b"20000\t40000\n"
    assert Path("/proc/sys/net/core/somaxconn").read_bytes() != b"1024\n" or before["net/core/somaxconn"] == b"1024\n"
    plan = in_netns(netns, "tune", "plan", "--profile", str(profile_file))
    assert plan.returncode == 0, plan.stdout  # compliant now
    rolled = in_netns(netns, "tune", "rollback", "--state-dir", state)
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert netns_values(netns) == before


def test_netns_einval_mid_apply_rolls_back_everything(netns, profile_file, tmp_path):
    state = tmp_path / "state"
    profile_file.write_text(NET_PROFILE + '[sysctl."net.ipv4.tcp_syn_retries"]\nvalue = 500\n')
    before = netns_values(netns)
    result = in_netns(netns, "tune", "apply", "--profile", str(profile_file), "--yes", "--state-dir", str(state))
    assert result.returncode == 1
    assert "net.ipv4.tcp_syn_retries: the kernel refused '500'" in result.stderr
    assert "EINVAL" in result.stderr and "rolled back 3 value(s)" in result.stderr
    assert netns_values(netns) == before
    assert not (state / "journal.jsonl").exists()  # archived: nothing is pending


def test_netns_kill_9_after_write_then_rollback(netns, profile_file, tmp_path):
    state = str(tmp_path / "state")
    before = netns_values(netns)
    killed = in_netns(netns, "tune", "apply", "--profile", str(profile_file), "--yes", "--state-dir", state,
                      env={"GUARDIAN_AGENT_TEST_KILL_AT": "write:2"})
    assert killed.returncode in (-9, 137), killed.stderr
    assert netns_values(netns)["net/ipv4/ip_local_port_range"] == b"20000\t40000\n"
    rolled = in_netns(netns, "tune", "rollback", "--state-dir", state)
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert netns_values(netns) == before



def test_netns_kill_9_during_rollback_then_rollback_again(netns, profile_file, tmp_path):
    """A rollback killed between restoring a value and journaling it is simply run again: steps
    already restored read as the original and are left alone, the rest are restored."""
    state = str(tmp_path / "state")
    before = netns_values(netns)
    applied = in_netns(netns, "tune", "apply", "--profile", str(profile_file), "--yes", "--state-dir", state)
    assert applied.returncode == 0, applied.stderr
    # Rollback walks the steps backwards (3, 2, 1): die right after restoring step 2.
    killed = in_netns(netns, "tune", "rollback", "--state-dir", state, env={"GUARDIAN_AGENT_TEST_KILL_AT": "undo:2"})
    assert killed.returncode in (-9, 137), killed.stderr
    halfway = netns_values(netns)
    assert halfway["net/core/somaxconn"] == b"1024\n", "step 1 not reached before the kill"
    assert halfway["net/ipv4/ip_local_port_range"] == before["net/ipv4/ip_local_port_range"]
    assert (tmp_path / "state" / "journal.jsonl").exists(), "the cut-short rollback stays pending"
    again = in_netns(netns, "tune", "rollback", "--state-dir", state)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 restored" in again.stdout and "0 failed" in again.stdout, again.stdout
    assert netns_values(netns) == before
    assert not (tmp_path / "state" / "journal.jsonl").exists()
    assert list((tmp_path / "state" / "history").glob("*.jsonl"))

def test_netns_third_party_drift_is_reported_and_kept(netns, profile_file, tmp_path):
    state = str(tmp_path / "state")
    before = netns_values(netns)
    assert in_netns(netns, "tune", "apply", "--profile", str(profile_file), "--yes", "--state-dir", state).returncode == 0
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-q", "-w", "net.core.somaxconn=2048"], check=True)
    rolled = in_netns(netns, "tune", "rollback", "--state-dir", state)
    assert rolled.returncode == 3
    assert "kept         net.core.somaxconn  (changed by someone else since apply: now '2048'" in rolled.stdout
    after = netns_values(netns)
    assert after["net/core/somaxconn"] == b"2048\n"
    assert after["net/ipv4/ip_local_port_range"] == before["net/ipv4/ip_local_port_range"]


def dma_latency_us() -> int:
    with open("/dev/cpu_dma_latency", "rb") as handle:
        return struct.unpack("i", handle.read(4))[0]


def test_real_host_trading_latency_apply_rollback_exact(tmp_path):
    """The built-in profile on the real /proc/sys, /sys and /dev/cpu_dma_latency of this host."""
    host = Host.real()
    plan = build_plan(host, load_profile("trading-latency", host=host))
    paths = sorted({action.path for item in plan.applicable for action in item.actions if action.op == "write"})
    assert paths, "nothing to apply: the host is already tuned; this test needs drift to prove rollback"
    before = {path: Path(path).read_bytes() for path in paths}
    latency_before = dma_latency_us()
    state = tmp_path / "state"
    try:
        applied = run_agent("tune", "apply", "--profile", "trading-latency", "--yes", "--state-dir", str(state))
        assert applied.returncode == 0, applied.stderr
        assert Path("/proc/sys/kernel/timer_migration").read_bytes() == b"0\n"
        assert Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().split().count("[never]") == 1
        if any(item.kind == "pm_qos" for item in plan.applicable):
            assert dma_latency_us() == 0  # held by the holder process after the CLI exited
        status = run_agent("tune", "status", "--state-dir", str(state))
        assert status.returncode == 0 and "drifted" not in status.stdout, status.stdout
        rolled = run_agent("tune", "rollback", "--state-dir", str(state))
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        assert {path: Path(path).read_bytes() for path in paths} == before
        assert dma_latency_us() == latency_before
    finally:
        for path, original in before.items():  # safety net: never leave the shared host tuned
            if Path(path).read_bytes() != original:
                word = original.decode().split()
                selected = [w[1:-1] for w in word if w.startswith("[")]
                Path(path).write_bytes((selected[0] + "\n").encode() if selected else original)
        if (state / "journal.jsonl").exists():
            run_agent("tune", "rollback", "--force", "--state-dir", str(state))


def test_real_workqueue_mask_and_cpuset_apply_rollback(tmp_path):
    """cpu-isolation's runtime pieces on the real sysfs and cgroupfs: a hex cpumask and a cpuset
    directory whose control files vanish with it (they cannot be unlinked one by one)."""
    host = Host.real()
    housekeeping = str(host.online_cpus()[0])
    profile = tmp_path / "iso-lite.toml"
    name = f"ga-test-{secrets.token_hex(3)}"
    profile.write_text(f"""
[variables.housekeeping_cores]
type = "cpulist"
required = true
[sysfs.workqueue_cpumask]
path = "/sys/devices/virtual/workqueue/cpumask"
value = "${{housekeeping_cores}}"
format = "cpumask"
[cpuset.{name}]
cpus = "${{housekeeping_cores}}"
""")
    plan = build_plan(host, load_profile(str(profile), variables={"housekeeping_cores": housekeeping}, host=host))
    cpuset = next(item for item in plan.items if item.kind == "cpuset")
    if cpuset.compliant is None:
        pytest.skip(f"LIVE TEST SKIPPED: {cpuset.note}")
    directory = Path(cpuset.source)
    mask = Path("/sys/devices/virtual/workqueue/cpumask")
    before = mask.read_bytes()
    state = str(tmp_path / "state")
    try:
        applied = run_agent("tune", "apply", "--profile", str(profile), "--var", f"housekeeping_cores={housekeeping}",
                            "--yes", "--state-dir", state)
        assert applied.returncode == 0, applied.stderr
        assert (directory / "cpuset.cpus").read_text().strip() == housekeeping
        assert int(mask.read_text().replace(",", ""), 16) == 1 << int(housekeeping)
        rolled = run_agent("tune", "rollback", "--state-dir", state)
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        assert mask.read_bytes() == before and not directory.exists()
    finally:
        if mask.read_bytes() != before:
            mask.write_bytes(before)
        if directory.exists():
            directory.rmdir()


def test_pm_qos_holder_outlives_kill_9_and_rollback_releases_it(tmp_path):
    """/dev/cpu_dma_latency only holds while a process keeps it open: the holder must survive a
    kill -9 of apply (after it started, before `done` was journaled) and rollback must find it
    by its token and release the request."""
    if not Path("/dev/cpu_dma_latency").exists():
        pytest.skip("LIVE TEST SKIPPED: /dev/cpu_dma_latency missing (kernel without PM QoS)")
    before = dma_latency_us()
    if before <= 20:
        pytest.skip(f"LIVE TEST SKIPPED: someone already holds a {before} us request; cannot tell ours apart")
    profile = tmp_path / "qos.toml"
    profile.write_text("[pm_qos.cpu_dma_latency]\nvalue_us = 20\n")
    state = tmp_path / "state"
    try:
        killed = run_agent("tune", "apply", "--profile", str(profile), "--yes", "--state-dir", str(state),
                           env={"GUARDIAN_AGENT_TEST_KILL_AT": "write:1"})
        assert killed.returncode == -9, killed.stderr
        assert dma_latency_us() == 20  # the holder outlived the killed CLI
        rolled = run_agent("tune", "rollback", "--state-dir", str(state))
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        assert "PM QoS holder stopped" in rolled.stdout
        assert dma_latency_us() == before
    finally:
        from agent.tuning.actions import stop_holders

        if (state / "journal.jsonl").exists():
            stop_holders("guardian-qos-")


def test_real_irq_affinity_apply_rollback_exact(tmp_path):
    """[irq_affinity] on this host's real /proc/irq: every IRQ that accepts a new affinity moves
    to the housekeeping CPU, refusals are reported and kept, and rollback restores every byte."""
    host = Host.real()
    online = host.online_cpus()
    if len(online) < 2:
        pytest.skip("LIVE TEST SKIPPED: one online CPU: IRQs have nowhere else to go")
    housekeeping = str(online[0])
    profile = tmp_path / "irq.toml"
    profile.write_text(f'[irq_affinity]\ncpus = "{housekeeping}"\n')
    plan = build_plan(host, load_profile(str(profile), host=host))
    paths = sorted({action.path for item in plan.applicable for action in item.actions if action.op == "write"})
    assert "/proc/irq/default_smp_affinity" in paths and len(paths) > 1, paths
    before = {path: Path(path).read_bytes() for path in paths}
    state = str(tmp_path / "state")
    try:
        applied = run_agent("tune", "apply", "--profile", str(profile), "--yes", "--state-dir", state)
        assert applied.returncode == 0, applied.stdout + applied.stderr
        moved = [path for path in paths if path.endswith("smp_affinity_list")
                 and Path(path).read_text().strip() == housekeeping]
        refused = [path for path in paths if path.endswith("smp_affinity_list") and path not in moved]
        assert moved, "no IRQ accepted the new affinity"
        for path in refused:  # untouched, and said so
            assert Path(path).read_bytes() == before[path]
            assert f"irq:{path.split('/')[3]}" in applied.stdout
        assert int(Path("/proc/irq/default_smp_affinity").read_text().replace(",", ""), 16) == 1 << int(housekeeping)
        rolled = run_agent("tune", "rollback", "--state-dir", state)
        assert rolled.returncode == 0, rolled.stdout + rolled.stderr
        assert {path: Path(path).read_bytes() for path in paths} == before
    finally:
        for path, original in before.items():  # safety net: never leave the shared host's IRQs moved
            if Path(path).read_bytes() != original:
                try:
                    Path(path).write_bytes(original)
                except OSError:
                    pass
