"""Which processes a probe should look at: by pid, by process name, or by systemd unit.

Every lookup goes through the `Host` seam (/proc and /sys/fs/cgroup), so tests resolve targets in
a fake tree. Shared by every probe that takes a target (stacks, syscalls, tcp ...):

    targets = resolve_targets(config.host, config.pids, config.process_names, config.units)
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass
from typing import Iterable

from core.errors import BadInput
from core.host import Host

__all__ = ["Target", "resolve_targets", "pids_by_name", "pids_of_unit", "process_comm",
           "process_exe_name", "children_of"]

_UNIT_SUFFIXES = (".service", ".scope", ".slice", ".socket", ".timer", ".mount")
_UNIT_NAME = re.compile(r"^[A-Za-z0-9:_.@\\-]+$")


@dataclass(frozen=True)
class Target:
    pid: int
    comm: str
    # How the user named it: "pid", "name:NAME" or "unit:UNIT" (shown in reasons and findings).
    selected_by: str


def _all_pids(host: Host) -> list[int]:
    try:
        entries = os.listdir(host.path("/proc"))
    except OSError:
        return []
    return sorted(int(entry) for entry in entries if entry.isdigit())


def process_comm(host: Host, pid: int) -> str:
    return host.read_optional(f"/proc/{pid}/comm")


def _cmdline_argv(host: Host, pid: int) -> list[str]:
    try:
        raw = host.read_bytes(f"/proc/{pid}/cmdline")
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def process_exe_name(host: Host, pid: int) -> str:
    """Basename of argv[0] (what `pgrep -f`'s users usually mean), or "" for kernel threads."""
    argv = _cmdline_argv(host, pid)
    return os.path.basename(argv[0]) if argv else ""


def pids_by_name(host: Host, name: str, exclude: Iterable[int] = ()) -> list[int]:
    """Processes whose comm (15-char kernel name), argv[0] basename, or script (argv[1] of an
    interpreter, e.g. `python3 feed_handler.py`) equals `name`."""
    excluded = set(exclude)
    matches = []
    for pid in _all_pids(host):
        if pid in excluded:
            continue
        comm = process_comm(host, pid)
        argv = _cmdline_argv(host, pid)
        candidates = {comm}
        if argv:
            candidates.add(os.path.basename(argv[0]))
            # comm is truncated to 15 characters by the kernel (TASK_COMM_LEN 16).
            if len(name) > 15 and len(comm) == 15 and name.startswith(comm):
                candidates.add(name)
            for arg in argv[1:3]:
                if not arg.startswith("-"):
                    candidates.add(os.path.basename(arg))
                    break
        if name in candidates:
            matches.append(pid)
    return matches


def _unit_name(unit: str) -> str:
    if not _UNIT_NAME.match(unit):
        raise BadInput(f"--unit {unit!r}: not a systemd unit name")
    return unit if unit.endswith(_UNIT_SUFFIXES) else f"{unit}.service"


def _unit_cgroup(host: Host, unit: str) -> str | None:
    """The unit's cgroup path: systemd's answer when it runs, else the usual cgroup v2 places."""
    if host.is_real:
        try:
            result = subprocess.run(["systemctl", "show", "--property=ControlGroup", "--value", unit],
                                    capture_output=True, text=True, timeout=5)
            cgroup = result.stdout.strip()
            if result.returncode == 0 and cgroup:
                return cgroup
        except (OSError, subprocess.TimeoutExpired):
            pass
    for slice_name in ("system.slice", "user.slice", ""):
        candidate = f"/{slice_name}/{unit}" if slice_name else f"/{unit}"
        if host.path(f"/sys/fs/cgroup{candidate}").is_dir():
            return candidate
    return None


def pids_of_unit(host: Host, unit: str) -> list[int]:
    """Every process in the unit's cgroup (including nested cgroups such as a service's workers)."""
    name = _unit_name(unit)
    cgroup = _unit_cgroup(host, name)
    if cgroup is None:
        return []
    base = host.path(f"/sys/fs/cgroup{cgroup}")
    pids: set[int] = set()
    for directory, _subdirs, files in os.walk(base):
        if "cgroup.procs" in files:
            try:
                with open(os.path.join(directory, "cgroup.procs")) as handle:
                    text = handle.read()
            except OSError:
                continue
            pids.update(int(line) for line in text.split() if line.isdigit())
    return sorted(pids)


def children_of(host: Host, pid: int) -> list[int]:
    """Direct children from /proc/PID/task/*/children (CONFIG_PROC_CHILDREN, on in distro kernels)."""
    children: set[int] = set()
    try:
        tasks = os.listdir(host.path(f"/proc/{pid}/task"))
    except OSError:
        return []
    for task in tasks:
        text = host.read_optional(f"/proc/{pid}/task/{task}/children")
        children.update(int(part) for part in text.split() if part.isdigit())
    return sorted(children)


def resolve_targets(host: Host, pids: Iterable[int] = (), process_names: Iterable[str] | None = (),
                    units: Iterable[str] | None = ()) -> list[Target]:
    """Targets in the order given, each pid once. Raises BadInput for a name or unit that matches
    nothing (a typo should not silently profile nothing)."""
    found: dict[int, Target] = {}
    own = {os.getpid()} if host.is_real else set()
    for pid in pids:
        if not host.pid_exists(pid):
            raise BadInput(f"--pid {pid}: no such process")
        found.setdefault(pid, Target(pid, process_comm(host, pid), "pid"))
    for name in process_names or ():
        matched = pids_by_name(host, name, exclude=own)
        if not matched:
            raise BadInput(f"--process {name}: no running process has that name")
        for pid in matched:
            found.setdefault(pid, Target(pid, process_comm(host, pid), f"name:{name}"))
    for unit in units or ():
        matched = pids_of_unit(host, unit)
        if not matched:
            raise BadInput(f"--unit {unit}: no running processes (is the unit active?)")
        for pid in matched:
            found.setdefault(pid, Target(pid, process_comm(host, pid), f"unit:{_unit_name(unit)}"))
    return list(found.values())
