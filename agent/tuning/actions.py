"""Tuning action kinds: one class per kind of change apply can make, registered by name.

Each kind says what to journal before it acts (`journal_fields`: the original bytes, whether a
directory existed, the holder's token), how to act (`apply`), how to undo from the journal alone
(`undo`, comparing the value now with the original and the target first, so running it twice is
harmless) and what `tune status` shows (`state`). The engine dispatches through ACTION_KINDS; a
new kind (cgroup limits for chaos, the tuning experiments' changes) is one class here.

    write    a /proc/sys, /sys or cgroup file (or /etc/sysctl.d with --persist): exact bytes back
    mkdir    a cgroup directory apply created: removed again
    pm_qos   a /dev/cpu_dma_latency request, held by a child process (agent/tuning/qos_holder.py)
"""

from __future__ import annotations

import errno
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from core.host import Host
from agent.tuning.journal import decode, encode
from probes.kernel_tuning.plan import Action, compare_key, read_raw, selected_word

HOLDER_MODULE = "agent.tuning.qos_holder"
# Kept out of the holder's environment: the crash tests' kill point is for the agent itself.
KILL_AT_ENV = "GUARDIAN_AGENT_TEST_KILL_AT"


@dataclass
class StepResult:
    item: str
    path: str
    result: str  # applied | restored | unchanged | kept (drift) | forced | refused | not replayed | failed
    detail: str = ""


@dataclass(frozen=True)
class UndoContext:
    host: Host
    force: bool
    created_dirs: frozenset[str]  # directories apply created (their files vanish with them)


