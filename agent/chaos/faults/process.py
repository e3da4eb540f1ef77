"""Faults on processes: pause (freeze) and kill of a pid, a pid file's process, a process name
or a systemd unit's main process (units need systemd as PID 1, which this host does not have).

pause: the cgroup freezer (v1 `freezer.state`, or v2 `cgroup.freeze`) stops every thread of the
target at once and, unlike SIGSTOP, is invisible to the target and to its parent (no SIGCHLD,
no waitpid report). A frozen process does not thaw when the agent dies, so pause is not kernel
owned: the runner journals `undo_record()` (fsync) before `apply()`, and `undo()` thaws, moves
the processes back to their own freezer cgroup and removes ours, from the record alone. Where no
freezer is mounted, SIGSTOP / SIGCONT is the fallback (same journal + watchdog).

kill: a signal (SIGKILL by default) to the target, then the time until it is back (a new
process behind the pid file, the name, or the killed command line) is measured. Nothing to undo.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from core.errors import BadInput, Unavailable, WorkFailed
from core.host import Host

from .base import Injector, OBJECT_PREFIX, is_alive, is_same_process, process_identity, run_id, text
from .targets import (PROCESS_KEYS, cgroup_v1_mount, cgroup_v2_mount, describe_process, pid_from_file,
                      pids_named, process_cgroup, process_target_key, resolve_cgroup, resolve_process,
                      systemd_is_init, unit_main_pid, unit_unavailable_reason)

FREEZE_TIMEOUT_S = 1.0


class ProcessInjector(Injector):
    keys = frozenset(PROCESS_KEYS)
    target_keys: tuple[str, ...] = PROCESS_KEYS

    @classmethod
    def normalise(cls, spec, where):
        key = process_target_key(spec, where, cls.target_keys)
        spec["target_key"] = key
        return cls.normalise_kind(spec, where)

    @classmethod
    def normalise_kind(cls, spec, where):
        return spec

    @classmethod
    def validate(cls, spec, where):
        normal = super().validate({k: v for k, v in spec.items() if k != "target_key"}, where)
        return normal

    def __init__(self, spec, host=None):
        super().__init__(spec, host)
        self.target: dict | None = None

    def check(self) -> None:
        super().check()
        key = self.spec.get("target_key")
        if key == "unit" and not systemd_is_init(self.host):
            raise Unavailable(unit_unavailable_reason(self.host))
        if key is not None and key != "cgroup":
            self.target = describe_process(resolve_process(self.spec, key, self.host, "target"), self.host)

    def target_text(self) -> str:
        key = self.spec["target_key"]
        if self.target is None:
            return f"{key} {self.spec[key]}"
        return f"pid {self.target['pid']} ({self.target['comm']}) from {key} {self.spec[key]!r}"


class PauseInjector(ProcessInjector):
    kind = "pause"
    description = "freeze a process (all its threads) or a whole cgroup, then thaw it"
    owned_by_kernel = False
    keys = ProcessInjector.keys | {"cgroup"}
    target_keys = PROCESS_KEYS + ("cgroup",)

    @classmethod
    def freezer(cls, host: Host) -> tuple[str, Path | None]:
        v1 = cgroup_v1_mount("freezer", host)
        if v1 is not None:
            return "cgroup v1 freezer", v1
        v2 = cgroup_v2_mount(host)
        if v2 is not None and (v2 / "cgroup.controllers").exists():
            return "cgroup v2 cgroup.freeze", v2
        return "SIGSTOP/SIGCONT", None

    @classmethod
    def availability(cls, host):
        if os.geteuid() != 0:
            return False, "needs root to freeze another user's processes (run as root)", ""
        backend, _mount = cls.freezer(host)
        return True, "", f"{backend} (not kernel owned: journal + watchdog undo)"

    def __init__(self, spec, host=None):
        super().__init__(spec, host)
        self.backend, self.mount = self.freezer(self.host)
        self.name = f"{OBJECT_PREFIX}pause_{run_id()}"
        self.record: dict | None = None

    def check(self) -> None:
        super().check()
        if self.spec["target_key"] == "cgroup":
            controller = "freezer" if self.backend.startswith("cgroup v1") else "cgroup"
            self.cgroup = resolve_cgroup(self.spec["cgroup"], controller, self.host, "target")
            if self.mount is None:
                raise Unavailable("pausing a cgroup needs a freezer (cgroup v1 freezer or cgroup v2)")

    def plan(self) -> dict:
        if self.target is None and self.spec["target_key"] != "cgroup":
            self.check()
        return {"target": self.target_text() if self.spec["target_key"] != "cgroup" else f"cgroup {self.spec['cgroup']}",
                "backend": self.backend,
                "undo": "thaw (THAWED / cgroup.freeze 0 / SIGCONT), move the processes back to their own "
                        "freezer cgroup, remove ours; journaled before apply, run by abort/sweep/watchdog",
                "blast_radius": f"every thread of {self.target_text()}" if self.spec["target_key"] != "cgroup"
                else f"every process in cgroup {self.spec['cgroup']}"}

    def undo_record(self) -> dict:
        if self.record is None:
            if self.spec["target_key"] != "cgroup" and self.target is None:
                self.check()
            record = {"kind": self.kind, "backend": self.backend, "agent_pid": os.getpid()}
            if self.spec["target_key"] == "cgroup":
                record["freeze_cgroup"] = str(self.cgroup)
                record["created"] = False
            elif self.mount is None:
                record["signal_target"] = {"pid": self.target["pid"], "start_ticks": self.target["start_ticks"]}
            else:
                controller = "freezer" if self.backend.startswith("cgroup v1") else None
                home = process_cgroup(self.target["pid"], controller, self.host) or "/"
                record["freeze_cgroup"] = str(self.mount / self.name)
                record["created"] = True
                record["home_cgroup"] = str(self.mount / home.lstrip("/"))
                record["target"] = {"pid": self.target["pid"], "start_ticks": self.target["start_ticks"]}
            self.record = record
        return self.record

    def apply(self) -> None:
        record = self.undo_record()
        if "signal_target" in record:
            if not is_same_process(record["signal_target"]):
                raise WorkFailed(f"pause: pid {record['signal_target']['pid']} is gone")
            os.kill(record["signal_target"]["pid"], signal.SIGSTOP)
            return
        group = Path(record["freeze_cgroup"])
        if record["created"]:
            group.mkdir()
            if not is_same_process(record["target"]):
                raise WorkFailed(f"pause: pid {record['target']['pid']} is gone")
            (group / "cgroup.procs").write_text(str(record["target"]["pid"]))
        _set_frozen(group, True)
        _wait_frozen(group, True)

    def remove(self) -> None:
        if self.record is not None:
            self.undo(self.record)

    @staticmethod
    def undo(record: dict) -> None:
        if "signal_target" in record:
            if is_same_process(record["signal_target"]):
                os.kill(record["signal_target"]["pid"], signal.SIGCONT)
            return
        group = Path(record["freeze_cgroup"])
        if not group.exists():
            return
        _set_frozen(group, False)
        _wait_frozen(group, False)
        if record.get("created"):
            home = Path(record["home_cgroup"]) / "cgroup.procs"
            for pid in (group / "cgroup.procs").read_text().split():
                try:
                    home.write_text(pid)
                except OSError:  # the home cgroup is gone: the parent of ours takes the process
                    (group.parent / "cgroup.procs").write_text(pid)
            _remove_cgroup(group)

    def proof(self) -> dict:
        record = self.undo_record()
        pids = self._pids(record)
        before = {pid: _cpu_ticks(pid) for pid in pids}
        time.sleep(0.2)
        progressed = [pid for pid in pids if _cpu_ticks(pid) != before[pid]]
        states = {pid: _thread_states(pid) for pid in pids}
        frozen_state = _frozen_state(Path(record["freeze_cgroup"])) if "freeze_cgroup" in record else None
        stopped = all(states[pid] and set(states[pid]) <= {"D", "T", "t"} for pid in pids)
        bit = bool(pids) and not progressed and (frozen_state is True or ("signal_target" in record and stopped))
        return {"metric": "frozen_processes", "expected": len(pids), "measured": len(pids) - len(progressed),
                "thread_states": sorted({s for v in states.values() for s in v}), "freezer_frozen": frozen_state,
                "bit": bit}

    def _pids(self, record: dict) -> list[int]:
        if "signal_target" in record:
            return [record["signal_target"]["pid"]]
        try:
            return [int(pid) for pid in (Path(record["freeze_cgroup"]) / "cgroup.procs").read_text().split()]
        except OSError:
            return []


def _state_file(group: Path) -> tuple[Path, str, str]:
    if (group / "freezer.state").exists():
        return group / "freezer.state", "FROZEN", "THAWED"
    return group / "cgroup.freeze", "1", "0"


def _set_frozen(group: Path, frozen: bool) -> None:
    path, on, off = _state_file(group)
    path.write_text(on if frozen else off)


def _frozen_state(group: Path) -> bool | None:
    try:
        if (group / "freezer.state").exists():
            return (group / "freezer.state").read_text().strip() == "FROZEN"
        for line in (group / "cgroup.events").read_text().splitlines():
            if line.startswith("frozen "):
                return line.split()[1] == "1"
    except OSError:
        return None
    return None


def _wait_frozen(group: Path, frozen: bool) -> None:
    # v1 reports FREEZING until every task stopped; v2 sets "frozen 1" in cgroup.events.
    deadline = time.monotonic() + FREEZE_TIMEOUT_S
    while _frozen_state(group) is not frozen:
        if time.monotonic() > deadline:
            raise WorkFailed(f"pause: cgroup {group} did not {'freeze' if frozen else 'thaw'} within "
                             f"{FREEZE_TIMEOUT_S:g} s")
        time.sleep(0.002)


def _remove_cgroup(group: Path) -> None:
    deadline = time.monotonic() + FREEZE_TIMEOUT_S
    while True:
        try:
            group.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:  # EBUSY while the last move settles
            if time.monotonic() > deadline:
                raise WorkFailed(f"pause: could not remove cgroup {group}") from None
            time.sleep(0.005)


def _cpu_ticks(pid: int) -> int | None:
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except OSError:
        return None
    fields = raw[raw.rfind(b")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def _thread_states(pid: int) -> list[str]:
    states = []
    try:
        for entry in os.scandir(f"/proc/{pid}/task"):
            raw = Path(entry.path, "stat").read_bytes()
            states.append(raw[raw.rfind(b")") + 2:].split()[0].decode())
    except OSError:
        pass
    return states


class KillInjector(ProcessInjector):
    kind = "kill"
    description = "kill a process, a pid file's process or a unit's main process; measure its restart"
    keys = ProcessInjector.keys | {"signal"}

    @classmethod
    def normalise_kind(cls, spec, where):
        name = text(spec, "signal", where, "SIGKILL").upper()
        name = name if name.startswith("SIG") else "SIG" + name
        if not hasattr(signal, name) or name in ("SIGSTOP", "SIGCONT"):
            raise BadInput(f"{where}.signal: {spec.get('signal')!r} is not a signal that ends a process "
                           f"(for example SIGKILL or SIGTERM; use kind = \"pause\" to stop one)")
        spec["signal"] = name
        return spec

    @classmethod
    def availability(cls, host):
        if os.geteuid() != 0:
            return False, "needs root to signal other users' processes (run as root)", ""
        units = "units: yes" if systemd_is_init(host) else "units: no, PID 1 is not systemd"
        return True, "", f"signal + restart watch ({units})"

    def __init__(self, spec, host=None):
        super().__init__(spec, host)
        self.killed_at: float | None = None
        self.restarted_at: float | None = None
        self.successor: int | None = None
        self.stop_watch = threading.Event()
        self.watcher: threading.Thread | None = None

    def plan(self) -> dict:
        if self.target is None:
            self.check()
        return {"target": self.target_text(), "backend": f"{self.spec['signal']} + restart watch",
                "undo": "none: a killed process cannot be revived; its supervisor restarts it and the "
                        "restart time is measured", "blast_radius": f"one process: {self.target_text()}"}

    def undo_record(self) -> dict:
        if self.target is None:
            self.check()
        return {"kind": self.kind, "target": {"pid": self.target["pid"], "start_ticks": self.target["start_ticks"]},
                "irreversible": True}

    def apply(self) -> None:
        if self.target is None:
            self.check()
        if not is_alive(self.target):
            raise WorkFailed(f"kill: pid {self.target['pid']} is already gone")
        self.killed_at = time.monotonic()
        os.kill(self.target["pid"], getattr(signal, self.spec["signal"]))
        self.watcher = threading.Thread(target=self._watch_restart, name="chaos-kill-restart", daemon=True)
        self.watcher.start()

    def _watch_restart(self) -> None:
        deadline = self.killed_at + self.spec["duration_s"]
        while not self.stop_watch.is_set() and time.monotonic() < deadline:
            successor = self._successor()
            if successor is not None:
                self.successor, self.restarted_at = successor, time.monotonic()
                return
            self.stop_watch.wait(0.005)

    def _successor(self) -> int | None:
        """A process other than the killed one that the target now names."""
        key = self.spec["target_key"]
        try:
            if key == "pid_file":
                candidates = [pid_from_file(self.spec["pid_file"], self.host, "target")]
            elif key == "unit":
                candidates = [unit_main_pid(self.spec["unit"], self.host, "target")]
            elif key == "process":
                candidates = pids_named(self.spec["process"], self.host)
            else:  # a bare pid: the same command line coming back under a new pid
                candidates = [pid for pid in pids_named(self.target["comm"], self.host)
                              if describe_process(pid, self.host)["cmdline"] == self.target["cmdline"]]
        except (BadInput, Unavailable, OSError, ValueError):
            return None
        for pid in candidates:
            identity = process_identity(pid)
            # A live process that is not the killed one (same pid with other start ticks: reuse).
            if identity["start_ticks"] is not None and identity["start_ticks"] != self.target["start_ticks"] \
                    or (identity["start_ticks"] is not None and pid != self.target["pid"]):
                if is_alive(identity):
                    return pid
        return None

    def remove(self) -> None:
        self.stop_watch.set()
        if self.watcher is not None:
            self.watcher.join(timeout=1)

    @staticmethod
    def undo(record: dict) -> None:
        return None  # irreversible by nature; nothing was left behind

    def proof(self) -> dict:
        gone = self.target is not None and not is_alive(self.target)
        restart_s = None if self.restarted_at is None else round(self.restarted_at - self.killed_at, 4)
        return {"metric": "restart_s", "expected": f"back within {self.spec['duration_s']:g} s",
                "measured": restart_s, "killed_pid": self.target["pid"] if self.target else None,
                "successor_pid": self.successor, "bit": gone}
