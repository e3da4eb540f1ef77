"""The chaos journal: every fault's exact undo, fsync'd before the fault is applied.

    STATE_DIR/journal.jsonl    one record per step (core/journal.py: fsync'd JSON lines)
    STATE_DIR/kill-switch      present: abort whatever runs, and refuse to start a new run
    STATE_DIR/decisions/       the gate's decision record of every run

Records: run_started (run_id, pid, start ticks, experiment), fault_applying (the injector's
undo record, written BEFORE apply), fault_applied, fault_removed (by runner, abort, sweep or
watchdog), run_finished (verdict). A fault is active from its fault_applying record until a
fault_removed record of the same run and index: so a crash between the record and apply() is
undone too (every undo is idempotent and harmless when nothing was applied).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import BadInput
from core.journal import append_record, read_journal_records
from agent.chaos.faults.base import is_alive, process_start_ticks

DEFAULT_STATE_DIR = Path("/var/lib/guardian-agent/chaos")
STATE_DIR_ENV = "GUARDIAN_AGENT_CHAOS_DIR"
JOURNAL_NAME = "journal.jsonl"
KILL_SWITCH_NAME = "kill-switch"


def state_dir(explicit: Path | None = None) -> Path:
    if explicit is not None:
        return Path(explicit)
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def ensure_state_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as error:
        raise BadInput(f"--state-dir {path}: cannot create it ({error.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise BadInput(f"--state-dir {path}: not writable")
    return path


def journal_path(directory: Path) -> Path:
    return Path(directory) / JOURNAL_NAME


def kill_switch_path(directory: Path) -> Path:
    return Path(directory) / KILL_SWITCH_NAME


def process_alive(pid: int | None, start_ticks: int | None) -> bool:
    """The agent that wrote run_started is still running (same pid and start time, not a zombie)."""
    if not pid:
        return False
    return is_alive({"pid": pid, "start_ticks": start_ticks if start_ticks is not None else process_start_ticks(pid)})


def append(directory: Path, event: str, **fields) -> dict:
    record = {"event": event, "ts": time.time(), **fields}
    return append_record(journal_path(directory), record)


@dataclass
class ActiveFault:
    run_id: str
    index: int
    kind: str
    undo: dict
    applied: bool = False


@dataclass
class RunState:
    run_id: str
    start: dict
    faults: dict[int, ActiveFault] = field(default_factory=dict)   # still active
    finished: dict | None = None
    records: list[dict] = field(default_factory=list)

    @property
    def agent_alive(self) -> bool:
        return process_alive(self.start.get("pid"), self.start.get("start_ticks"))

    @property
    def status(self) -> str:
        if self.finished is not None:
            return f"finished ({self.finished.get('verdict')})"
        return "running" if self.agent_alive else "interrupted"


@dataclass
class JournalState:
    runs: dict[str, RunState] = field(default_factory=dict)
    damage: str = ""

    @property
    def last(self) -> RunState | None:
        return list(self.runs.values())[-1] if self.runs else None

    def active_faults(self) -> list[ActiveFault]:
        return [fault for run in self.runs.values() for fault in run.faults.values()]

    def running(self) -> list[RunState]:
        return [run for run in self.runs.values() if run.finished is None and run.agent_alive]


def read_state(directory: Path) -> JournalState:
    path = journal_path(directory)
    if not path.exists():
        return JournalState()
    contents = read_journal_records(path)
    state = JournalState(damage=contents.describe_damage())
    for record in contents.records:
        run_id = record.get("run_id")
        event = record.get("event")
        if not run_id:
            continue
        if event == "run_started":
            state.runs[run_id] = RunState(run_id, record)
        run = state.runs.get(run_id)
        if run is None:
            continue
        run.records.append(record)
        index = record.get("index")
        if event == "fault_applying":
            run.faults[index] = ActiveFault(run_id, index, record["kind"], record["undo"])
        elif event == "fault_applied" and index in run.faults:
            run.faults[index].applied = True
        elif event == "fault_removed":
            run.faults.pop(index, None)
        elif event == "run_finished":
            run.finished = record
    return state
