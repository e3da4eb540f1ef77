"""The local spool: every run lands here first and leaves only once the store has all of it.

    SPOOL/entries/<run_id>/bundle/         the audit bundle while it is being written
    SPOOL/entries/<run_id>/staged/<key>    the dataset objects of the run
    SPOOL/entries/<run_id>/ready.json      written last: the run is complete and waits to go up
    SPOOL/entries/<run_id>/published.txt   keys the store has confirmed (append + fsync)
    SPOOL/dropped.jsonl                    runs the size cap pushed out (policy drop-oldest)

Guarantees:
- nothing is lost while the store is down: an entry is deleted only after every one of its
  objects is confirmed, and the manifest goes up last;
- nothing goes up twice: confirmed keys are journaled, and after a crash between an upload and
  its journal line `has()` finds the object (same size and md5) instead of sending it again;
  keys are deterministic, so even a re-send would overwrite, never duplicate, rows;
- the spool is bounded: past `max_bytes`, policy `drop-oldest` deletes the oldest waiting runs
  (each recorded in dropped.jsonl, and counted in the report), `refuse-new` keeps the old ones
  and refuses the new run with an error.
One drainer at a time (flock on SPOOL/.lock): the daemon and the timer's `collect` share a spool.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import WorkFailed
from agent.fleet.layout import StagedObject, stage_bundle
from agent.fleet.stores import StoreUnavailable, ensure_writable_dir
from core.atomic import write_json_atomic
from core.journal import append_record, read_journal_records
from reports.bundle import MANIFEST_NAME

READY_NAME = "ready.json"
PUBLISHED_NAME = "published.txt"
# An entry with neither manifest nor ready file this old was left by a crashed run.
ABANDONED_AFTER_S = 6 * 3600


class SpoolFull(WorkFailed):
    pass


@dataclass
class DrainReport:
    published_runs: list[str] = field(default_factory=list)
    uploaded_objects: int = 0
    already_there: int = 0
    pending_runs: int = 0
    pending_bytes: int = 0
    error: str = ""
    busy: bool = False


def tree_bytes(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


class Spool:
    def __init__(self, path: Path, max_bytes: int = 1 << 30, policy: str = "drop-oldest"):
        self.path = Path(path)
        self.entries_dir = self.path / "entries"
        self.max_bytes = int(max_bytes)
        self.policy = policy

    def ensure(self) -> None:
        ensure_writable_dir(self.entries_dir, f"spool {self.path}")

    def bundle_dir(self, run_id: str) -> Path:
        return self.entries_dir / run_id / "bundle"

    def ready_runs(self) -> list[str]:
        """Complete runs waiting for the store, oldest first (run ids sort by time)."""
        if not self.entries_dir.is_dir():
            return []
        ready = [p for p in self.entries_dir.iterdir() if (p / READY_NAME).is_file()]
        # Run ids sort by their second-resolution stamp; within one second, staging order decides.
        return [p.name for p in sorted(ready, key=lambda p: (p.name.split("-", 1)[0],
                                                              (p / READY_NAME).stat().st_mtime_ns))]

    def size_bytes(self) -> int:
        return tree_bytes(self.entries_dir) if self.entries_dir.is_dir() else 0

    def pending(self) -> tuple[int, int]:
        runs = self.ready_runs()
        return len(runs), sum(tree_bytes(self.entries_dir / run) for run in runs)

    def dropped(self) -> list[dict]:
        ledger = self.path / "dropped.jsonl"
        if not ledger.exists():
            return []
        return read_journal_records(ledger).records

    # -- entering the spool ------------------------------------------------------------------

    def stage(self, run_id: str) -> list[StagedObject]:
        """Turn the finished bundle of `run_id` into dataset objects, then mark it ready."""
        entry = self.entries_dir / run_id
        objects = stage_bundle(entry / "bundle", entry / "staged")
        write_json_atomic({"run_id": run_id, "objects": [o.as_dict() for o in objects]}, entry / READY_NAME)
        shutil.rmtree(entry / "bundle", ignore_errors=True)
        return objects

    def enforce_cap(self, newest_run_id: str) -> list[str]:
        """Apply the size policy after `newest_run_id` was staged; returns the runs dropped."""
        total = self.size_bytes()
        if total <= self.max_bytes:
            return []
        if self.policy == "refuse-new":
            self._drop(newest_run_id, total, "spool full (policy refuse-new)")
            raise SpoolFull(f"spool {self.path} is over its cap of {self.max_bytes} bytes "
                            f"(policy refuse-new): run {newest_run_id} was not kept; "
                            "the store has been unreachable for a while?")
        dropped = []
        for run_id in self.ready_runs():
            if total <= self.max_bytes or run_id == newest_run_id:
                break
            size = tree_bytes(self.entries_dir / run_id)
            self._drop(run_id, size, "spool full (policy drop-oldest)")
            total -= size
            dropped.append(run_id)
        return dropped

    def _drop(self, run_id: str, size: int, why: str) -> None:
        append_record(self.path / "dropped.jsonl", {"run_id": run_id, "bytes": size, "why": why,
                                                    "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        shutil.rmtree(self.entries_dir / run_id, ignore_errors=True)

    def recover(self) -> list[str]:
        """Finish what a crash interrupted: stage complete bundles, remove abandoned ones."""
        recovered = []
        if not self.entries_dir.is_dir():
            return recovered
        now = time.time()
        for entry in sorted(self.entries_dir.iterdir()):
            if (entry / READY_NAME).exists():
                continue
            if (entry / "bundle" / MANIFEST_NAME).exists():
                shutil.rmtree(entry / "staged", ignore_errors=True)
                self.stage(entry.name)
                recovered.append(entry.name)
            elif now - entry.stat().st_mtime > ABANDONED_AFTER_S:
                shutil.rmtree(entry, ignore_errors=True)
        return recovered

    # -- leaving the spool ---------------------------------------------------------------------

    def drain(self, store, deadline_monotonic: float | None = None, stop=None) -> DrainReport:
        """Publish every ready run to `store`, oldest first; stop at the first store error."""
        report = DrainReport()
        self.ensure()
        lock = open(self.path / ".lock", "a")
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                report.busy = True
                report.pending_runs, report.pending_bytes = self.pending()
                return report
            for run_id in self.ready_runs():
                if stop is not None and stop():
                    break
                if deadline_monotonic is not None and time.monotonic() > deadline_monotonic:
                    break
                try:
                    self._publish(run_id, store, report)
                except StoreUnavailable as error:
                    report.error = str(error)
                    break
                report.published_runs.append(run_id)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
            lock.close()
        report.pending_runs, report.pending_bytes = self.pending()
        return report

    def _publish(self, run_id: str, store, report: DrainReport) -> None:
        entry = self.entries_dir / run_id
        ready = json.loads((entry / READY_NAME).read_text())
        objects = [StagedObject.from_dict(o) for o in ready["objects"]]
        journal_path = entry / PUBLISHED_NAME
        confirmed = set(journal_path.read_text().split()) if journal_path.exists() else set()
        with open(journal_path, "a") as journal:
            for obj in objects:
                if obj.key in confirmed:
                    continue
                if store.has(obj):
                    report.already_there += 1
                else:
                    store.put(obj, entry / "staged" / obj.key)
                    report.uploaded_objects += 1
                journal.write(obj.key + "\n")
                journal.flush()
                os.fsync(journal.fileno())
        shutil.rmtree(entry, ignore_errors=True)
