"""`make setup` never installs a kernel image, and BCC is pointed at the headers it unpacked.

The setup scripts run for real (bash, dpkg-deb on real .deb files built here); only the tools that
would change this host's package set (apt-get, apt-cache, dpkg-query, mount) are stand-ins on
PATH that record what they were asked and answer like a Debian 12 host whose kernel has no
headers package.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from core.host import Host
from probes import bpf
from tests.conftest import PROJECT_ROOT

FAKE_RELEASE = "6.18.0-guardian-test"
BORROWED_VERSION = "6.1.0-99-cloud-amd64"

# One dispatcher for every stand-in: each call is logged as "tool arg arg ...".
FAKE_TOOL = r"""#!/bin/bash
tool=$(basename "$0")
echo "$tool $*" >> "$FAKE_LOG"
case "$tool" in
  uname) echo "$FAKE_RELEASE" ;;
  id) echo 0 ;;
  dpkg-query) exit 1 ;;                       # nothing is installed
  mount|mountpoint) exit 0 ;;
  apt-cache)
    case "$1" in
      search) echo "linux-headers-$BORROWED_VERSION - Header files for Linux $BORROWED_VERSION" ;;
      show) [ "$FAKE_EXACT_HEADERS" = none ] && exit 100; echo "Package: $2" ;;
    esac ;;
  apt-get)
    case "$1" in
      update) ;;
      install)
        if [ "$2" = -s ]; then
          # The exact-release headers package, as Debian's cloud kernels make it: pulls an image.
          [ "$FAKE_EXACT_HEADERS" = pulls-image ] && echo "Inst linux-image-$FAKE_RELEASE (1 Debian:12)"
          # As long as a real resolution (more than a pipe buffer): a reader that stops at the
          # first match makes this writer die of SIGPIPE, as apt-get does.
          for i in $(seq 3000); do echo "Inst linux-headers-$FAKE_RELEASE-dependency-$i (1 Debian:12)"; done
          [ "$FAKE_EXACT_HEADERS" = sim-fails ] && exit 100
        fi ;;
      download) for package in "${@:2}"; do
                  [ "$package" = -q ] || cp "$FAKE_DEBS/$package.deb" "./${package}_1_amd64.deb"; done ;;
    esac ;;
