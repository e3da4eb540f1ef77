"""Resource pressure: CPU on chosen CPUs or inside one cgroup, memory on the host or in a cgroup.

Both start in check() on standby, stopped, so apply() is one SIGCONT (the budget: active within
100 ms; at load ~11 stress-ng took ~500 ms to fork its workers and 64 MiB took ~1.2 s to fill):
  cpu     a stress-ng child whose workers are SIGSTOPped once they exist, plus a stopped cap child
          that, once continued, ends the group at duration_s (stress-ng's own --timeout runs
          from its start, so on standby it is only the outer cap: duration_s + STANDBY_MAX_S).
  memory  an agent-owned child (python -I -S) stopped before it allocates anything; continued,
          it arms alarm(duration_s) (the kernel's cap) and mmaps size_bytes with MAP_POPULATE.
Every child has PR_SET_PDEATHSIG and its own process group (stopped stress-ng workers die too:
their orphaned group gets SIGHUP+SIGCONT from the kernel) and carries the marker environment
undo() searches. A standby never applied is ended by discard() (a refused or aborted run).
Inside a cgroup the child joins the cgroup before exec, so its workers compete for that cgroup's
CPU quota/shares or fill its memory limit, and nothing of the cgroup's settings is changed.
"""

from __future__ import annotations

import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from core.errors import BadInput, Unavailable, WorkFailed
from core.host import Host, format_cpu_list, parse_cpu_list

from .base import Injector, end_process_group, is_alive, number, process_identity, spawn_owned
from .targets import resolve_cgroup

# Memory pressure never takes more than this share of MemAvailable: the agent never harms the host.
MAX_MEMORY_SHARE_OF_AVAILABLE = 0.75
START_TIMEOUT_S = 2.0
# Standby start-up happens before the run (check()): a loaded host may take longer than at apply.
STANDBY_TIMEOUT_S = 10.0
# The longest check() -> apply() wait a standby serves (watchdog start <= 15 s, warm-up, before_s
# <= 600 s); older, apply() starts a fresh one (stress-ng's --timeout covers exactly this much).
STANDBY_MAX_S = 630.0

# The standby child: stops itself, and once apply() continues it either holds memory (the kernel
# ends it at duration_s: SIGALRM's default action) or, as the cap of a stress-ng group, ends that
# group at duration_s if it is still the same process (start ticks: no pid reuse).
STANDBY_CHILD = r"""
import mmap, os, signal, sys, time
mode, seconds = sys.argv[1], float(sys.argv[2])
if mode == "memory":
    try:
        with open("/proc/self/oom_score_adj", "w") as handle:
            handle.write("1000")  # the OOM killer's first choice, as stress-ng makes its vm worker
    except OSError:
        pass
os.kill(os.getpid(), signal.SIGSTOP)
if mode == "memory":
    signal.alarm(max(1, round(seconds + 0.499)))
    area = mmap.mmap(-1, int(sys.argv[3]), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    while True:
        signal.pause()
time.sleep(seconds)
pgid, ticks = int(sys.argv[3]), sys.argv[4]
def same():
    try:
        with open(f"/proc/{pgid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19] == ticks
    except OSError:
        return False
# SIGALRM is stress-ng's own timeout: its workers stop and it reaps them (~50 ms); SIGKILL later.
for signum, grace_s in ((signal.SIGALRM, 1.0), (signal.SIGKILL, 0)):
    if same():
        os.killpg(pgid, signum)
        time.sleep(grace_s)
"""


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
        self.cap: subprocess.Popen | None = None
        self.stopped: list[dict] = []
        self.standby_at = 0.0

    def check(self) -> None:
        super().check()
        if "cgroup" in self.spec:
            self.cgroup = resolve_cgroup(self.spec["cgroup"], self.controller, self.host, "target")
        if self.child is None:
            self.start_standby()

    def argv(self) -> list[str]:
        raise NotImplementedError

    def undo_record(self) -> dict:
        return {"kind": self.kind, "agent_pid": os.getpid(), "marker": self.marker()}

    def marker(self) -> str:
        # Set in the child's environment (inherited by its workers): lets undo() find them from
        # the record alone, without trusting a pid that may have been reused.
        return f"GUARDIAN_CHAOS_FAULT=guardian_chaos_{self.kind}_{id(self):x}_{os.getpid()}"

    def spawn(self, argv: list[str], cgroup: bool = True, helper: bool = False) -> subprocess.Popen:
        procs = str(self.cgroup / "cgroup.procs") if self.cgroup is not None and cgroup else None
        name, _, value = self.marker().partition("=")
        return spawn_owned(argv, stderr=subprocess.DEVNULL, cgroup_procs=procs, env=dict(os.environ, **{name: value}),
                           helper=helper)

    def start_standby(self) -> None:
        """stress-ng with every worker forked and SIGSTOPped, and its stopped cap child."""
        duration_s = self.spec["duration_s"]
        timeout_s = math.ceil(duration_s + STANDBY_MAX_S)
        self.child = self.spawn([stress_ng(), *self.argv(), "--timeout", f"{timeout_s}s"])
        self.identity = process_identity(self.child.pid)
        self.standby_at = time.monotonic()
        deadline = time.monotonic() + STANDBY_TIMEOUT_S
        while len(self.stopped) < self.worker_count():
            self.stop_new_workers()
            self.check_starting(deadline)
            time.sleep(0.002)
        self.cap = self.spawn([sys.executable, "-I", "-S", "-c", STANDBY_CHILD, "cap", f"{duration_s:g}",
                               str(self.child.pid), str(self.identity["start_ticks"])], cgroup=False)
        wait_stopped(self.cap, self.kind)

    def worker_count(self) -> int:
        raise NotImplementedError

    def stop_new_workers(self) -> None:
        known = {identity["pid"] for identity in self.stopped}
        for pid in self.workers():
            if pid not in known:
                identity = process_identity(pid)
                try:
                    os.kill(pid, signal.SIGSTOP)
                except ProcessLookupError:
                    continue
                self.stopped.append(identity)

    def check_starting(self, deadline: float) -> None:
        if self.child.poll() is not None:
            self.discard()
            raise WorkFailed(f"{self.kind}: stress-ng exited at once")
        if time.monotonic() > deadline:
            self.discard()
            raise WorkFailed(f"{self.kind}: stress-ng did not start its {self.worker_count()} worker(s) "
                             f"within {STANDBY_TIMEOUT_S:g} s")

    def apply(self) -> None:
        if self.cgroup is None and "cgroup" in self.spec:
            self.check()
        if self.child is None or self.child.poll() is not None or time.monotonic() - self.standby_at > STANDBY_MAX_S:
            self.discard()
            self.start_standby()
        self.go()

    def go(self) -> None:
        """Active on return: the stopped workers are continued (they run at their next tick)."""
        for identity in self.stopped:
            if is_alive(identity):
                os.kill(identity["pid"], signal.SIGCONT)
        os.kill(self.cap.pid, signal.SIGCONT)

    def discard(self) -> None:
        """End a standby that was never applied (or any state): nothing of it survives."""
        self.remove()
        self.gone_ns = None

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
        if self.cap is not None:
            end_process_group(process_identity(self.cap.pid))
            self.cap.poll()
        self.child = self.identity = self.cap = None
        self.stopped = []

    def end_workers(self) -> None:
        # The workers stopped on standby are known: no /proc scan (60-85 ms on a busy host).
        identities = self.stopped or [process_identity(pid) for pid in self.workers()]
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


