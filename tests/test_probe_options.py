"""Probe options come from one declaration: the audit flags, config.toml's [probe_options] and
the probes' reads agree, and every setting can be set from both the CLI and the config."""

from __future__ import annotations

import pytest

from agent.config import parse_config
from agent.fleet.collect import probe_config
from core.errors import BadInput
from core.host import Host
from probes.capture import CaptureProbe
from probes.jitter import JitterProbe
from probes.options import PROBE_OPTIONS, validated_options
from probes.stacks import StacksProbe
from probes.tcp import TcpProbe
from tests.conftest import run_agent

SETTABLE_EVERYWHERE = ("stack_threads", "peer_roles", "jitter_threshold_ns", "capture_max_bytes",
                       "capture_max_packets")


def test_every_declared_option_is_an_audit_flag():
    help_text = run_agent("audit", "--help").stdout
    for option in PROBE_OPTIONS:
        assert option.cli_flag in help_text, option.cli_flag


def test_config_sets_what_the_probes_read():
    config = parse_config('[probe_options]\nstack_threads = "all"\npeer_roles = ["9100-9199=exchange"]\n'
                          'jitter_threshold_ns = 2000\ncapture_max_bytes = 4096\ncapture_max_packets = 10\n')
    probe_cfg = probe_config(config, Host.real())
    assert StacksProbe(probe_cfg).thread_mode == "all"
    assert JitterProbe(probe_cfg).threshold_ns == 2000
    capture = CaptureProbe(probe_cfg)
    assert capture.option("capture_max_bytes") == 4096 and capture.option("capture_max_packets") == 10
    assert TcpProbe(probe_cfg).option("peer_roles") == ("9100-9199=exchange",)
    assert set(SETTABLE_EVERYWHERE) <= {option.name for option in PROBE_OPTIONS if option.in_config}


def test_defaults_come_from_the_declaration():
    probe = StacksProbe()
    assert probe.thread_mode == "running" and probe.rate_hz == 97
    assert JitterProbe().threshold_ns == 5_000


@pytest.mark.parametrize("body, message", [
    ('stack_threads = "some"', "probe_options.stack_threads: expected one of running, all, gil, got 'some'"),
    ("jitter_threshold_ns = 0", "probe_options.jitter_threshold_ns: expected a positive integer, got 0"),
    ("capture_max_bytes = 1.5", "probe_options.capture_max_bytes: expected a positive integer, got 1.5"),
    ('peer_roles = ["x=y"]', "probe_options.peer_roles: 'x=y': 'x' is not a port, port range or network"),
    ('stack_thread = "all"', "probe_options.stack_thread: unknown key"),
    ('pg_dsn = "postgres://u:secret@h/db"', "probe_options.pg_dsn: unknown key"),
])
def test_bad_config_values_name_the_key(body, message):
    with pytest.raises(BadInput) as caught:
        parse_config(f"[probe_options]\n{body}\n")
    assert message in str(caught.value) and "secret" not in str(caught.value)


@pytest.mark.parametrize("args, message", [
    (["--stack-threads", "some"], "'some' is not one of"),
    (["--jitter-threshold-ns", "0"], "--jitter-threshold-ns must be positive, not 0"),
    (["--capture-max-packets", "-5"], "--capture-max-packets must be positive, not -5"),
    (["--peer-role", "5432-x=database"], "--peer-role '5432-x=database'"),
    (["--interval", "nan"], "--interval: expected a number, got nan"),
])
def test_bad_flags_are_one_line_exit_2_before_the_window(tmp_path, args, message):
    result = run_agent("audit", "--probes", "host", "--duration", "30", *args, "--out", str(tmp_path / "b"))
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1 and not (tmp_path / "b").exists()


def test_validated_options_refuses_an_unknown_name():
    with pytest.raises(BadInput, match="unknown probe option 'stack_thread'"):
        validated_options({"stack_thread": "all"})
