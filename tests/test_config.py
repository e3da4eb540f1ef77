"""config.toml validation: every error names the key; secrets never sit in the file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.config import DEFAULT_SPOOL_DIR, load_config, parse_config
from core.errors import BadInput

FULL = """
[dataset]
root = "s3://fleet-bucket/guardian"
s3_endpoint_url = "http://127.0.0.1:9000"
spool_max_mb = 64
spool_policy = "refuse-new"

[collect]
probes = ["host", "syscalls", "stacks"]
duration_s = 20

[daemon]
probes = ["host", "syscalls", "tcp"]
window_s = 120
cpu_budget_pct = 0.25

[targets]
pids = [1]
process_names = ["matching-engine"]
units = ["trader.service"]

[probe_options]
interval_s = 2
iface = "lo"
"""


def test_full_config_parses_into_settings():
    config = parse_config(FULL)
    assert config.dataset.is_remote and config.dataset.root == "s3://fleet-bucket/guardian"
    assert config.dataset.spool_max_bytes == 64 * 1024 * 1024
    assert config.dataset.spool_policy == "refuse-new"
    assert config.spool_dir() == DEFAULT_SPOOL_DIR
    assert config.collect.probes == ("host", "syscalls", "stacks") and config.collect.duration_s == 20
    assert config.daemon.window_s == 120 and config.daemon.cpu_budget_pct == 0.25
    assert config.targets.pids == (1,) and config.targets.units == ("trader.service",)
    options = config.probe_options_for_run()
    assert options["interval_s"] == 2 and options["iface"] == "lo"
    from agent.fleet.collect import probe_config
    from core.host import Host

    assert probe_config(config, Host.real()).process_names == ("matching-engine",)


def test_defaults_and_local_spool_beside_root():
    config = parse_config('[dataset]\nroot = "/srv/fleet"\n')
    assert config.daemon.probes == ("host", "syscalls", "tcp")
    assert config.daemon.cpu_budget_pct == 0.5 and config.daemon.rss_limit_mb == 200
    assert config.spool_dir() == Path("/srv/fleet/_spool")


@pytest.mark.parametrize("text, message", [
    ("[daemon]\nwindows_s = 5\n", "config.toml: daemon.windows_s: unknown key"),
    ("[daemon]\nwindow_s = -1\n", "daemon.window_s: expected a positive number, got -1"),
    ("[daemon]\nwindow_s = \"60\"\n", "daemon.window_s: expected a positive number, got '60'"),
    ("[daemon]\ncpu_budget_pct = 150\n", "daemon.cpu_budget_pct: is a percentage of one core"),
    ("[collect]\nprobes = [\"host\", \"nosuch\"]\n", "collect.probes: unknown probe 'nosuch'"),
    ("[collect]\nprobes = []\n", "collect.probes: list at least one probe"),
    ("[dataset]\nroot = \"ftp://x/y\"\n", "dataset.root: only local paths and s3://"),
    ("[dataset]\nroot = \"s3:///nobucket\"\n", "dataset.root: 's3:///nobucket' names no bucket"),
    ("[dataset]\nspool_policy = \"yolo\"\n", "dataset.spool_policy: expected one of drop-oldest, refuse-new"),
    ("[targets]\npids = [0]\n", "targets.pids: expected a list of positive integers"),
    ("[probe_options]\ncapture_payload = \"yes\"\n", "probe_options.capture_payload: expected true or false"),
    ("[probe_options]\npg_dsn = \"postgres://u:secret@h/db\"\n", "probe_options.pg_dsn: unknown key"),
    ("[postgres]\ndsn = \"postgres://u:secret@h/db\"\n", "postgres.dsn: a DSN (and its password) does not belong"),
    ("[surprise]\nx = 1\n", "config.toml: surprise: unknown key"),
    ("[daemon\n", "not valid TOML"),
])
def test_errors_name_the_key(text, message):
    with pytest.raises(BadInput) as caught:
        parse_config(text)
    assert message in str(caught.value)
    assert "secret" not in str(caught.value)


def test_dsn_file_must_be_0600(tmp_path):
    dsn = tmp_path / "pg.dsn"
    dsn.write_text("postgresql://agent:hunter2@127.0.0.1/trading\n")
    dsn.chmod(0o644)
    with pytest.raises(BadInput, match=r"postgres.dsn_file: .* mode 0644 lets group/others read it"):
        parse_config(f'[postgres]\ndsn_file = "{dsn}"\n')
    dsn.chmod(0o600)
    config = parse_config(f'[postgres]\ndsn_file = "{dsn}"\n')
    assert config.probe_options_for_run()["pg_dsn_file"] == dsn
    with pytest.raises(BadInput, match="postgres.dsn_file: .*no such file"):
        parse_config(f'[postgres]\ndsn_file = "{tmp_path / "absent"}"\n')


def test_dsn_from_environment_only_reaches_probe_options():
    text = '[postgres]\ndsn_env = "GUARDIAN_TEST_DSN"\n'
    with pytest.raises(BadInput, match="postgres.dsn_env: environment variable GUARDIAN_TEST_DSN is not set"):
        parse_config(text, environ={})
    config = parse_config(text, environ={"GUARDIAN_TEST_DSN": "x"})
    os.environ["GUARDIAN_TEST_DSN"] = "postgresql://u:pw@127.0.0.1/db"
    try:
        assert config.probe_options_for_run()["pg_dsn"] == "postgresql://u:pw@127.0.0.1/db"
    finally:
        del os.environ["GUARDIAN_TEST_DSN"]


def test_load_config_missing_explicit_file_is_bad_input(tmp_path):
    with pytest.raises(BadInput, match="--config .*: no such file"):
        load_config(tmp_path / "nope.toml")
    good = tmp_path / "config.toml"
    good.write_text('[daemon]\nwindow_s = 5\n')
    assert load_config(good).daemon.window_s == 5


def test_cli_reports_config_error_in_one_line(agent_cli, tmp_path):
    bad = tmp_path / "config.toml"
    bad.write_text("[daemon]\nwindow_s = 0\n")
    result = agent_cli("daemon", "--config", str(bad), "--dataset", str(tmp_path / "ds"), timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "daemon.window_s: expected a positive number, got 0" in result.stderr
    assert "Traceback" not in result.stderr
