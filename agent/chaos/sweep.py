"""Undo active faults from the journal alone: `chaos abort`, the sweep at the start of every
`chaos` command, and the watchdog all come here, so there is one way a fault is taken back."""

from __future__ import annotations

import time
from pathlib import Path

from core.errors import WorkFailed
from agent.chaos import journal
from agent.chaos.journal import ActiveFault


def undo_fault(directory: Path, fault: ActiveFault, by: str) -> dict:
    from agent.chaos.faults import injector_for

    started = time.monotonic()
    injector_for(fault.kind).undo(fault.undo)
    return journal.append(directory, "fault_removed", run_id=fault.run_id, index=fault.index, kind=fault.kind,
                          by=by, remove_ms=round((time.monotonic() - started) * 1000.0, 3))


def undo_faults(directory: Path, faults: list[ActiveFault], by: str) -> list[dict]:
    """Undo every fault (later ones first), recording failures and going on; WorkFailed at the end
    if any could not be undone, naming them."""
    removed, failures = [], []
    for fault in sorted(faults, key=lambda f: -f.index):
        try:
            removed.append(undo_fault(directory, fault, by))
        except Exception as error:  # noqa: BLE001 - one failing undo must not stop the others
            failures.append(f"fault[{fault.index}] {fault.kind} of run {fault.run_id}: {error}")
            journal.append(directory, "undo_failed", run_id=fault.run_id, index=fault.index, by=by,
                           error=f"{type(error).__name__}: {error}")
    if failures:
        raise WorkFailed("could not undo " + "; ".join(failures))
    return removed


def sweep(directory: Path, by: str = "sweep", run_id: str | None = None,
          include_running: bool = False) -> list[dict]:
    """Undo the faults of runs whose agent is gone (or of `run_id` / every run when told), and
    close those runs in the journal. Returns the fault_removed records."""
    state = journal.read_state(directory)
    removed: list[dict] = []
    for run in state.runs.values():
        if run_id is not None and run.run_id != run_id:
            continue
        if run_id is None and not include_running and run.finished is None and run.agent_alive:
            continue
        if run.faults:
            removed += undo_faults(directory, list(run.faults.values()), by)
        if run.finished is None:
            journal.append(directory, "run_finished", run_id=run.run_id, verdict="aborted",
                           reason=f"agent gone or aborted: faults undone by {by}", by=by)
    return removed
