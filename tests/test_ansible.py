"""The Ansible role installs the .deb, the config and the timer; a second run changes nothing."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT, VENV_BIN
from tests.test_deb import built_deb, installed_version, run  # noqa: F401 - session fixture

ROLE_DIR = PROJECT_ROOT / "packaging" / "ansible" / "roles"
DROP_IN = Path("/etc/systemd/system/guardian-agent-collect.timer.d/override.conf")


def ansible_playbook() -> str:
    for candidate in (VENV_BIN / "ansible-playbook", shutil.which("ansible-playbook")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.skip("LIVE TEST SKIPPED: ansible-playbook not installed (ansible-core in pyproject.toml's dev extra: make setup)")


def recap(output: str) -> dict[str, int]:
    match = re.search(r"localhost\s*:\s*(.*)", output.split("PLAY RECAP", 1)[-1])
    assert match, output[-2000:]
    return {key: int(value) for key, value in re.findall(r"(\w+)=(\d+)", match.group(1))}


@pytest.mark.live
def test_role_installs_package_config_and_timer_idempotently(built_deb, tmp_path):  # noqa: F811
    playbook = tmp_path / "site.yml"
    playbook.write_text(
        "- hosts: localhost\n"
        "  gather_facts: true\n"
        "  gather_subset: [min]\n"
        "  roles:\n"
        "    - guardian_agent\n")
    variables = {
        "guardian_agent_deb": str(built_deb),
        "guardian_agent_dataset_root": "s3://fleet-bucket/guardian",
        "guardian_agent_s3_endpoint_url": "http://127.0.0.1:9000",
        "guardian_agent_daemon_cpu_budget_pct": 0.25,
        "guardian_agent_target_process_names": ["matching-engine"],
        "guardian_agent_pg_dsn": "postgresql://agent:Sup3rSecret@127.0.0.1/trading",
        "guardian_agent_environment": {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "Sup3rSecret"},
        "guardian_agent_timer_on_calendar": "*:0/30",
    }
    extra = tmp_path / "vars.json"
    extra.write_text(json.dumps(variables))
    env = dict(os.environ, ANSIBLE_ROLES_PATH=str(ROLE_DIR), ANSIBLE_NOCOLOR="1", ANSIBLE_RETRY_FILES_ENABLED="0",
               ANSIBLE_PIPELINING="1",
               ANSIBLE_LOCAL_TEMP=str(tmp_path / "ansible-tmp"), ANSIBLE_PYTHON_INTERPRETER="/usr/bin/python3",
               PATH=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    command = (ansible_playbook(), "-i", "localhost,", "-c", "local", str(playbook), "-e", f"@{extra}")
    try:
        first = run(*command, env=env, timeout=300)
        assert recap(first.stdout)["failed"] == 0 and recap(first.stdout)["changed"] >= 4
        assert "Sup3rSecret" not in first.stdout + first.stderr, "no_log must hide the secrets"
        assert installed_version() is not None

        config = Path("/etc/guardian-agent/config.toml").read_text()
        assert 'root = "s3://fleet-bucket/guardian"' in config and "cpu_budget_pct = 0.25" in config
        assert 'dsn_file = "/etc/guardian-agent/pg.dsn"' in config and "Sup3rSecret" not in config
        for secret in ("/etc/guardian-agent/pg.dsn", "/etc/guardian-agent/environment"):
            assert stat.S_IMODE(os.stat(secret).st_mode) == 0o600
        assert "OnCalendar=*:0/30" in DROP_IN.read_text()
        checked = run("/usr/bin/guardian-agent", "collect", "--check")
        assert "config ok: dataset s3://fleet-bucket/guardian" in checked.stdout
        verified = run("systemd-analyze", "verify", "/lib/systemd/system/guardian-agent-collect.timer",
                       "/lib/systemd/system/guardian-agent-collect.service", check=False)
        assert verified.returncode == 0, verified.stderr

        second = run(*command, env=env, timeout=300)
        assert recap(second.stdout)["changed"] == 0, second.stdout[-3000:]

        # A bad value is refused by the agent's own validation before it replaces the config.
        variables["guardian_agent_daemon_window_s"] = -5
        extra.write_text(json.dumps(variables))
        refused = run(*command, "--start-at-task", "config.toml, validated by the agent before it replaces the old one",
                      env=env, timeout=300, check=False)
        assert refused.returncode != 0
        assert "daemon.window_s: expected a positive number" in refused.stdout
        assert "window_s = 300" in Path("/etc/guardian-agent/config.toml").read_text()
    finally:
        run("dpkg", "-P", "guardian-agent", timeout=180, check=False)
        shutil.rmtree(DROP_IN.parent, ignore_errors=True)
        for name in os.listdir("/var/cache"):
            if name.startswith("guardian-agent_") and name.endswith(".deb"):
                os.unlink(os.path.join("/var/cache", name))
    assert installed_version() is None
