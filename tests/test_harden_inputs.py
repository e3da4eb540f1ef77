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
