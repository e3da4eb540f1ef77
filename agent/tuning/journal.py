"""The crash-safe tuning journal: an append-only JSON-lines file, fsync'd after every record.

TuneD keeps its rollback state in memory, so a crash between writes loses it. Here the original
value of every setting reaches the disk (write + fsync) before the setting is written, so after
`kill -9` at any point the journal still names every value that may have changed and what it was.

Records, in order:
    begin   journal_id, boot_id, profile, variables, host_root, started_at, pid
    intent  seq, item, action (op, path, original bytes or absent, target bytes, compare), fsync'd
            BEFORE the write it describes
    done    seq (the write succeeded)          failed  seq, error (the kernel refused it)
    end     status: applied | aborted
    undone  seq, result (written by rollback, so a rollback cut short can be resumed)
Storage is core/journal.py: only the last line can be torn by a crash (or a full disk); it is
ignored and cut off before the next record (an intent is complete on disk before its write
starts, so a torn line never hides a write that happened).
"""

from __future__ import annotations

import base64
import fcntl
import os
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from core.atomic import fsync_dir
from core.errors import BadInput, WorkFailed
from core.journal import JournalWriter, read_journal_records

DEFAULT_STATE_DIR = Path("/var/lib/guardian-agent/journal")
STATE_DIR_ENV = "GUARDIAN_AGENT_STATE_DIR"
JOURNAL_NAME = "journal.jsonl"
HISTORY_DIR = "history"
LOCK_NAME = "lock"


def state_dir(explicit: Path | None = None) -> Path:
    if explicit:
        return Path(explicit)
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def encode(raw: bytes | None) -> str | None:
    return None if raw is None else base64.b64encode(raw).decode()


def decode(text: str | None) -> bytes | None:
    return None if text is None else base64.b64decode(text)


@dataclass
class JournalState:
    """A journal read back from disk."""

    path: Path
    begin: dict
    intents: list[dict] = field(default_factory=list)
    done: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)
    undone: dict[int, str] = field(default_factory=dict)
    end: dict | None = None
    rollback_started: bool = False
    torn_tail: bool = False
    damage: str = ""  # what reading had to skip or repair, for `tune status`

    @property
    def profile(self) -> str:
        return self.begin.get("profile", "?")

    @property
    def boot_id(self) -> str:
        return self.begin.get("boot_id", "")

    @property
    def finished(self) -> bool:
        return self.end is not None


def read_journal(path: Path) -> JournalState:
    contents = read_journal_records(path)
    if contents.corrupt_lines:
        # A line that is no record at all, before the end, is not a write cut short (that can
        # only be the tail, which core/journal.py already sets aside): someone edited or damaged
        # the file. Which values it held is unknown, so nothing is guessed: bad input, with the
        # place to look.
        raise BadInput(f"journal {path}:{contents.corrupt_lines[0]}: this line is not a journal "
                       "record (the file was edited or damaged); inspect it by hand, nothing was "
                       "rolled back or applied")
    records = contents.records
    if not records or records[0].get("op") != "begin":
        raise WorkFailed(f"journal {path}: no begin record (the apply died before it started); "
                         "nothing was changed, remove the file")
    state = JournalState(path, records[0], torn_tail=bool(contents.torn_tail_bytes),
                         damage=contents.describe_damage())
    for record in records[1:]:
        op = record.get("op")
        if op == "intent":
            state.intents.append(record)
        elif op == "done":
            state.done.add(record["seq"])
        elif op == "failed":
            state.failed[record["seq"]] = record.get("error", "")
        elif op == "undone":
            state.undone[record["seq"]] = record.get("result", "")
        elif op == "end":
            state.end = record
        elif op == "rollback_started":
            state.rollback_started = True
    return state


class StateDir:
    """The journal directory: the pending journal, archived ones, and a lock."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock_fd = -1

    @property
    def journal_path(self) -> Path:
        return self.path / JOURNAL_NAME

    def pending(self) -> JournalState | None:
        """The pending journal, if any. A journal holding no whole record (a crash or Ctrl-C
        right after it was created, or a torn `begin`) recorded no intent, so nothing was changed
        through it: it is removed here instead of blocking apply, rollback and status."""
        if not self.journal_path.exists():
            return None
        contents = read_journal_records(self.journal_path)
        if contents.empty and not contents.corrupt_lines:
            self.journal_path.unlink(missing_ok=True)
            fsync_dir(self.path)
            return None
        return read_journal(self.journal_path)

    def lock(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as error:
            raise BadInput(f"--state-dir {self.path}: cannot create it ({error.strerror})") from None
        self._lock_fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = -1
            raise BadInput(f"another guardian-agent tune command holds {self.path / LOCK_NAME}") from None
        # Made now, while there is space: archiving a journal after a rollback on a full disk is
        # then a rename, which needs no new block.
        try:
            (self.path / HISTORY_DIR).mkdir(exist_ok=True, mode=0o700)
        except OSError:
            pass  # archive() tries again and reports what stops it

    def unlock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)  # closing releases the flock
            self._lock_fd = -1

    def start(self, begin: dict, created=lambda: None) -> JournalWriter:
        writer = JournalWriter(self.journal_path)
        try:
            created()  # the crash-safety tests' kill point between creating and the first record
            writer.append({"op": "begin", **begin})
        except BaseException:
            writer.close()
            raise
        return writer

    def archive(self, state: JournalState) -> Path:
        history = self.path / HISTORY_DIR
        history.mkdir(exist_ok=True, mode=0o700)
        target = history / f"{state.begin.get('journal_id', 'journal')}.jsonl"
        os.replace(state.path, target)
        fsync_dir(self.path)
        return target

    def history(self) -> list[Path]:
        history = self.path / HISTORY_DIR
        return sorted(history.glob("*.jsonl")) if history.is_dir() else []


def new_journal_id() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + secrets.token_hex(3)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def monotonic() -> float:
    return time.monotonic()
