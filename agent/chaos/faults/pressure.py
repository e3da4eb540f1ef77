"""Resource pressure: CPU on chosen CPUs or inside one cgroup, memory on the host or in a cgroup.

Both are stress-ng children started with PR_SET_PDEATHSIG (stress-ng 0.15 gives its own
workers a parent-death signal too), in their own process group, with stress-ng's --timeout as
a second, independent cap: the pressure ends with the agent, with remove(), or at duration_s.
Inside a cgroup the child joins the cgroup before exec, so its workers compete for that cgroup's
CPU quota/shares or fill its memory limit, and nothing of the cgroup's settings is changed.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from core.errors import BadInput, Unavailable, WorkFailed
from core.host import Host, format_cpu_list, parse_cpu_list

from .base import Injector, end_process_group, is_alive, number, process_identity, spawn_owned
from .targets import resolve_cgroup

# Memory pressure never takes more than this share of MemAvailable: the agent never harms the host.
MAX_MEMORY_SHARE_OF_AVAILABLE = 0.75
START_TIMEOUT_S = 2.0


def stress_ng() -> str | None:
    return shutil.which("stress-ng")


class StressInjector(Injector):
    """A stress-ng child owned by the agent."""

    keys = frozenset({"cgroup"})
    controller = "cpu"

    @classmethod
    def availability(cls, host):
        if stress_ng() is None:
            return False, "stress-ng not installed: apt-get install stress-ng", ""
        return True, "", cls.backend_name()

    @classmethod
    def backend_name(cls) -> str:
        return "stress-ng child (PDEATHSIG)"

    def __init__(self, spec, host=None):
        super().__init__(spec, host)
        self.child: subprocess.Popen | None = None
        self.identity: dict | None = None
        self.cgroup: Path | None = None

    def check(self) -> None:
        super().check()
        if "cgroup" in self.spec:
            self.cgroup = resolve_cgroup(self.spec["cgroup"], self.controller, self.host, "target")

    def argv(self) -> list[str]:
        raise NotImplementedError

    def undo_record(self) -> dict:
        return {"kind": self.kind, "agent_pid": os.getpid(), "marker": self.marker()}

    def marker(self) -> str:
        # Set in the child's environment (inherited by its workers): lets undo() find them from
        # the record alone, without trusting a pid that may have been reused.
        return f"GUARDIAN_CHAOS_FAULT=guardian_chaos_{self.kind}_{id(self):x}_{os.getpid()}"

    def apply(self) -> None:
        if self.cgroup is None and "cgroup" in self.spec:
            self.check()
        timeout_s = max(1, math.ceil(self.spec["duration_s"]))
        argv = [stress_ng(), *self.argv(), "--timeout", f"{timeout_s}s"]
        procs = str(self.cgroup / "cgroup.procs") if self.cgroup is not None else None
        name, _, value = self.marker().partition("=")
        env = dict(os.environ, **{name: value})
        self.child = spawn_owned(argv, stderr=subprocess.DEVNULL, cgroup_procs=procs, env=env)
        self.identity = process_identity(self.child.pid)
        self.wait_started()

    def wait_started(self) -> None:
        """Active on return: stress-ng's workers exist (the parent forks them after parsing)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.workers():
            if self.child.poll() is not None:
                raise WorkFailed(f"{self.kind}: stress-ng exited at once (status {self.child.returncode})")
            if time.monotonic() > deadline:
                raise WorkFailed(f"{self.kind}: stress-ng started no worker within {START_TIMEOUT_S:g} s")
            time.sleep(0.005)

    def workers(self) -> list[int]:
        if self.child is None:
            return []
        return group_members(self.child.pid, exclude=self.child.pid)

    def remove(self) -> None:
        if self.child is not None and self.child.poll() is None:
            # The workers are the pressure: SIGKILL them first (their CPU time and memory end with
            # them; stress-ng's SIGTERM path took ~250 ms to free 64 MiB on a busy host), then
            # SIGTERM stress-ng, which reaps them. A group SIGKILL would orphan the workers as
            # zombies onto PID 1, which may not reap (not systemd).
            self.end_workers()
            self.gone_ns = time.time_ns()
            self.child.terminate()
            try:
                self.child.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        if self.identity is not None:
            end_process_group(self.identity)
        if self.child is not None:
            try:
                self.child.wait(timeout=1)
            except subprocess.TimeoutExpired:
                pass
        self.child = self.identity = None

    def end_workers(self) -> None:
        identities = [process_identity(pid) for pid in self.workers()]
        for identity in identities:
            try:
                os.kill(identity["pid"], signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 0.5
        while any(is_alive(identity) for identity in identities) and time.monotonic() < deadline:
            time.sleep(0.002)

    @staticmethod
    def undo(record: dict) -> None:
        for identity in processes_with_environment(record["marker"]):
            end_process_group(identity)


def processes_with_environment(entry_text: str) -> list[dict]:
    found = []
    needle = entry_text.encode()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            environment = Path(entry.path, "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in environment:
            found.append(process_identity(int(entry.name)))
    return found


def group_members(pgid: int, exclude: int | None = None) -> list[int]:
    members = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == exclude:
            continue
        try:
            raw = Path(entry.path, "stat").read_bytes()
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2:].split()
        if int(fields[2]) == pgid and fields[0] != b"Z":
            members.append(int(entry.name))
    return members


def process_cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            raw = Path(f"/proc/{pid}/stat").read_bytes()
        except OSError:
            continue
        fields = raw[raw.rfind(b")") + 2:].split()
        total += int(fields[11]) + int(fields[12])
    return total


def cpu_busy_ticks(host: Host, cpus: list[int]) -> tuple[int, int]:
    """(busy, total) jiffies summed over `cpus` from /proc/stat."""
    busy = total = 0
    for line in host.read_optional("/proc/stat").splitlines():
        name = line.split(" ", 1)[0]
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            values = [int(v) for v in line.split()[1:]]
            idle = values[3] + (values[4] if len(values) > 4 else 0)
            busy += sum(values[:8]) - idle
            total += sum(values[:8])
    return busy, total


class CpuInjector(StressInjector):
    kind = "cpu"
    description = "CPU pressure: stress-ng workers pinned to chosen CPUs, or inside one cgroup"
    keys = StressInjector.keys | {"cpus", "load_pct", "workers_per_cpu"}

    @classmethod
    def normalise(cls, spec, where):
        if "cpus" not in spec and "cgroup" not in spec:
            raise BadInput(f"{where}: name the target: cpus = \"1\" (a CPU list) and/or cgroup = \"path\"")
        if "cpus" in spec:
            value = spec["cpus"]
            try:
                cpus = parse_cpu_list(str(value)) if not isinstance(value, bool) else []
            except ValueError:
                cpus = []
            if not cpus:
                raise BadInput(f"{where}.cpus: must be a CPU list such as \"1\" or \"0-3,6\"")
            online = Host.real().online_cpus()
            missing = [cpu for cpu in cpus if cpu not in online]
            if missing:
                raise BadInput(f"{where}.cpus: CPU {format_cpu_list(missing)} is not online "
                               f"(online: {format_cpu_list(online)})")
            spec["cpus"] = format_cpu_list(cpus)
        spec["load_pct"] = number(spec, "load_pct", where, 1, 100, 100)
        spec["workers_per_cpu"] = number(spec, "workers_per_cpu", where, 1, 16, 1, integer=True)
        return spec

    def cpu_list(self) -> list[int]:
        return parse_cpu_list(self.spec["cpus"]) if "cpus" in self.spec else self.host.online_cpus()

    def argv(self) -> list[str]:
        cpus = self.cpu_list()
        argv = ["--cpu", str(len(cpus) * self.spec["workers_per_cpu"]), "--cpu-load", str(round(self.spec["load_pct"])),
                "--cpu-method", "int64"]
        if "cpus" in self.spec:
            argv += ["--taskset", self.spec["cpus"]]
        return argv

    def plan(self) -> dict:
        where = f"CPUs {self.spec['cpus']}" if "cpus" in self.spec else "all CPUs"
        if "cgroup" in self.spec:
            where += f", inside cgroup {self.spec['cgroup']}"
        return {"target": where, "backend": self.backend_name(),
                "undo": "SIGKILL the stress-ng process group (the kernel does it if the agent dies; "
                        "stress-ng --timeout caps it at duration_s)",
                "blast_radius": f"{self.spec['load_pct']:g}% load by {len(self.cpu_list()) * self.spec['workers_per_cpu']} "
                                f"worker(s) on {where}"}

    def proof(self) -> dict:
        cpus = self.cpu_list()
        workers = self.workers()
        busy_before, total_before = cpu_busy_ticks(self.host, cpus)
        stress_before = process_cpu_ticks(workers)
        time.sleep(0.5)
        busy_after, total_after = cpu_busy_ticks(self.host, cpus)
        stress_after = process_cpu_ticks(workers)
        total = max(1, total_after - total_before)
        busy_pct = 100 * (busy_after - busy_before) / total
        stress_pct = 100 * (stress_after - stress_before) / total
        expected = self.spec["load_pct"]
        return {"metric": "cpu_busy_pct", "expected": expected, "measured": round(busy_pct, 1),
                "stress_pct": round(stress_pct, 1), "cpus": format_cpu_list(cpus),
                # The workers got half their load, or the CPUs are as busy as asked anyway (a
                # host already loaded by others leaves the workers less: the pressure is there).
                "bit": bool(workers) and is_alive(self.identity) and (stress_pct >= expected * 0.5
                                                                      or busy_pct >= expected)}


class MemoryInjector(StressInjector):
    kind = "memory"
    description = "memory pressure: a stress-ng worker holding size_bytes resident (host or one cgroup)"
    controller = "memory"
    keys = StressInjector.keys | {"size_bytes", "size_pct"}

    @classmethod
    def normalise(cls, spec, where):
        if ("size_bytes" in spec) == ("size_pct" in spec):
            raise BadInput(f"{where}: give exactly one of size_bytes or size_pct (of MemAvailable)")
        if "size_bytes" in spec:
            spec["size_bytes"] = number(spec, "size_bytes", where, 1 << 20, 1 << 50, integer=True)
        else:
            spec["size_pct"] = number(spec, "size_pct", where, 1, 100 * MAX_MEMORY_SHARE_OF_AVAILABLE)
        return spec

    def __init__(self, spec, host=None):
        super().__init__(spec, host)
        self.size_bytes = 0

    def check(self) -> None:
        super().check()
        available = mem_available_bytes(self.host)
        wanted = self.spec.get("size_bytes") or int(available * self.spec["size_pct"] / 100)
        cap = int(available * MAX_MEMORY_SHARE_OF_AVAILABLE)
        if wanted > cap:
            raise BadInput(f"fault.size_bytes: {wanted} is above {MAX_MEMORY_SHARE_OF_AVAILABLE:.0%} of "
                           f"MemAvailable ({available} bytes): the agent never harms the host")
        self.size_bytes = wanted

    def argv(self) -> list[str]:
        if not self.size_bytes:
            self.check()
        # --vm-populate faults every page in at mmap time; --vm-hang 0 then holds them without
        # burning CPU (the default worker rewrites its pages in a loop).
        return ["--vm", "1", "--vm-bytes", str(self.size_bytes), "--vm-populate", "--vm-hang", "0"]

    def wait_started(self) -> None:
        super().wait_started()
        # Active on return means resident: wait (bounded) until the worker's RSS reached 90%.
        deadline = time.monotonic() + START_TIMEOUT_S
        while resident_bytes(self.workers()) < self.size_bytes * 0.9 and time.monotonic() < deadline:
            time.sleep(0.005)

    def plan(self) -> dict:
        if not self.size_bytes:
            self.check()
        where = f"cgroup {self.spec['cgroup']}" if "cgroup" in self.spec else "the host"
        return {"target": where, "backend": self.backend_name(),
                "undo": "SIGKILL the stress-ng process group (the kernel does it if the agent dies)",
                "blast_radius": f"{self.size_bytes} bytes resident in {where} (cap: "
                                f"{MAX_MEMORY_SHARE_OF_AVAILABLE:.0%} of MemAvailable)"}

    def proof(self) -> dict:
        resident = resident_bytes(self.workers())
        return {"metric": "resident_bytes", "expected": self.size_bytes, "measured": resident,
                "mem_available_bytes": mem_available_bytes(self.host),
                "bit": resident >= self.size_bytes * 0.9 and is_alive(self.identity)}


def mem_available_bytes(host: Host) -> int:
    for line in host.read_optional("/proc/meminfo").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise Unavailable("/proc/meminfo has no MemAvailable")


def resident_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total
