"""`make deb`: the package builds, installs, runs, verifies with systemd and uninstalls cleanly."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import PROJECT_ROOT

UNITS = ("guardian-agent.service", "guardian-agent-collect.service", "guardian-agent-collect.timer",
         "guardian-agent-compact.service", "guardian-agent-compact.timer")  # compact: shipped, not enabled
UNIT_DIR = Path("/lib/systemd/system")


def run(*command: str, timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def require_tools():
    if os.geteuid() != 0:
        pytest.skip("LIVE TEST SKIPPED: installing a .deb needs root")
    for tool in ("dpkg-deb", "dpkg", "systemd-analyze"):
        if not shutil.which(tool):
            pytest.skip(f"LIVE TEST SKIPPED: {tool} not found (Debian/Ubuntu host needed)")
    if not (PROJECT_ROOT / ".venv" / "bin" / "python").exists():
        pytest.skip("LIVE TEST SKIPPED: no .venv: run `make setup` first")


def installed_version() -> str | None:
    result = run("dpkg-query", "-W", "-f=${Status} ${Version}", "guardian-agent", check=False)
    if result.returncode != 0 or not result.stdout.startswith("install ok installed"):
        return None
    return result.stdout.split()[-1]


_BUILT: dict[str, Path] = {}


@pytest.fixture(scope="session")
def built_deb(tmp_path_factory) -> Path:
    """Build once per test session, shared with test_ansible.py (which imports this fixture, so
    pytest sees two fixtures: the module-level cache makes them one build)."""
    require_tools()
    if installed_version() is not None:
        pytest.skip("LIVE TEST SKIPPED: guardian-agent is already installed here; not touching it")
    if "deb" in _BUILT and _BUILT["deb"].exists():
        return _BUILT["deb"]
    dist = tmp_path_factory.mktemp("dist")
    build = tmp_path_factory.mktemp("debbuild")
    env = dict(os.environ, DIST_DIR=str(dist), BUILD_DIR=str(build))
    run("bash", str(PROJECT_ROOT / "packaging" / "build-deb.sh"), cwd=PROJECT_ROOT, env=env, timeout=480)
    packages = list(dist.glob("guardian-agent_*_*.deb"))
    assert len(packages) == 1, packages
    _BUILT["deb"] = packages[0]
    return packages[0]


@pytest.mark.live
def test_deb_builds_installs_verifies_and_uninstalls(built_deb, tmp_path):
    from agent import __version__

    arch = run("dpkg", "--print-architecture").stdout.strip()
    assert built_deb.name == f"guardian-agent_{__version__}_{arch}.deb"
    fields = run("dpkg-deb", "-f", str(built_deb), "Depends", "Package").stdout
    assert "python3-bpfcc" in fields
    contents = run("dpkg-deb", "-c", str(built_deb)).stdout
    for unit in UNITS:
        assert f"./lib/systemd/system/{unit}" in contents
    assert "./opt/guardian-agent/venv/bin/guardian-agent" in contents

    try:
        run("dpkg", "-i", str(built_deb), timeout=180)
        assert installed_version() == __version__
        version = run("/usr/bin/guardian-agent", "--version").stdout
        assert __version__ in version
        # The distro's BCC imports inside the shipped venv (system site packages).
        run("/opt/guardian-agent/venv/bin/python", "-c", "import bcc, agent.fleet.stores, boto3")
        cfg = Path("/opt/guardian-agent/venv/pyvenv.cfg").read_text()
        assert "include-system-site-packages = true" in cfg and "debbuild" not in cfg
        shebang = Path("/opt/guardian-agent/venv/bin/guardian-agent").read_text().splitlines()[0]
        assert shebang == "#!/opt/guardian-agent/venv/bin/python"
        assert Path("/etc/guardian-agent/config.toml").is_file()
        checked = run("/usr/bin/guardian-agent", "collect", "--check")
        assert "config ok" in checked.stdout

        verified = run("systemd-analyze", "verify", *(str(UNIT_DIR / unit) for unit in UNITS), check=False)
        assert verified.returncode == 0 and not verified.stderr.strip(), verified.stderr
        service = (UNIT_DIR / "guardian-agent.service").read_text()
        for hardening in ("NoNewPrivileges=yes", "ProtectSystem=strict", "CapabilityBoundingSet=CAP_BPF",
                          "ReadWritePaths=/var/lib/guardian-agent"):
            assert hardening in service
        timer = (UNIT_DIR / "guardian-agent-collect.timer").read_text()
        assert "RandomizedDelaySec=" in timer

        # A real collect through the installed package into a local dataset.
        dataset = tmp_path / "dataset"
        config = tmp_path / "config.toml"
        config.write_text('[collect]\nprobes = ["host"]\nduration_s = 0.5\n')
        collected = run("/usr/bin/guardian-agent", "collect", "--config", str(config), "--dataset", str(dataset))
        assert "uploaded 1 run(s)" in collected.stdout
        answered = run("/usr/bin/guardian-agent", "query", "--dataset", str(dataset), "--format", "csv",
                       "SELECT probe FROM runs")
        assert answered.stdout.split() == ["probe", "host"]

        run("dpkg", "-r", "guardian-agent", timeout=120)
        assert installed_version() is None
        assert not Path("/opt/guardian-agent").exists()
        assert not Path("/usr/bin/guardian-agent").exists()
        assert not any((UNIT_DIR / unit).exists() for unit in UNITS)
        assert Path("/etc/guardian-agent/config.toml").exists(), "remove keeps the configuration"
        run("dpkg", "-P", "guardian-agent", timeout=120)
        assert not Path("/etc/guardian-agent").exists(), "purge removes the configuration"
    finally:
        if installed_version() is not None or Path("/etc/guardian-agent").exists():
            run("dpkg", "-P", "guardian-agent", timeout=120, check=False)
