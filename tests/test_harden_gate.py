"""gate: a record that cannot be written never changes the verdict; inconclusive is not bad input."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from tests.harden_helpers import mounted_tmpfs
from tests.test_gate import turns, write_bundle


@pytest.fixture
def pair(tmp_path):
    rng = np.random.default_rng(15)
    return {
        "base": write_bundle(tmp_path / "base", {"turns": turns(rng.lognormal(13, 0.3, 3000))}),
        "same": write_bundle(tmp_path / "same", {"turns": turns(rng.lognormal(13, 0.3, 3000))}),
        "slow": write_bundle(tmp_path / "slow", {"turns": turns(rng.lognormal(13, 0.3, 3000) * 1.6)}),
        "tiny": write_bundle(tmp_path / "tiny", {"turns": turns(rng.lognormal(13, 0.3, 5))}),
    }


@pytest.fixture
def read_only_dir(tmp_path):
    """A real read-only filesystem (root ignores mode bits, so chmod would prove nothing)."""
    with mounted_tmpfs(tmp_path / f"ro-{os.getpid()}", "ro,size=64k") as mount_point:
        yield mount_point


@pytest.mark.live
@pytest.mark.parametrize("candidate, verdict, code", [("same", "PASS", 0), ("slow", "FAIL", 1),
                                                      ("tiny", "INCONCLUSIVE", 4)])
def test_read_only_record_keeps_the_verdicts_exit_code(agent_cli, pair, read_only_dir, candidate, verdict, code):
    result = agent_cli("gate", "--baseline", str(pair["base"]), "--candidate", str(pair[candidate]),
                       "--record", str(read_only_dir / "decisions"))
    assert result.returncode == code, (result.stdout, result.stderr)
    assert result.stdout.startswith(f"gate: {verdict}")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "decision not recorded (Read-only file system)" in lines[0], result.stderr
    assert "the verdict above stands" in lines[0]


def test_inconclusive_has_its_own_exit_code_and_bad_input_keeps_2(agent_cli, pair, tmp_path):
    undecided = agent_cli("gate", "--baseline", str(pair["base"]), "--candidate", str(pair["tiny"]),
                          "--no-record", "--json")
    assert undecided.returncode == 4, undecided.stderr
    assert json.loads(undecided.stdout)["verdict"] == "inconclusive"
    missing = agent_cli("gate", "--baseline", str(pair["base"]), "--candidate", str(tmp_path / "nope"),
                        "--no-record")
    assert missing.returncode == 2
    helped = agent_cli("gate", "--help")
    assert "4 inconclusive" in helped.stdout and "2 bad input" in helped.stdout
