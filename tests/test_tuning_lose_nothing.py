"""The tuning journal loses nothing under a full disk, torn writes and early signals, and apply
refuses what it must not write (a misspelled sysctl, a sysfs path that leaves the kernel's
filesystems). Real tmpfs, real signals, the real CLI on a fake /proc + /sys tree."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest

from agent.tuning.journal import read_journal
from tests.conftest import fill_filesystem, run_agent
from tests.test_tuning_fake_tree import FAKE, snapshot

PROFILE = "trading-latency"


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "root"
    shutil.copytree(FAKE, root, symlinks=True)
    return root, tmp_path / "state"


def tune(root: Path, state: Path, *args: str, env: dict | None = None):
    return run_agent("tune", *args, "--root", str(root), "--state-dir", str(state), env=env, timeout=60)


def write_profile(directory: Path, body: str) -> Path:
    path = directory / "custom.toml"
    path.write_text(body)
    return path


def test_misspelled_sysctl_is_unknown_and_apply_refuses_it_unless_optional(tree, tmp_path):
    root, state = tree
    before = snapshot(root)
    typo = write_profile(tmp_path, '[sysctl."vm.swapiness"]\nvalue = 10\n\n[sysctl."vm.swappiness"]\nvalue = 10\n')
    plan = json.loads(tune(root, state, "plan", "--profile", str(typo), "--json").stdout)
    rows = {row["item"]: row for row in plan["items"]}
    assert rows["vm.swapiness"]["status"] == "unknown" and "unknown sysctl" in rows["vm.swapiness"]["note"]
    applied = tune(root, state, "apply", "--profile", str(typo), "--yes")
    assert applied.returncode == 2 and "unknown setting(s) on this kernel: vm.swapiness" in applied.stderr
    assert applied.stderr.count("\n") == 1 and snapshot(root) == before
    optional = write_profile(tmp_path, '[sysctl."vm.swapiness"]\nvalue = 10\noptional = true\n\n'
                                       '[sysctl."vm.swappiness"]\nvalue = 10\n')
    assert tune(root, state, "apply", "--profile", str(optional), "--yes").returncode == 0
    assert (root / "proc/sys/vm/swappiness").read_bytes() == b"10\n"
    assert tune(root, state, "rollback").returncode == 0 and snapshot(root) == before


@pytest.mark.parametrize("path", ["/sys/kernel/mm/escape", "/proc/sys/vm/hostname-link"])
def test_sysfs_path_leaving_the_kernel_filesystems_is_refused(tree, tmp_path, path):
    root, state = tree
    (root / "etc").mkdir(exist_ok=True)
    (root / "etc/secret").write_text("do not touch\n")
    (root / "sys/kernel/mm/escape").symlink_to("../../../etc/secret")
    (root / "proc/sys/vm/hostname-link").symlink_to("../../../etc/secret")  # also a symlink
    profile = write_profile(tmp_path, f'[sysfs.evil]\npath = "{path}"\nvalue = "x"\n')
    result = tune(root, state, "apply", "--profile", str(profile), "--yes")
    assert result.returncode == 2 and "resolves to /etc/secret" in result.stderr, result.stderr
    assert "outside /proc/sys, /sys and the cgroup filesystems" in result.stderr
    assert (root / "etc/secret").read_text() == "do not touch\n"


@pytest.mark.live
def test_proc_self_root_on_the_real_host_is_refused_before_anything_is_read(tmp_path):
    profile = write_profile(tmp_path, '[sysfs.evil]\npath = "/proc/self/root/etc/hostname"\nvalue = "x"\n')
    result = run_agent("tune", "plan", "--profile", str(profile), "--state-dir", str(tmp_path / "state"))
    assert result.returncode == 2 and "resolves to /etc/hostname" in result.stderr, result.stderr


def test_kill_right_after_the_journal_is_created_blocks_nothing(tree):
    root, state = tree
    before = snapshot(root)
    killed = tune(root, state, "apply", "--profile", PROFILE, "--yes",
                  env={"GUARDIAN_AGENT_TEST_KILL_AT": "created"})
    assert killed.returncode == -9 and (state / "journal.jsonl").read_bytes() == b""
    status = tune(root, state, "status")
    assert status.returncode == 0 and "No pending journal" in status.stdout, status.stdout + status.stderr
    assert not (state / "journal.jsonl").exists() and snapshot(root) == before
    assert tune(root, state, "apply", "--profile", PROFILE, "--yes").returncode == 0
    assert tune(root, state, "rollback").returncode == 0 and snapshot(root) == before


@pytest.mark.parametrize("stage", ["intent:3", "write:5"])
def test_ctrl_c_mid_apply_rolls_back_and_exits_130(tree, stage):
    root, state = tree
    before = snapshot(root)
    interrupted = tune(root, state, "apply", "--profile", PROFILE, "--yes",
                       env={"GUARDIAN_AGENT_TEST_KILL_AT": stage, "GUARDIAN_AGENT_TEST_KILL_SIGNAL": "INT"})
    assert interrupted.returncode == 130, interrupted.stderr
    assert "Traceback" not in interrupted.stderr
    assert snapshot(root) == before and not (state / "journal.jsonl").exists()
    assert len(list((state / "history").iterdir())) == 1


def test_status_after_a_rollback_cut_short_names_the_agents_own_restores(tree):
    root, state = tree
    before = snapshot(root)
    assert tune(root, state, "apply", "--profile", PROFILE, "--yes").returncode == 0
    steps = len(read_journal(state / "journal.jsonl").intents)
    # Rollback walks in reverse: kill it after it restored steps LAST..3, with step 3 unjournaled.
    killed = tune(root, state, "rollback", env={"GUARDIAN_AGENT_TEST_KILL_AT": "undo:3"})
    assert killed.returncode == -9 and steps > 3
    status = json.loads(tune(root, state, "status", "--json").stdout)
    states = {row["item"]: row["state"] for row in status["steps"]}
    assert status["rollback_started"] is True
    assert "drifted" not in states.values(), states
    assert list(states.values()).count("rolled back") == steps - 2
    text = tune(root, state, "status")
    assert text.returncode == 0 and "did not finish" in text.stdout
    assert "someone else" not in text.stdout
    finished = tune(root, state, "rollback")
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert "someone else" not in finished.stdout.split("Rolled back")[0]
    assert snapshot(root) == before


@pytest.mark.live
def test_disk_full_mid_apply_rolls_back_what_it_did(tree, tiny_tmpfs):
    root, _ = tree
    state = tiny_tmpfs / "state"
    before = snapshot(root)
    state.mkdir()
    (state / "history").mkdir()
    fill_filesystem(tiny_tmpfs, leave_bytes=4096)  # room for ~12 records: the journal fills mid-apply
    failed = tune(root, state, "apply", "--profile", PROFILE, "--yes", "--persist")
    assert failed.returncode == 1, failed.stdout + failed.stderr
    assert "disk full" in failed.stderr and "rolled back" in failed.stderr, failed.stderr
    assert failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
    assert snapshot(root) == before
    assert not (state / "journal.jsonl").exists()


@pytest.mark.live
def test_rollback_on_a_full_disk_restores_everything_then_a_second_one_is_clean(tree, tiny_tmpfs):
    root, _ = tree
    state = tiny_tmpfs / "state"
    before = snapshot(root)
    assert tune(root, state, "apply", "--profile", PROFILE, "--yes").returncode == 0
    filler = fill_filesystem(tiny_tmpfs)
    fd = os.open(state / "journal.jsonl", os.O_WRONLY | os.O_APPEND)
    try:  # fill the journal's last page too (blank lines are no records): not one byte is left
        while os.write(fd, b"\n" * 64):
            pass
    except OSError as error:
        assert error.errno == errno.ENOSPC
    finally:
        os.close(fd)
    rolled = tune(root, state, "rollback")
    assert rolled.returncode == 0, rolled.stdout + rolled.stderr
    assert snapshot(root) == before and "Journal archived" in rolled.stdout
    filler.unlink()
    assert tune(root, state, "status").returncode == 0
    assert not (state / "journal.jsonl").exists()
