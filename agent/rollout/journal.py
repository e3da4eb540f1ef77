"""The rollout journal: one JSON object per line, fsync'd before the step it announces proceeds.

Every run starts with a `start` record holding the plan, the traffic adapter settings and the
driver's pid, so `rollout status`, `rollout abort` and the watchdog can act from the journal alone
(after a crash, a kill -9 or a reboot) without the plan file.
Terminal events end a run: promoted, rolled_back, aborted, failed (before any traffic moved),
undone (a promotion put back). After `promoted` a run may still hold `decommission_pending`,
`undone` or `decommissioned` records, and a `roles` record swaps blue and green for the next run.
Operators steer a running driver with `control` records (pause, resume, promote, undo), which
the driver polls at every evaluation: the journal is the one channel, and it is durable.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import BadInput
from core.journal import append_record, read_journal_records

TERMINAL_EVENTS = ("promoted", "rolled_back", "aborted", "failed", "undone")
CONTROL_ACTIONS = ("pause", "resume", "promote", "undo")


class Journal:
    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, event: str, **fields: Any) -> dict:
        record = {"ts": time.time(), "event": event, **fields}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # One open/append/close per record: the driver and the watchdog may both write, and
        # core/journal.py locks the file for each append (a torn tail is cut off first).
        return append_record(self.path, record)


def read_records(path: Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        raise BadInput(f"{path}: no rollout journal here")
    # A line torn by a crash mid-write is skipped: everything before it is still good.
    return read_journal_records(path).records


@dataclass
class RunState:
    run_id: str
    start: dict
    records: list[dict] = field(default_factory=list)

    @property
    def last(self) -> dict:
        return self.records[-1]

    @property
    def terminal(self) -> dict | None:
        for record in reversed(self.records):
            if record["event"] in TERMINAL_EVENTS:
                return record
        return None

    @property
    def pid(self) -> int:
        return int(self.start.get("pid", 0))

    def driver_alive(self) -> bool:
        return pid_alive(self.pid) and self.terminal is None

    @property
    def current_stage(self) -> dict | None:
        for record in reversed(self.records):
            if record["event"] == "stage_started":
                return record
        return None

    @property
    def weights(self) -> dict | None:
        for record in reversed(self.records):
            if "weights" in record:
                return record["weights"]
        return None

    def last_of(self, event: str) -> dict | None:
        for record in reversed(self.records):
            if record["event"] == event:
                return record
        return None

    @property
    def controls(self) -> list[dict]:
        return [record for record in self.records if record["event"] == "control"]

    @property
    def split(self) -> bool:
        """Traffic on both versions, by the journal's last word."""
        weights = self.weights or {}
        return bool(weights.get("green")) and bool(weights.get("blue"))

    @property
    def status(self) -> str:
        terminal = self.terminal
        if terminal is not None:
            return terminal["event"]
        if pid_alive(self.pid):
            return "running"
        return "interrupted"


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie still answers kill(0); it is not running anything.
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


def last_run(path: Path) -> RunState:
    records = read_records(path)
    starts = [index for index, record in enumerate(records) if record.get("event") == "start"]
    if not starts:
        raise BadInput(f"{path}: journal holds no rollout run")
    first = starts[-1]
    run_records = [r for r in records[first:] if r.get("run_id") == records[first].get("run_id")]
    return RunState(run_id=records[first]["run_id"], start=records[first], records=run_records)


def current_roles(path: Path, blue: str, green: str) -> tuple[str, str]:
    """(blue server, green server) for the next run: swapped by every finalized promotion."""
    if not Path(path).exists():
        return blue, green
    for record in reversed(read_records(path)):
        if record.get("event") == "roles":
            return record["blue"], record["green"]
    return blue, green
