"""Child processes that die with the agent, and their temporary directories.

A SIGKILL of `audit` (OOM killer, `kill -9`, a crashed daemon) used to leave tcpdump capturing and
py-spy sampling a trading process forever, re-parented to PID 1. Every child the agent starts goes
through `spawn()`/`run()` here, which ask the kernel to SIGKILL the child when its parent dies
(prctl PR_SET_PDEATHSIG, set in the child between fork and exec, so no window where the agent is
dead and the child is not yet armed goes unnoticed: the child checks its parent right after).

Why one long-lived spawner thread: the kernel ties PR_SET_PDEATHSIG to the *thread* that forked
the child, not to the process (prctl(2): "the 'parent' in this case is considered to be the thread
that created this process"). The runner prepares and collects each probe in its own short-lived
thread, so a tcpdump forked from the capture probe's prepare thread would be killed the moment
that thread returned. Forking from one thread that lives as long as the process makes "parent
death" mean what we want: the agent's death.

Deliberate exceptions, which must outlive the agent and do not use this module: the PM QoS holder
(agent/tuning: /dev/cpu_dma_latency only holds while a process keeps it open, and its lifetime is
the tuning journal's) and the rollout watchdog (agent/rollout: its job is to roll back after the
driver died).

Cost (benchmarks/bench_children.py, 2-core shared VM, 2026-12-01): starting `true` takes ~4 ms
median through spawn() vs ~1.1 ms for a plain Popen (preexec_fn forces fork instead of vfork) and
~2 ms for `setpriv --pdeathsig KILL`; a few children per audit, so it is noise. A SIGKILLed
parent's child is gone ~1.4 ms later (max 6 ms over 30 rounds).

Temporary directories: `private_temp_dir(kind)` names each one after its owner (pid and process
start time, so a recycled pid is not mistaken for the owner); `clean_stale_temp_dirs()` removes
those whose owner is gone, at the next start.
"""

from __future__ import annotations

import ctypes
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
TEMP_PREFIX = "guardian-"
TEMP_KINDS = ("capture", "stacks")
_TEMP_NAME = re.compile(r"^guardian-(?P<kind>[a-z]+)-(?P<pid>\d+)\.(?P<start>\d+)-")

# Loaded before any fork: dlopen in the forked child of a threaded parent could deadlock.
_LIBC = ctypes.CDLL(None, use_errno=True)
_prctl = _LIBC.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int


def die_with_parent(parent_pid: int) -> None:
    """In a freshly forked child: have the kernel SIGKILL us when the forking thread dies.
    Also for a bare os.fork() (the daemon's per-window child)."""
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        # The agent died between fork and prctl: nobody would ever send the signal.
        os.kill(os.getpid(), signal.SIGKILL)


def _arm_parent_death_signal(parent_pid: int) -> Callable[[], None]:
    def preexec() -> None:
        # Runs in the child after fork, before exec: a syscall and a pid check, nothing that locks.
        die_with_parent(parent_pid)

    return preexec


class _Spawner:
    """One daemon thread that forks every child, for the life of the process (see above)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Fresh state; also run in a forked child (the daemon's window), where the spawner
        thread does not exist and the lock may have been copied while held."""
        self._requests: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._serve, name="guardian-spawner", daemon=True)
                self._thread.start()

    def _serve(self) -> None:
        while True:
            command, kwargs, reply = self._requests.get()
            try:
                reply.put((subprocess.Popen(command, **kwargs), None))
            except BaseException as error:  # noqa: BLE001 - handed back to the caller's thread
                reply.put((None, error))

    def popen(self, command: list[str] | str, kwargs: dict[str, Any]) -> subprocess.Popen:
        self._ensure_thread()
        if threading.current_thread() is self._thread:
            return subprocess.Popen(command, **kwargs)
        reply: queue.Queue = queue.Queue(maxsize=1)
        self._requests.put((command, kwargs, reply))
        process, error = reply.get()
        if error is not None:
            raise error
        return process


_SPAWNER = _Spawner()
os.register_at_fork(after_in_child=_SPAWNER.reset)


def spawn(command: list[str] | str, **popen_kwargs: Any) -> subprocess.Popen:
    """subprocess.Popen whose child is SIGKILLed by the kernel when the agent dies."""
    if "preexec_fn" in popen_kwargs:
        raise ValueError("spawn() sets preexec_fn itself")
    popen_kwargs["preexec_fn"] = _arm_parent_death_signal(os.getpid())
    return _SPAWNER.popen(command, popen_kwargs)


def run(command: list[str] | str, *, timeout: float | None = None, capture_output: bool = False,
        input: Any = None, **popen_kwargs: Any) -> subprocess.CompletedProcess:
    """subprocess.run through spawn(): same arguments, same results, same TimeoutExpired."""
    if capture_output:
        popen_kwargs["stdout"] = popen_kwargs["stderr"] = subprocess.PIPE
    if input is not None:
        popen_kwargs["stdin"] = subprocess.PIPE
    with spawn(command, **popen_kwargs) as process:
        try:
            stdout, stderr = process.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.communicate()
            raise
        except BaseException:
            process.kill()
            raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


# ---------------------------------------------------------------------------------------------
# Temporary directories owned by this process


def _start_time_ticks(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat (clock ticks since boot): with the pid, it names one process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after its last ')'.
    fields = text[text.rindex(")") + 2:].split()
    return int(fields[19])


def private_temp_dir(kind: str) -> Path:
    """A fresh temp directory named after this process, after sweeping stale ones."""
    if kind not in TEMP_KINDS:
        raise ValueError(f"temp dir kind must be one of {TEMP_KINDS}")
    clean_stale_temp_dirs()
    pid = os.getpid()
    return Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}{kind}-{pid}.{_start_time_ticks(pid) or 0}-"))


def clean_stale_temp_dirs(base: Path | None = None) -> list[Path]:
    """Remove the agent's temp directories whose owning process no longer exists."""
    base = Path(base or tempfile.gettempdir())
    removed = []
    try:
        entries = list(base.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if not match or match.group("kind") not in TEMP_KINDS:
            continue
        pid, start = int(match.group("pid")), int(match.group("start"))
        if _start_time_ticks(pid) == start:
            continue  # its owner is still running
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed
