"""`tune experiment` on a fake /proc + /sys tree with a workload whose latency depends on the
tree's values: exact verdicts, --keep, a SIGKILL at every experiment phase finished byte-exact by
`tune rollback`, and bad input refused before anything changes. The real kernel knob (a cgroup
CPU quota) is in tests/test_tune_experiment_live.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import PROJECT_ROOT, run_agent
from tests.test_tuning_fake_tree import snapshot
from tests.test_tuning_lose_nothing import tree, tune, write_profile  # noqa: F401 - the fixture

PROFILE = """
[sysctl."vm.stat_interval"]
value = 10
[sysctl."vm.swappiness"]
value = 10
[sysctl."vm.compaction_proactiveness"]
value = 0
"""
# Latency ~1000 ns; vm.stat_interval=10 makes it 40% faster, vm.swappiness=10 50% slower,
# vm.compaction_proactiveness is read by nobody. Gaussian noise, so nothing is constant.
WORKLOAD = r"""
import random, sys, time
root = sys.argv[1]
end = time.monotonic() + 20
while time.monotonic() < end:
    stat = int(open(root + "/proc/sys/vm/stat_interval").read())
    swap = int(open(root + "/proc/sys/vm/swappiness").read())
    base = (600 if stat == 10 else 1000) * (1.5 if swap == 10 else 1.0)
    sys.stdout.write("".join(f"{int(random.gauss(base, 40))}\n" for _ in range(100)))
    sys.stdout.flush()
    time.sleep(0.005)
"""
# Apply's own kill points (intent:N, write:N ...) are tests/test_tuning_lose_nothing.py's.
KILL_PHASES = ["experiment:checked", "experiment:applied:1.1", "experiment:measuring:1.1",
               "experiment:measured:1.1", "experiment:rolled-back:1.1", "experiment:judged", "experiment:kept"]


def _workload(tmp_path: Path, root: Path) -> str:
    script = tmp_path / "workload.py"
    script.write_text(WORKLOAD)
    return f"{sys.executable} -S {script} {root}"


def _experiment_args(profile: Path, workload: str, *extra: str) -> list[str]:
    return ["experiment", "--profile", str(profile), "--workload", workload, "--rounds", "2",
            "--window-s", "0.3", *extra]


def test_verdicts_keep_bundle_and_a_pending_journal_refuses_the_next_run(tree, tmp_path):
    root, state = tree
    before = snapshot(root)
    profile = write_profile(tmp_path, PROFILE)
    out = tmp_path / "bundle"
    dataset = tmp_path / "dataset"
    config = tmp_path / "agent.toml"
    config.write_text(f'[dataset]\nroot = "{dataset}"\nspool_dir = "{tmp_path / "spool"}"\n')
    result = tune(root, state, *_experiment_args(profile, _workload(tmp_path, root), "--per-item", "--keep",
                                                 "--json", "--out", str(out), "--config", str(config)))
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    verdicts = {row["item"]: row for row in summary["items"]}
    assert verdicts["vm.stat_interval"]["verdict"] == "improves"
    assert verdicts["vm.swappiness"]["verdict"] == "worsens"
    assert verdicts["vm.compaction_proactiveness"]["verdict"] == "no measurable effect"
    assert -45 < verdicts["vm.stat_interval"]["effect_pct"] < -35
    assert 45 < verdicts["vm.swappiness"]["effect_pct"] < 55
    assert verdicts["vm.stat_interval"]["effect_low_pct"] <= verdicts["vm.stat_interval"]["effect_pct"] \
        <= verdicts["vm.stat_interval"]["effect_high_pct"]
    assert summary["kept"] == ["vm.stat_interval"]
    assert any(m.startswith("vm.stat_interval=10: p50 latency −4") for m in summary["findings"]), summary["findings"]
    assert "vm.compaction_proactiveness: no measurable effect on this workload" in " ".join(summary["findings"])
    # Only the improving item stays applied, through a pending journal.
    assert (root / "proc/sys/vm/stat_interval").read_bytes() == b"10\n"
    assert (root / "proc/sys/vm/swappiness").read_bytes() == before["proc/sys/vm/swappiness"]
    samples = pq.read_table(out / "tuning_samples.parquet").to_pylist()
    windows = {(r["item"], r["round"], r["arm"], r["window"]) for r in samples}
    assert len(windows) == 12  # 3 items x 2 rounds x A/B
    order = [arm for item, _, arm, _ in sorted(windows, key=lambda w: w[3]) if item == "vm.swappiness"]
    assert order == ["A", "B", "B", "A"]
    impact = pq.read_table(out / "tuning_impact.parquet").to_pylist()
    assert {r["item"]: r["verdict"] for r in impact} == {k: v["verdict"] for k, v in verdicts.items()}
    assert impact[0]["value_before"] == "1" and impact[0]["value_after"] == "10"
    # The rows join the fleet dataset (the agent config's [dataset]) and this host's ledger.
    assert summary["published"] == f"published to {dataset}"
    in_dataset = pq.ParquetDataset(dataset / "table=tuning_impact").read().to_pylist()
    assert sorted(r["item"] for r in in_dataset) == sorted(verdicts)
    from agent.tuning.ledger import last_effects

    assert last_effects(state, impact[0]["host"])["vm.swappiness"]["verdict"] == "worsens"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["tune_experiment"]["verdicts"]["vm.swappiness"] == "worsens"
    assert len(list((state / "decisions").glob("*.parquet"))) == 3
    again = tune(root, state, *_experiment_args(profile, _workload(tmp_path, root)))
    assert again.returncode == 2 and "a tuning journal is pending" in again.stderr
    assert again.stderr.count("\n") == 1
    assert tune(root, state, "rollback").returncode == 0 and snapshot(root) == before
    _report_shows_the_verdicts(out, tmp_path)


def _report_shows_the_verdicts(bundle: Path, tmp_path: Path) -> None:
    """`report` of a tune experiment bundle: loads in Chromium and shows each item's verdict."""
    from tests.conftest import run_agent
    from tests.report_browser import check_page, chromium_missing_reason

    result = run_agent("report", str(bundle))
    assert result.returncode == 0, result.stderr
    if chromium_missing_reason():
        pytest.skip(chromium_missing_reason())
    cells = check_page(bundle / "report.html", tmp_path)
    verdicts = pq.read_table(bundle / "tuning_verdicts.parquet").to_pylist()
    assert [cells[f"tuning_verdicts:{i}:verdict"] for i in range(len(verdicts))] == [r["verdict"] for r in verdicts]
    assert [cells[f"tuning_verdicts:{i}:item"] for i in range(len(verdicts))] == [r["item"] for r in verdicts]


