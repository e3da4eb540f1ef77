"""The injector contract shared by every fault kind, and the helpers they all need.

Lifetime rule ("nothing outlives the agent"): an injector whose `owned_by_kernel` is
True builds its fault only from objects the kernel removes when the agent dies (an nft table with
`flags owner` held by a child, children started with PR_SET_PDEATHSIG). An injector with False
(freezer state, SIGSTOP) is journaled by the runner through `undo_record()` before `apply()` and
undone from that record alone by `undo()` (abort, sweep, watchdog).
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time
from typing import Any, ClassVar

from core.errors import Unavailable, WorkFailed
from core.host import Host
from core.toml_config import MISSING, TomlDocument, TomlTable

# Hard caps every fault obeys whatever the experiment says (the blast radius).
MAX_DURATION_S = 3600.0
MAX_SHARE_PCT = 100.0
# Prefix of every kernel object a fault creates (nft tables, cgroups), so a sweep finds them.
OBJECT_PREFIX = "guardian_chaos_"

_PR_SET_PDEATHSIG = 1
# The fault's own helpers (the proxy, the nft holders) run at least this favoured: on a busy host a
# SIGKILLed holder at nice 0 waited ~25-35 ms for a CPU to run its exit (measured at load 11 on
# 2 cores), the time the fault outlived its removal; at -10 the exit preempts ordinary work. The
# proxy relays the system under test's traffic: it must add the injected delay, not its own.
# Never for load generators (stress-ng): they must not outrank what they put pressure on.
HELPER_NICE = -10


class Injector:
    """One fault kind. Subclasses fill the class variables and the methods below."""

    kind: ClassVar[str] = ""
    description: ClassVar[str] = ""
    owned_by_kernel: ClassVar[bool] = True
    # Keys a spec may carry besides the common ones (kind, duration_s, target...).
    keys: ClassVar[frozenset[str]] = frozenset()
    required: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, spec: dict, host: Host | None = None):
        self.spec = spec
        self.host = host or Host.real()
        # Set by remove() when the fault stopped acting before its clean-up and checks finished
        # (the runner reports that moment as the removal); None: when remove() returned.
        self.gone_ns: int | None = None

    # --- validation, before anything is touched -------------------------------------------------
    @classmethod
    def validate(cls, spec: dict, where: str) -> dict:
        table = spec_table(spec, where)
        table.check_keys(cls.keys | {"kind", "duration_s"})
        for key in sorted(cls.required | {"duration_s"}):
            if key not in table:
                table.fail(key, "missing required key")
        normal = dict(spec)
        normal["kind"] = cls.kind
        normal["duration_s"] = number(spec, "duration_s", where, 0.1, MAX_DURATION_S)
        return cls.normalise(normal, where)

    @classmethod
    def normalise(cls, spec: dict, where: str) -> dict:
        """Kind-specific checks; returns the normalised spec."""
        return spec

    @classmethod
    def availability(cls, host: Host) -> tuple[bool, str, str]:
        return True, "", ""

    # --- lifecycle -----------------------------------------------------------------------------
    def check(self) -> None:
        available, reason, _backend = self.availability(self.host)
        if not available:
            raise Unavailable(f"{self.kind}: {reason}")

    def plan(self) -> dict:
        raise NotImplementedError

    def undo_record(self) -> dict:
        raise NotImplementedError

    def apply(self) -> None:
        raise NotImplementedError

    def remove(self) -> None:
        raise NotImplementedError

    def discard(self) -> None:
        """End what check() prepared (a stopped standby child) when apply() never comes."""

    def proof(self) -> dict:
        raise NotImplementedError

    @staticmethod
    def undo(record: dict) -> None:
        raise NotImplementedError


# --- spec helpers: core/toml_config's rules and wording, on a fault's spec dict -------------------
def spec_table(spec: dict, where: str) -> TomlTable:
    """`spec` as a TOML table whose keys continue the path `where` ("exp.toml: fault[0]")."""
    return TomlTable(spec, TomlDocument(where, key_separator="."))


def number(spec: dict, key: str, where: str, low: float, high: float, default: Any = None,
           integer: bool = False) -> float:
    """A number in [low, high]; None as the default: the key is required."""
    return spec_table(spec, where).number(key, MISSING if default is None else default, low=low, high=high,
                                          integer=integer)


def text(spec: dict, key: str, where: str, default: str | None = None,
         choices: tuple[str, ...] | None = None) -> str:
    table = spec_table(spec, where)
    default = MISSING if default is None else default
    value = table.string(key, default) if choices is None else table.choice(key, choices, default)
    return value.strip()


def share(spec: dict, where: str, default: float | None = None) -> float:
    """`share_pct`: the affected share of requests/packets/connections, above 0 and capped."""
    table = spec_table(spec, where)
    value = table.number("share_pct", MISSING if default is None else default, positive=True, high=MAX_SHARE_PCT)
    if "max_share_pct" in table:
        cap = table.number("max_share_pct", positive=True, high=MAX_SHARE_PCT)
        if value > cap:
            table.fail("share_pct", f"{value:g} is above the blast-radius cap max_share_pct = {cap:g}")
    return value


def favour_helper() -> None:
    """Raise this process to HELPER_NICE unless it already runs better (root only; else as is)."""
    try:
        current = os.getpriority(os.PRIO_PROCESS, 0)
        if current > HELPER_NICE:
            os.setpriority(os.PRIO_PROCESS, 0, HELPER_NICE)
    except OSError:
        pass


def run_id() -> str:
    """A short unique suffix for kernel object names: pid plus random bits."""
    return f"{os.getpid()}_{os.urandom(3).hex()}"


# --- children that die with the agent ------------------------------------------------------------
def _die_with_parent(parent_pid: int) -> None:
    # Runs in the child between fork and exec. PR_SET_PDEATHSIG fires when the forking *thread*
    # exits, and a parent that died before prctl() ran is caught by the getppid() check.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)
    os.setpgid(0, 0)  # own process group: remove() ends the child and its workers in one kill


def spawn_owned(argv: list[str], *, stdin: Any = subprocess.DEVNULL, stdout: Any = subprocess.DEVNULL,
                stderr: Any = subprocess.PIPE, text_mode: bool = True, cgroup_procs: str | None = None,
                env: dict | None = None, helper: bool = False) -> subprocess.Popen:
    """Start a child that the kernel kills when the agent dies (SIGKILL via PDEATHSIG).

    `cgroup_procs`: a cgroup.procs file the child joins before exec, so its workers are born in
    the target cgroup (CPU/memory pressure inside one cgroup).
    `helper`: the fault's own machinery (proxy, nft holder): run at HELPER_NICE or better."""
    parent_pid = os.getpid()

    def prepare() -> None:
        _die_with_parent(parent_pid)
        if helper:
            favour_helper()
        if cgroup_procs:
            with open(cgroup_procs, "w") as handle:
                handle.write(str(os.getpid()))

    return subprocess.Popen(argv, stdin=stdin, stdout=stdout, stderr=stderr, text=text_mode,
                            preexec_fn=prepare, close_fds=True, env=env)


