"""The one fsync'd JSON-lines journal: every record reaches the disk before the caller goes on.

Tuning writes the original value of a setting here before changing it; rollouts and chaos write
the step they are about to take. So the file must survive the three ways a real host ends a write
early, and never let one bad record block the good ones before it:

- a crash, kill -9 or full disk in the middle of a record leaves a *torn tail* (a last line
  without its newline). Reading recovers every whole record before it and reports the tear;
  the next append first cuts the tail off (or completes it, if the bytes that made it form a
  whole record), so a record is never glued onto half of another one;
- a crash right after the file is created leaves it *empty*: it reads as no records, and the
  caller decides that nothing happened (nothing can have been changed without a record first);
- a *full disk* (ENOSPC, or a short write) raises JournalWriteFailed naming the file, after
  cutting the partial record back off, so the journal on disk stays whole records only.

Journals written before this module existed could hold a record appended onto a torn one on the
same line (`{"op":"und{"op":"undone",...}`); reading finds the whole record at the end of such a
line and counts the line as repaired, so those journals are readable too.

Several processes may append to one journal (a rollout's driver and its watchdog): every append
takes an exclusive flock on the file for the tail check, the write and the fsync.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.atomic import fsync_dir
from core.errors import WorkFailed

NEWLINE = b"\n"


class JournalWriteFailed(WorkFailed):
    """A record could not be made durable (disk full, I/O error): what was written before it
    is still whole on disk; the step the record announced must not go ahead."""


@dataclass
class JournalContents:
    """Every whole record of a journal, and what was wrong with the rest."""

    path: Path
    records: list[dict] = field(default_factory=list)
    torn_tail_bytes: int = 0            # bytes after the last whole record (a write cut short)
    repaired_lines: list[int] = field(default_factory=list)   # record glued onto a torn one
    corrupt_lines: list[int] = field(default_factory=list)    # 1-based, not a record at all

    @property
    def empty(self) -> bool:
        return not self.records

    def describe_damage(self) -> str:
        """One line for a status report, or "" when the journal is clean."""
        parts = []
        if self.torn_tail_bytes:
            parts.append(f"a torn last record ({self.torn_tail_bytes} bytes, a write cut short) was ignored")
        if self.repaired_lines:
            parts.append(f"line(s) {_line_list(self.repaired_lines)} held a record written onto a torn one")
        if self.corrupt_lines:
            parts.append(f"line(s) {_line_list(self.corrupt_lines)} are not records")
        return "; ".join(parts)


def _line_list(lines: list[int]) -> str:
    return ",".join(str(line) for line in lines[:10]) + ("..." if len(lines) > 10 else "")


def encode_record(record: dict) -> bytes:
    return (json.dumps(record, default=str, separators=(",", ":")) + "\n").encode()


def _parse_record(line: bytes) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:  # includes UnicodeDecodeError: a binary or non-UTF-8 line
        return None
    return record if isinstance(record, dict) else None


def _recover_glued(line: bytes) -> dict | None:
    """The whole record at the end of a line that starts with a torn one, if there is one."""
    start = line.find(b"{", 1)
    while start > 0:
        record = _parse_record(line[start:])
        if record is not None:
            return record
        start = line.find(b"{", start + 1)
    return None


def parse_journal(path: Path, data: bytes) -> JournalContents:
    contents = JournalContents(Path(path))
    *lines, tail = data.split(NEWLINE)  # `tail` is b"" when the last write ended whole
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = _parse_record(line)
        if record is None:
            record = _recover_glued(line)
            (contents.repaired_lines if record is not None else contents.corrupt_lines).append(number)
        if record is not None:
            contents.records.append(record)
    if tail:
        record = _parse_record(tail)
        if record is None:
            contents.torn_tail_bytes = len(tail)
        else:  # every byte of the record landed, only its newline did not
            contents.records.append(record)
    return contents


def read_journal_records(path: Path) -> JournalContents:
    """Read a journal; raise WorkFailed only when the file itself cannot be read."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except IsADirectoryError:
        raise WorkFailed(f"journal {path}: is a directory, not a journal") from None
    except OSError as error:
        raise WorkFailed(f"journal {path}: {error.strerror}") from None
    return parse_journal(path, data)


def _whole_prefix_length(fd: int, size: int) -> tuple[int, bytes]:
    """Where the torn tail starts, and the tail itself (a tail is one record, so it is small;
    read back in 64 KiB steps until its start is found)."""
    step = 65536
    end = size
    tail = b""
    while end > 0:
        start = max(0, end - step)
        chunk = os.pread(fd, end - start, start)
        cut = chunk.rfind(NEWLINE)
        if cut >= 0:
            return start + cut + 1, chunk[cut + 1:] + tail
        tail = chunk + tail
        end = start
    return 0, tail


def _repair_tail(fd: int, path: Path) -> None:
    """Cut a torn tail off (or finish a whole record whose newline is missing) before appending."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == NEWLINE:
        return
    good_length, tail = _whole_prefix_length(fd, size)
    if _parse_record(tail) is not None:
        _write_all(fd, NEWLINE, path)
    else:
        os.ftruncate(fd, good_length)
    os.fsync(fd)


def _write_all(fd: int, data: bytes, path: Path) -> None:
    """Write every byte or raise JournalWriteFailed with the partial bytes cut back off."""
    before = os.fstat(fd).st_size
    try:
        written = os.write(fd, data)
        if written != len(data):
            raise OSError(errno.ENOSPC, f"short write ({written} of {len(data)} bytes)")
        os.fsync(fd)
    except OSError as error:
        _cut_back(fd, before)
        reason = "disk full" if error.errno in (errno.ENOSPC, errno.EDQUOT) else error.strerror
        raise JournalWriteFailed(f"journal {path}: cannot write a record ({reason}: "
                                 f"{error.strerror}); the records before it are intact") from None


def _cut_back(fd: int, size: int) -> None:
    try:
        os.ftruncate(fd, size)
        os.fsync(fd)
    except OSError:
        pass  # the reader ignores a torn tail, and the next append cuts it off


class JournalWriter:
    """Appends fsync'd records to one journal file (created 0600, its directory fsync'd)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        created = not self.path.exists()
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as error:
            raise JournalWriteFailed(f"journal {self.path}: cannot open it ({error.strerror})") from None
        if created:
            fsync_dir(self.path.parent)

    def append(self, record: dict) -> dict:
        line = encode_record(record)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            _repair_tail(self.fd, self.path)
            _write_all(self.fd, line, self.path)
        except OSError as error:  # the repair itself hit the full disk
            raise JournalWriteFailed(f"journal {self.path}: cannot repair its torn tail "
                                     f"({error.strerror})") from None
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
        return record

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> "JournalWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def append_record(path: Path, record: dict) -> dict:
    """Open, append one fsync'd record, close: for journals written by several processes."""
    with JournalWriter(path) as writer:
        return writer.append(record)