esac
exit 0
"""


def build_deb(directory: Path, package: str, files: dict[str, str]) -> Path:
    root = directory / f"{package}-root"
    for relative, text in files.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(text)
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        f"Package: {package}\nVersion: 1\nArchitecture: amd64\nMaintainer: t <t@localhost>\n"
        # The real package's dependency that drags the image in: unpacking must ignore it.
        f"Depends: linux-image-{BORROWED_VERSION}\nDescription: test headers\n")
    target = directory / f"{package}.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "--build", str(root), str(target)], check=True,
                   capture_output=True)
    return target


@pytest.fixture
def fake_host(tmp_path):
    if not shutil.which("dpkg-deb"):
        pytest.fail("dpkg-deb missing: this is a Debian host, install dpkg")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("uname", "id", "dpkg-query", "mount", "mountpoint", "apt-cache", "apt-get"):
        (bin_dir / tool).write_text(FAKE_TOOL)
        (bin_dir / tool).chmod(0o755)
    debs = tmp_path / "debs"
    debs.mkdir()
    common = BORROWED_VERSION.removesuffix("-cloud-amd64") + "-common"
    build_deb(debs, f"linux-headers-{common}", {
        f"usr/src/linux-headers-{common}/include/linux/types.h": "/* generic */\n",
        f"usr/src/linux-headers-{common}/Makefile": "# common makefile\n"})
    build_deb(debs, f"linux-headers-{BORROWED_VERSION}", {
        f"usr/src/linux-headers-{BORROWED_VERSION}/include/generated/autoconf.h": "/* arch */\n",
        f"usr/src/linux-headers-{BORROWED_VERSION}/Makefile": "# arch makefile (must not clobber)\n"})
    fake_root = tmp_path / "root"
    (fake_root / "proc/sys/kernel").mkdir(parents=True)
    (fake_root / "proc/sys/kernel/osrelease").write_text(FAKE_RELEASE + "\n")
    log = tmp_path / "calls.log"
    log.touch()
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(log),
               FAKE_RELEASE=FAKE_RELEASE, BORROWED_VERSION=BORROWED_VERSION, FAKE_DEBS=str(debs),
               FAKE_EXACT_HEADERS="pulls-image",
               GUARDIAN_AGENT_HEADERS_DIR=str(fake_root / bpf.BORROWED_HEADERS_DIR.lstrip("/")))
    return {"env": env, "log": log, "root": fake_root, "tmp": tmp_path}


def installs(log: Path) -> list[list[str]]:
    """Every real (not simulated) `apt-get install` / `dpkg -i` the scripts asked for."""
    asked = []
    for line in log.read_text().splitlines():
        words = line.split()
        if words[:2] == ["apt-get", "install"] and "-s" not in words:
            asked.append(words[2:])
        if words[:1] == ["dpkg"] and ("-i" in words or "--install" in words):
            asked.append(words[1:])
    return asked


def run_headers_script(fake: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(PROJECT_ROOT / "packaging" / "kernel-headers.sh")], env=fake["env"],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("exact_headers", ["pulls-image", "none", "sim-fails"])
def test_headers_are_unpacked_never_installed_and_bcc_finds_them(fake_host, exact_headers):
    fake_host["env"]["FAKE_EXACT_HEADERS"] = exact_headers
    result = run_headers_script(fake_host)
    assert result.returncode == 0, result.stderr
    assert installs(fake_host["log"]) == [], "a headers package was installed (it pulls a kernel image)"
    assert "linux-image" not in " ".join(" ".join(w) for w in installs(fake_host["log"]))

    host = Host(root=fake_host["root"])
    found = bpf.kernel_headers_dir(host)
    assert found == f"{bpf.BORROWED_HEADERS_DIR}/{FAKE_RELEASE}/build"
    tree = host.path(found)
    assert (tree / "include/linux/types.h").is_file() and (tree / "include/generated/autoconf.h").is_file()
    assert (tree / "Makefile").read_text() == "# common makefile\n"
    # Run again: present now, so nothing is downloaded a second time.
    calls_before = fake_host["log"].read_text()
    assert run_headers_script(fake_host).returncode == 0
    assert "apt-get download" not in fake_host["log"].read_text()[len(calls_before):]


def test_exact_headers_without_an_image_are_the_only_install(fake_host):
    fake_host["env"]["FAKE_EXACT_HEADERS"] = "clean"
    result = run_headers_script(fake_host)
    assert result.returncode == 0, result.stderr
    assert installs(fake_host["log"]) == [["-y", "-q", "--no-install-recommends", f"linux-headers-{FAKE_RELEASE}"]]


def test_whole_setup_installs_only_the_listed_packages_and_no_image(fake_host):
    """setup.sh end to end in a copy of the checkout (a stand-in venv so pip does not run)."""
    checkout = fake_host["tmp"] / "checkout"
    shutil.copytree(PROJECT_ROOT / "packaging", checkout / "packaging")
    shutil.copy(PROJECT_ROOT / "pyproject.toml", checkout / "pyproject.toml")
    venv_bin = checkout / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").write_text("#!/bin/sh\nexit 0\n")
    (venv_bin / "python").chmod(0o755)
    digest = subprocess.run("cat pyproject.toml | sha256sum | cut -d' ' -f1",
                            shell=True, cwd=checkout, capture_output=True, text=True).stdout.strip()
    (checkout / ".venv" / ".requirements.sha").write_text(digest + "\n")
    result = subprocess.run(["bash", str(checkout / "packaging" / "setup.sh")], env=fake_host["env"],
                            capture_output=True, text=True, timeout=120, cwd=checkout)
    assert result.returncode == 0, result.stdout + result.stderr
    listed = {line.strip() for line in (checkout / "packaging" / "apt-packages.txt").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")}
    asked = installs(fake_host["log"])
    assert len(asked) == 1, asked
    packages = {word for word in asked[0] if not word.startswith("-")}
    assert packages == listed
    assert not any(name.startswith(("linux-image", "linux-headers")) for name in packages)


def test_the_package_list_resolves_without_a_kernel_image():
    """apt's own resolver, simulated (-s changes nothing): the list must not pull linux-image-*."""
    if not shutil.which("apt-get"):
        pytest.fail("apt-get missing: this is a Debian host")
    listed = [line.strip() for line in (PROJECT_ROOT / "packaging" / "apt-packages.txt").read_text().splitlines()
              if line.strip() and not line.lstrip().startswith("#")]
    simulated = subprocess.run(["apt-get", "install", "-s", "--no-install-recommends", *listed],
                               capture_output=True, text=True, timeout=120,
                               env=dict(os.environ, DEBIAN_FRONTEND="noninteractive"))
    if simulated.returncode != 0 and "Unable to locate package" in simulated.stderr:
        pytest.skip(f"LIVE CHECK SKIPPED: apt lists are not loaded here ({simulated.stderr.strip()[:120]})")
    assert simulated.returncode == 0, simulated.stderr
    pulled = [line for line in simulated.stdout.splitlines() if line.startswith("Inst linux-image")]
    assert pulled == []


@pytest.mark.live
def test_this_hosts_bcc_headers_are_found():
    host = Host.real()
    release = host.kernel_release()
    found = bpf.kernel_headers_dir(host)
    assert found is not None, "run `make setup`: no kernel headers for BCC on this host"
    if not host.exists(f"/lib/modules/{release}/build") and not host.exists("/sys/kernel/kheaders.tar.xz"):
        assert found == f"{bpf.BORROWED_HEADERS_DIR}/{release}/build"
        assert Path(found, "include").is_dir()
