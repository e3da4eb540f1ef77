"""`tune experiment` on a real kernel knob with a known effect: the CPU quota of the cgroup the
workload runs in (cgroup v1 cpu.cfs_quota_us here, v2 cpu.max where that is the host's).

The test's own cgroup tree (unique name) starts with the workload's group throttled to 50% of a
10 ms period (about seven cycles run, then one waits for the next period: the median stays among
the fast cycles, the tail among the waits; at 20% only two or three cycles ran per period and the
median flipped between the two modes from window to window, so an idle item read as +59%); the workload wants ~70% of a CPU (a 0.2 ms nap, then a fixed slice of work; one
sample per cycle, in ns). Items: `throttle` (10%: every cycle waits longer), `lift` (no limit),
`idle` (a quota on a sibling group nothing runs in). The effects are 2x and more, so the
thresholds are widened to 60% / 40% (median / p99, gate config) to stay clear of this shared 2-core host's noise
(eight engineers' tests run beside it); the defaults' calibration is benchmarks/bench_tune_experiment.py."""

from __future__ import annotations

import json
import os
import secrets
import sys
from pathlib import Path

import pytest

from tests.conftest import run_agent

V1_CPU = Path("/sys/fs/cgroup/cpu")
V2_ROOT = Path("/sys/fs/cgroup")
PERIOD_US = 10_000
BASE_QUOTA_US = 5_000
WORKER = r"""
import os, sys, time
with open(sys.argv[1] + "/cgroup.procs", "w") as f:
    f.write(str(os.getpid()))
clock = time.perf_counter_ns
end = time.monotonic() + 20
while time.monotonic() < end:
    started = clock()
    time.sleep(0.0002)
    x = 0
    for i in range(10000):
        x += i
    print(clock() - started, flush=True)
"""


class CgroupTree:
    """parent/{work,idle} with a 10 ms period, in whichever hierarchy has the cpu controller."""

    def __init__(self, name: str):
        self.name = name
        self.v1 = (V1_CPU / "cpu.cfs_quota_us").exists()
        self.base = (V1_CPU if self.v1 else V2_ROOT) / name
        self.created: list[Path] = []

    def make(self) -> None:
        if not self.v1:
            if "cpu" not in (V2_ROOT / "cgroup.controllers").read_text().split():
                pytest.fail("no cgroup cpu controller (v1 cpu or v2 cpu) on this host")
            (V2_ROOT / "cgroup.subtree_control").write_text("+cpu")
        for path in (self.base, self.base / "work", self.base / "idle"):
            path.mkdir()
            self.created.append(path)
        if not self.v1:
            (self.base / "cgroup.subtree_control").write_text("+cpu")
        # Our worker wins CPU contention against the other engineers' tests for these seconds.
        self.write(self.base, "cpu.shares" if self.v1 else "cpu.weight", "10240" if self.v1 else "1000")
        for group in ("work", "idle"):
            self.set_quota(group, -1)
        self.set_quota("work", BASE_QUOTA_US)

    def write(self, directory: Path, file: str, value: str) -> None:
        (directory / file).write_text(value)

    def set_quota(self, group: str, quota_us: int) -> None:
        directory = self.base / group
        if self.v1:
            self.write(directory, "cpu.cfs_period_us", str(PERIOD_US))
            self.write(directory, "cpu.cfs_quota_us", str(quota_us))
        else:
            self.write(directory, "cpu.max", f"{'max' if quota_us < 0 else quota_us} {PERIOD_US}")

    def quota_files(self) -> dict[str, bytes]:
        names = ("cpu.cfs_quota_us", "cpu.cfs_period_us") if self.v1 else ("cpu.max",)
        return {f"{group}/{name}": (self.base / group / name).read_bytes()
                for group in ("", "work", "idle") for name in names}

    def remove(self) -> None:
        for path in reversed(self.created):
            if path.exists():
                path.rmdir()


@pytest.fixture
def cgroups():
    tree = CgroupTree(f"guardian-exp-{os.getpid()}-{secrets.token_hex(2)}")
    try:
        tree.make()
        yield tree
    finally:
        tree.remove()


@pytest.mark.live
def test_cpu_quota_items_worsen_improve_and_do_nothing(cgroups, tmp_path):
    profile = tmp_path / "quota.toml"
    profile.write_text(
        f'[cgroup_cpu.throttle]\ncgroup = "{cgroups.name}/work"\nquota_us = 1000\n\n'
        f'[cgroup_cpu.lift]\ncgroup = "{cgroups.name}/work"\nquota_us = -1\n\n'
        f'[cgroup_cpu.idle]\ncgroup = "{cgroups.name}/idle"\nquota_us = 1200\n')
    gate = tmp_path / "gate.toml"
    # The fast cycles' median moves ±30% between windows on this host (measured: +27% for `lift`,
    # whose real effect is p99 −86%): thresholds well above that noise, far below the 2x+ effects.
    gate.write_text('[metrics."tuning.latency_ns"]\nthreshold_pct = 60\n\n'
                    '[metrics."tuning.latency_ns.p99"]\nthreshold_pct = 40\n')
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    state = tmp_path / "state"
    before = cgroups.quota_files()
    result = run_agent("tune", "experiment", "--profile", str(profile), "--per-item", "--rounds", "2",
                       "--window-s", "0.6", "--gate-config", str(gate), "--state-dir", str(state),
                       "--workload", f"{sys.executable} -S {worker} {cgroups.base / 'work'}",
                       "--out", str(tmp_path / "bundle"), "--json", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["item"]: row for row in json.loads(result.stdout)["items"]}
    summary = {item: (row["verdict"], row["metric"], row["effect_pct"]) for item, row in rows.items()}
    assert rows["cgroup_cpu:throttle"]["verdict"] == "worsens", summary
    assert rows["cgroup_cpu:lift"]["verdict"] == "improves", summary
    assert rows["cgroup_cpu:idle"]["verdict"] == "no measurable effect", summary
    assert rows["cgroup_cpu:throttle"]["effect_pct"] > 60 and rows["cgroup_cpu:lift"]["effect_pct"] < -40
    expected = (str(BASE_QUOTA_US), "-1") if cgroups.v1 else (f"{BASE_QUOTA_US} {PERIOD_US}", f"max {PERIOD_US}")
    assert (rows["cgroup_cpu:lift"]["value_before"], rows["cgroup_cpu:lift"]["value_after"]) == expected
    # Every B window was rolled back byte-exact through the journal, nothing is left pending.
    assert cgroups.quota_files() == before
    assert not (state / "journal.jsonl").exists()
    assert len(list((state / "history").glob("*.jsonl"))) == 3 * 2
    assert not (cgroups.base / "work" / "cgroup.procs").read_text().strip()  # the worker is gone