def process_start_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat: with the pid it names one process even after pid reuse."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2:].split()
    return int(fields[19])


def process_identity(pid: int) -> dict:
    return {"pid": pid, "start_ticks": process_start_ticks(pid)}


def is_same_process(identity: dict) -> bool:
    pid = identity.get("pid")
    return bool(pid) and process_start_ticks(pid) is not None and \
        process_start_ticks(pid) == identity.get("start_ticks")


def is_alive(identity: dict) -> bool:
    """The same process, and not a zombie waiting for its parent to reap it."""
    return is_same_process(identity) and _state(identity["pid"]) != "Z"


def end_process_group(identity: dict, timeout_s: float = 1.0) -> None:
    """SIGKILL a child we started (and its process group) if it is still the same process; reap it."""
    if not is_same_process(identity):
        return
    pid = identity["pid"]
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return
    deadline = time.monotonic() + timeout_s
    exit_fd = _pidfd(pid)
    try:
        while time.monotonic() < deadline:
            try:
                done, _status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # not our child (undo from another process): watch it end
                # A zombie has already closed its files (its nft socket, its listening port).
                if not is_same_process(identity) or _state(pid) == "Z":
                    return
                _wait_exit(exit_fd, deadline)
                continue
            if done:
                return
            _wait_exit(exit_fd, deadline)
    finally:
        if exit_fd is not None:
            os.close(exit_fd)
    if is_same_process(identity) and _state(pid) != "Z":
        raise WorkFailed(f"process {pid} did not end within {timeout_s:g} s of SIGKILL")


def _pidfd(pid: int) -> int | None:
    """A pidfd turns readable the moment the process exits (Linux >= 5.3): no sleep-poll whose
    granularity (and a busy host's wake-up delay) would count as time the fault outlived its removal."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _wait_exit(exit_fd: int | None, deadline: float) -> None:
    if exit_fd is None:
        time.sleep(0.002)
        return
    import select

    select.select([exit_fd], [], [], max(0.0, min(0.05, deadline - time.monotonic())))


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            raw = handle.read()
    except OSError:
        return ""
    return raw[raw.rfind(b")") + 2:].split()[0].decode()