def wait_stopped(child: subprocess.Popen, kind: str) -> None:
    """Until the standby child stopped itself (state T), bounded."""
    deadline = time.monotonic() + STANDBY_TIMEOUT_S
    while True:
        try:
            raw = Path(f"/proc/{child.pid}/stat").read_bytes()
            if raw[raw.rfind(b")") + 2:].split()[0] == b"T":
                return
        except OSError:
            pass
        if child.poll() is not None or time.monotonic() > deadline:
            end_process_group(process_identity(child.pid))
            raise WorkFailed(f"{kind}: the standby child did not start (status {child.poll()})")
        time.sleep(0.002)


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

    def worker_count(self) -> int:
        return len(self.cpu_list()) * self.spec["workers_per_cpu"]

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
                        "a cap child ends it at duration_s)",
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

    @classmethod
    def availability(cls, host):
        return True, "", cls.backend_name()

    @classmethod
    def backend_name(cls) -> str:
        return "agent-owned child (PDEATHSIG, MAP_POPULATE)"

    def __init__(self, spec, host=None):
        super().__init__(spec, host)
        self.size_bytes = 0

    def check(self) -> None:
        # The size first: the standby started by super().check() is told how much to hold.
        available = mem_available_bytes(self.host)
        wanted = self.spec.get("size_bytes") or int(available * self.spec["size_pct"] / 100)
        cap = int(available * MAX_MEMORY_SHARE_OF_AVAILABLE)
        if wanted > cap:
            raise BadInput(f"fault.size_bytes: {wanted} is above {MAX_MEMORY_SHARE_OF_AVAILABLE:.0%} of "
                           f"MemAvailable ({available} bytes): the agent never harms the host")
        self.size_bytes = wanted
        super().check()

    def start_standby(self) -> None:
        """The child, stopped before it allocates anything: it holds ~6 MiB (the interpreter).
        At HELPER_NICE: it burns no CPU once its pages are in, but faulting them in (and freeing
        them at SIGKILL: the exit runs in its context) at nice 0 behind 8 CPU hogs took ~300 ms
        (~100 ms to free) instead of ~30 (~10): a one-shot step of the fault, not a load."""
        self.child = self.spawn([sys.executable, "-I", "-S", "-c", STANDBY_CHILD, "memory",
                                 f"{self.spec['duration_s']:g}", str(self.size_bytes)], helper=True)
        self.identity = process_identity(self.child.pid)
        self.standby_at = time.monotonic()
        wait_stopped(self.child, self.kind)
        self.stopped = [self.identity]

    def workers(self) -> list[int]:
        return [self.child.pid] if self.child is not None and self.child.poll() is None else []

    def go(self) -> None:
        """Active on return means resident: wait (bounded) until the child's RSS reached 90%.
        MAP_POPULATE: ~0.5 ms per MiB at load 7 here (64 MiB 38 ms, 512 MiB 270 ms); touching
        transparent huge pages (madvise) was slower: 64 MiB 243 ms, compaction stalls."""
        os.kill(self.child.pid, signal.SIGCONT)
        deadline = time.monotonic() + START_TIMEOUT_S
        while resident_bytes(self.workers()) < self.size_bytes * 0.9 and time.monotonic() < deadline:
            if self.child.poll() is not None:
                raise WorkFailed(f"{self.kind}: the memory child ended while allocating (status "
                                 f"{self.child.returncode}; a cgroup limit below size_bytes?)")
            time.sleep(0.002)

    def plan(self) -> dict:
        if not self.size_bytes:
            self.check()
        where = f"cgroup {self.spec['cgroup']}" if "cgroup" in self.spec else "the host"
        return {"target": where, "backend": self.backend_name(),
                "undo": "SIGKILL the memory child (the kernel does it if the agent dies; alarm() caps it "
                        "at duration_s)",
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