def test_sigkill_at_every_phase_is_finished_byte_exact_by_tune_rollback(tree, tmp_path):
    """Every phase in its own copy of the tree, killed side by side (one wall-clock run)."""
    import shutil

    root, _ = tree
    profile = write_profile(tmp_path, PROFILE)
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = []
    for index, phase in enumerate(KILL_PHASES):
        copy, state = tmp_path / f"root{index}", tmp_path / f"state{index}"
        shutil.copytree(root, copy, symlinks=True)
        args = ["tune", *_experiment_args(profile, _workload(tmp_path, copy), "--per-item", "--keep",
                                          "--out", str(tmp_path / f"out{index}")),
                "--root", str(copy), "--state-dir", str(state)]
        process = subprocess.Popen([sys.executable, "-m", "agent.cli", *args], cwd=PROJECT_ROOT,
                                   env=dict(env, GUARDIAN_AGENT_TEST_KILL_AT=phase),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        runs.append((phase, copy, state, snapshot(copy), process))
    rollbacks = []
    for phase, copy, state, before, process in runs:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == -9, (phase, stderr)
        journal = state / "journal.jsonl"
        if phase in ("experiment:checked", "experiment:rolled-back:1.1", "experiment:judged"):
            assert not journal.exists() and snapshot(copy) == before, phase
            continue
        assert journal.stat().st_size > 0, phase  # pending: `tune rollback` has work to do
        rollbacks.append((phase, copy, before, subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "tune", "rollback", "--root", str(copy), "--state-dir", str(state)],
            cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for phase, copy, before, process in rollbacks:
        stdout, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, (phase, stdout, stderr)
        assert snapshot(copy) == before, phase
    assert len(rollbacks) == 4


class _Refusing(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - http.server's name
        self.send_response(503)
        self.end_headers()

    def log_message(self, *args):
        pass


def test_bad_input_is_one_line_exit_2_and_nothing_changes(tree, tmp_path, free_port, cli_runner, monkeypatch):
    from agent.tuning import workloads

    # The silent workload is given up after the start grace: 2 s (still far above the `python -S`
    # start-up the "fast" case needs, even on a loaded host) instead of the product's 5 s
    # proves the same refusal (exit 2, one line, nothing changed) 3 s sooner.
    monkeypatch.setattr(workloads, "START_GRACE_S", 2.0)
    root, state = tree
    before = snapshot(root)
    profile = write_profile(tmp_path, PROFILE)
    garbage = tmp_path / "garbage.py"
    garbage.write_text("import sys, time\nprint('fast', flush=True)\ntime.sleep(5)\n")
    silent = tmp_path / "silent.py"
    silent.write_text("import time\ntime.sleep(30)\n")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    good = _workload(tmp_path, root)
    cases = [
        (["--items", "vm.nosuch"], good, "unknown item 'vm.nosuch'"),
        ([], f"{sys.executable} -S {garbage}", "printed 'fast': not a latency"),
        ([], f"{sys.executable} -S {silent}", "printed no latency sample within 2 s"),
        (["--rounds", "1"], good, "--rounds"),
        (["--window-s", "nan"], good, "--window-s"),
        (["--kpi-url", f"http://127.0.0.1:{free_port}/"], None, "Connection refused"),
        (["--kpi-url", f"http://127.0.0.1:{server.server_address[1]}/"], None, "answers HTTP 503"),
        (["--kpi", "nosuch"], None, "--kpi"),
    ]
    try:
        for extra, workload, expected in cases:
            args = ["experiment", "--profile", str(profile), "--rounds", "2", "--window-s", "0.3"]
            if workload:
                args += ["--workload", workload]
            # later flags win in click: --rounds 1 / --window-s nan override the defaults above
            result = cli_runner.invoke(["tune", *args, *extra, "--root", str(root), "--state-dir", str(state)])
            lines = [line for line in result.output.splitlines() if line.strip()]
            assert result.exit_code == 2, (extra, result.output)
            assert len(lines) == 1 and expected in lines[0], (extra, result.output)
            assert snapshot(root) == before and not (state / "journal.jsonl").exists()
    finally:
        server.shutdown()


class _Answering(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):  # noqa: N802 - http.server's name
        body = b"ok"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.live
def test_builtin_and_url_workloads_measure_real_latencies(tree, tmp_path):
    """loopback-rtt, syscall, timer-jitter and --kpi-url side by side (each on its own tree copy,
    the item one nothing reads): real samples in plausible ranges, every window rolled back."""
    import shutil

    root, _ = tree
    profile = write_profile(tmp_path, PROFILE)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Answering)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # (workload flags, plausible p50 range in ns)
    workloads = {"loopback-rtt": (["--kpi", "loopback-rtt"], (1_000, 10_000_000)),
                 "syscall": (["--kpi", "syscall"], (20, 100_000)),
                 "timer-jitter": (["--kpi", "timer-jitter"], (1_000, 10_000_000)),
                 "url": (["--kpi-url", f"http://127.0.0.1:{server.server_address[1]}/"], (10_000, 100_000_000))}
    runs = []
    try:
        for name, (flags, _) in workloads.items():
            copy, state = tmp_path / f"root-{name}", tmp_path / f"state-{name}"
            shutil.copytree(root, copy, symlinks=True)
            window = "1" if name == "timer-jitter" else "0.3"  # oslat measures whole seconds
            args = ["tune", "experiment", "--profile", str(profile), "--items", "vm.compaction_proactiveness",
                    *flags, "--rounds", "2", "--window-s", window, "--json", "--out", str(tmp_path / f"out-{name}"),
                    "--root", str(copy), "--state-dir", str(state)]
            runs.append((name, copy, state, snapshot(copy), subprocess.Popen(
                [sys.executable, "-m", "agent.cli", *args], cwd=PROJECT_ROOT, env=env,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
        for name, copy, state, before, process in runs:
            stdout, stderr = process.communicate(timeout=180)
            assert process.returncode in (0, 4), (name, stderr)
            row = json.loads(stdout)["items"][0]
            low, high = workloads[name][1]
            assert row["a_samples"] >= 20 and row["b_samples"] >= 20, (name, row)  # the gate's min_samples
            assert low <= row["a_p50_ns"] <= high and low <= row["b_p50_ns"] <= high, (name, row)
            assert row["verdict"] in ("improves", "no measurable effect", "worsens", "inconclusive")
            assert snapshot(copy) == before and not (state / "journal.jsonl").exists(), name
    finally:
        server.shutdown()


def test_kth_difference_on_heavy_ties_matches_brute_force(monkeypatch):
    """Integer ns from a fast loop tie massively; the gate's selection takes its tie shortcut
    (forced here with a tiny enumeration limit) and must still give the exact k-th difference."""
    import numpy as np

    from agent.gate import statistics

    monkeypatch.setattr(statistics, "ENUMERATE_PAIRS", 50)
    rng = np.random.default_rng(7)
    for _ in range(25):
        m, n = rng.integers(1, 300, 2)
        baseline = statistics.as_sorted_array(np.round(rng.normal(200, 3, m)))
        candidate = statistics.as_sorted_array(np.round(rng.normal(201, 3, n)) * 0.5)
        differences = np.sort((candidate[None, :] - baseline[:, None]).ravel())
        for k in {1, differences.size // 3, differences.size // 2 + 1, differences.size}:
            k = max(k, 1)
            assert statistics.kth_difference(baseline, candidate, k) == differences[k - 1]
