"""Process and cgroup targets: an explicit pid, a pid file's process, a process name, a unit."""

from __future__ import annotations

import os
from pathlib import Path

from core.errors import BadInput, Unavailable
from core.host import Host

from .base import process_identity, spec_table

PROCESS_KEYS = ("pid", "pid_file", "process", "unit")


def process_target_key(spec: dict, where: str, allowed: tuple[str, ...] = PROCESS_KEYS) -> str:
    """Exactly one of the target keys: the blast radius is named, never implied."""
    given = [key for key in allowed if key in spec]
    if len(given) != 1:
        raise BadInput(f"{where}: name exactly one target among {', '.join(allowed)}"
                       + (f" (got {', '.join(given)})" if given else ""))
    key = given[0]
    value = spec[key]
    if key == "pid":
        if isinstance(value, bool) or not isinstance(value, int) or value <= 1:
            raise BadInput(f"{where}.pid: must be a process id above 1")
    else:
        spec_table(spec, where).string(key)
    return key


def systemd_is_init(host: Host) -> bool:
    return host.read_optional("/proc/1/comm") == "systemd"


def unit_unavailable_reason(host: Host) -> str:
    return (f"PID 1 is not systemd (it is {host.read_optional('/proc/1/comm', 'unknown')!r}): "
            f"unit targets need systemd; name the process with pid, pid_file or process instead")


def pids_named(name: str, host: Host) -> list[int]:
    """Processes whose comm or argv[0] basename is `name` (never the agent itself)."""
    found = []
    for entry in os.scandir(host.path("/proc")):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        comm = _read(Path(entry.path, "comm")).strip()
        argv0 = _read(Path(entry.path, "cmdline")).split("\0", 1)[0]
        if name in (comm, os.path.basename(argv0)):
            found.append(int(entry.name))
    return sorted(found)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def pid_from_file(path: str, host: Host, where: str) -> int:
    text = _read(host.path(path)).strip()
    if not text.isdigit():
        raise BadInput(f"{where}.pid_file: {path} does not hold a pid")
    return int(text)


def unit_main_pid(unit: str, host: Host, where: str) -> int:
    import subprocess
    if not systemd_is_init(host):
        raise Unavailable(unit_unavailable_reason(host))
    done = subprocess.run(["systemctl", "show", "-p", "MainPID", "--value", unit], capture_output=True, text=True)
    pid = int(done.stdout.strip() or 0) if done.returncode == 0 else 0
    if pid <= 0:
        raise BadInput(f"{where}.unit: {unit} has no running main process")
    return pid


def resolve_process(spec: dict, key: str, host: Host, where: str) -> int:
    """The one pid the target names now; BadInput if it names none (or several)."""
    value = spec[key]
    if key == "pid":
        pid = value
    elif key == "pid_file":
        pid = pid_from_file(value, host, where)
    elif key == "unit":
        pid = unit_main_pid(value, host, where)
    else:
        pids = pids_named(value, host)
        if len(pids) != 1:
            raise BadInput(f"{where}.process: {value!r} names {len(pids)} processes; it must name exactly one "
                           f"(use pid or pid_file)")
        pid = pids[0]
    if pid == os.getpid() or pid == 1 or not host.pid_exists(pid):
        raise BadInput(f"{where}.{key}: no such process to target ({pid})")
    return pid


def describe_process(pid: int, host: Host) -> dict:
    identity = process_identity(pid)
    identity["comm"] = host.read_optional(f"/proc/{pid}/comm")
    identity["cmdline"] = _read(host.path(f"/proc/{pid}/cmdline")).replace("\0", " ").strip()
    return identity


def cgroup_v1_mount(controller: str, host: Host) -> Path | None:
    for line in host.read_optional("/proc/self/mountinfo").splitlines():
        fields = line.split()
        if " - cgroup " in line and controller in fields[-1].split(","):
            return host.path(fields[4])
    return None


def cgroup_v2_mount(host: Host) -> Path | None:
    for line in host.read_optional("/proc/self/mountinfo").splitlines():
        if " - cgroup2 " in line:
            return host.path(line.split()[4])
    return None


def process_cgroup(pid: int, controller: str | None, host: Host) -> str | None:
    """The pid's cgroup path in the v1 hierarchy holding `controller` (None: the v2 one)."""
    for line in host.read_optional(f"/proc/{pid}/cgroup").splitlines():
        _id, controllers, path = line.split(":", 2)
        if (controller is None and controllers == "") or (controller and controller in controllers.split(",")):
            return path
    return None


def resolve_cgroup(value: str, controller: str, host: Host, where: str) -> Path:
    """A cgroup named by path relative to its hierarchy ("trading/strategy") or absolute under
    /sys/fs/cgroup: the v1 hierarchy of `controller` if mounted, else the v2 one."""
    if not isinstance(value, str) or not value.strip() or ".." in value.split("/"):
        raise BadInput(f"{where}.cgroup: must be a cgroup path such as \"trading/strategy\"")
    if value.startswith("/sys/fs/cgroup"):
        path = host.path(value)
    else:
        mount = cgroup_v1_mount(controller, host) or cgroup_v2_mount(host)
        if mount is None:
            raise Unavailable(f"no cgroup hierarchy with the {controller} controller is mounted")
        path = mount / value.strip("/")
    if not (path / "cgroup.procs").exists():
        raise BadInput(f"{where}.cgroup: {value} is not a cgroup ({path} has no cgroup.procs)")
    return path