def _write_file(host: Host, absolute: str, data: bytes) -> None:
    # One write() call: /proc/sys and sysfs parse a value per write, a split write is two values.
    fd = os.open(host.path(absolute), os.O_WRONLY | os.O_TRUNC | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(5, f"short write ({written} of {len(data)} bytes)")
    finally:
        os.close(fd)


def restore_bytes(host: Host, action: dict, original: bytes) -> bytes:
    """What to write to get the original back. Exact bytes, except for selection attributes
    (THP: "always [madvise] never") where the kernel only accepts the selected word; a fake tree's
    plain file takes the exact bytes."""
    if action.get("compare") == "selection" and host.is_real:
        return selected_word(original.decode(errors="replace")).encode() + b"\n"
    return original


def find_holders(token: str) -> list[int]:
    """PIDs of PM QoS holders started for this journal step (found by the token in argv, so a
    holder started just before a crash, whose pid never reached the journal, is still found)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if token.encode() in argv and HOLDER_MODULE.encode() in argv:
            pids.append(int(entry.name))
    return pids


def stop_holders(token: str, timeout_s: float = 3.0) -> int:
    pids = find_holders(token)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and find_holders(token):
        time.sleep(0.02)
    for pid in find_holders(token):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return len(pids)


def start_holder(value_us: int, token: str, timeout_s: float = 5.0) -> int:
    """Start the PM QoS holder: /dev/cpu_dma_latency only holds while a process keeps it open."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.pop(KILL_AT_ENV, None)
    process = subprocess.Popen(
        [sys.executable, "-m", HOLDER_MODULE, "--value-us", str(value_us), "--token", token],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        start_new_session=True, env=env, close_fds=True,
    )
    ready, _, _ = select.select([process.stdout], [], [], timeout_s)
    line = process.stdout.readline().strip() if ready else b""
    process.stdout.close()
    if line != b"holding":
        process.kill()
        raise OSError(5, f"PM QoS holder did not start ({line.decode(errors='replace') or 'timeout'})")
    return process.pid


class ActionKind:
    op: ClassVar[str] = ""

    def journal_fields(self, host: Host, action: Action, token: str) -> dict:
        """Journaled (fsync'd) before apply() runs: everything undo() needs."""
        return {}

    def apply(self, host: Host, action: Action, fields: dict) -> None:
        raise NotImplementedError

    def undo(self, name: str, fields: dict, context: UndoContext) -> StepResult:
        raise NotImplementedError

    def state(self, host: Host, fields: dict, rollback_started: bool) -> tuple[str, str]:
        raise NotImplementedError

    def created_directory(self, fields: dict) -> str | None:
        """The directory this step created (its files vanish with it at undo), if any."""
        return None


class WriteKind(ActionKind):
    op = "write"

    def journal_fields(self, host, action, token):
        fields = {"original": encode(read_raw(host, action.path)), "target": encode(action.target)}
        if action.companion:
            fields["companion"] = action.companion
            fields["companion_original"] = encode(read_raw(host, action.companion))
        return fields

    def apply(self, host, action, fields):
        _write_file(host, action.path, action.target)

    def undo(self, name, fields, context):
        host, path = context.host, fields["path"]
        fmt = fields.get("compare", "text")
        original, target = decode(fields.get("original")), decode(fields.get("target"))
        current_key = compare_key(read_raw(host, path), fmt)
        if current_key == compare_key(original, fmt):
            return StepResult(name, path, "unchanged", "already the original value")
        drift = current_key != compare_key(target, fmt)
        if drift and not context.force:
            return StepResult(name, path, "kept",
                              f"changed by someone else since apply: now {current_key!r}, "
                              f"applied {compare_key(target, fmt)!r}, original {compare_key(original, fmt)!r}")
        result = "forced" if drift else "restored"
        if original is None:
            try:
                host.path(path).unlink()
            except OSError:
                if str(Path(path).parent) not in context.created_dirs:
                    raise
                # cgroupfs files vanish with their directory, removed by the mkdir step next.
            return StepResult(name, path, result, "removed the file apply created")
        companion_original = decode(fields.get("companion_original"))
        if compare_key(original, fmt) == "0" and compare_key(companion_original, "text") not in (None, "0"):
            # Writing 0 to vm.dirty_bytes is refused; writing the ratio back zeroes the bytes.
            _write_file(host, fields["companion"], companion_original)
            if not host.is_real:  # a fake tree has no kernel to zero the pair for us
                _write_file(host, path, original)
        else:
            _write_file(host, path, restore_bytes(host, fields, original))
        return StepResult(name, path, result, f"back to {compare_key(original, fmt)!r}")

    def state(self, host, fields, rollback_started):
        fmt = fields.get("compare", "text")
        current = compare_key(read_raw(host, fields["path"]), fmt)
        if current == compare_key(decode(fields.get("target")), fmt):
            return "applied", ""
        if current == compare_key(decode(fields.get("original")), fmt):
            if rollback_started:  # restored by the agent's own rollback, killed before it said so
                return "rolled back", "back to the original (by a rollback that did not finish)"
            return "drifted", "reverted to the original by someone else"
        return "drifted", f"now {current!r}"


class MkdirKind(ActionKind):
    op = "mkdir"

    def journal_fields(self, host, action, token):
        return {"existed": host.path(action.path).is_dir()}

    def apply(self, host, action, fields):
        host.path(action.path).mkdir()

    def undo(self, name, fields, context):
        path = fields["path"]
        directory = context.host.path(path)
        if fields.get("existed") or not directory.is_dir():
            return StepResult(name, path, "unchanged")
        try:
            directory.rmdir()
        except OSError as error:
            return StepResult(name, path, "kept", f"cannot remove ({error.strerror}): tasks still in it?")
        return StepResult(name, path, "restored", "removed the directory apply created")

    def state(self, host, fields, rollback_started):
        return ("applied", "") if host.path(fields["path"]).is_dir() else ("drifted", "directory gone")

    def created_directory(self, fields):
        return None if fields.get("existed") else fields["path"]


class PmQosKind(ActionKind):
    op = "pm_qos"

    def journal_fields(self, host, action, token):
        return {"value_us": action.value_us, "token": token, "original": encode(read_raw(host, action.path))}

    def apply(self, host, action, fields):
        start_holder(action.value_us, fields["token"])

    def undo(self, name, fields, context):
        if stop_holders(fields["token"]):
            return StepResult(name, fields["path"], "restored", "PM QoS holder stopped, request released")
        return StepResult(name, fields["path"], "unchanged", "no holder running (never started or already gone)")

    def state(self, host, fields, rollback_started):
        alive = find_holders(fields["token"])
        return ("applied", f"holder pid {alive[0]}") if alive else ("drifted", "holder not running")


ACTION_KINDS: dict[str, ActionKind] = {kind.op: kind for kind in (WriteKind(), MkdirKind(), PmQosKind())}


def errno_name(number: int | None) -> str:
    return errno.errorcode.get(number or 0, str(number))
