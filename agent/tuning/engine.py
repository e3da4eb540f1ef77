"""Apply a plan through the journal, roll it back exactly, and report status.

Every kind of change (write, mkdir, pm_qos) is a class in agent/tuning/actions.py; the engine
dispatches through its registry. Apply validates everything first (the plan is complete before
the first write), then for every step: read the original, journal it (fsync), write, journal
`done`. Any refused write rolls back what was already done. Rollback walks the journal in reverse and, per step, compares the value
now on the host (ignoring whitespace) with the original and the target:
    == original  nothing to do (never written, or already restored)
    == target    write back the exact original bytes
    otherwise    someone else changed it since apply: kept and named (unless --force)
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import BadInput, WorkFailed
from core.host import Host
from core.journal import JournalWriteFailed, JournalWriter
from probes.kernel_tuning import sysctld
from agent.tuning.actions import ACTION_KINDS, KILL_AT_ENV, StepResult, UndoContext, errno_name
from agent.tuning.journal import JournalState, StateDir, new_journal_id, now_iso
from probes.kernel_tuning.plan import Action, Plan

# Fault injection for the crash-safety tests: signal ourselves at a named point of apply
# ("created": the journal file exists, no record yet; "begin", "intent:N", "write:N", "done:N")
# or of rollback ("undo:N": step N restored, its `undone` record not yet written). SIGKILL by
# default, or the signal named in KILL_SIGNAL_ENV (INT for a Ctrl-C). Real signals, real journal.
KILL_SIGNAL_ENV = "GUARDIAN_AGENT_TEST_KILL_SIGNAL"
RUNTIME_PREFIXES = ("/proc/", "/sys/", "/dev/")
ROLLED_BACK_RESULTS = ("restored", "unchanged", "forced", "not replayed")


def _kill_point(name: str) -> None:
    if os.environ.get(KILL_AT_ENV) == name:
        # raise(3), not kill(2): a process-directed signal may land on another thread (the
        # children spawner's), and a loaded host could then finish the apply before the main
        # thread sees it; raise() delivers to this thread, as a Ctrl-C's handler would run here.
        signal.raise_signal(getattr(signal, "SIG" + os.environ.get(KILL_SIGNAL_ENV, "KILL")))


@dataclass
class ApplyReport:
    journal_id: str = ""
    steps: list[StepResult] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    nothing_to_do: bool = False


@dataclass
class RollbackReport:
    journal_id: str
    profile: str
    steps: list[StepResult] = field(default_factory=list)
    stale_boot: bool = False
    archived_to: Path | None = None
    journal_error: str = ""  # the journal could not record the rollback (disk full): restores went on

    @property
    def complete(self) -> bool:
        return not self.failed and self.archived_to is not None

    @property
    def kept(self) -> list[StepResult]:
        return [step for step in self.steps if step.result == "kept"]

    @property
    def failed(self) -> list[StepResult]:
        return [step for step in self.steps if step.result == "failed"]


class Engine:
    def __init__(self, host: Host, state: StateDir):
        self.host = host
        self.state = state

    # ------------------------------------------------------------------ apply
    def apply(self, plan: Plan, persist: bool = False) -> ApplyReport:
        self.state.lock()
        try:
            pending = self.state.pending()
            if pending is not None:
                raise BadInput(self._pending_message(pending))
            if plan.unknown:
                names = ", ".join(item.item for item in plan.unknown)
                raise BadInput(f"profile {plan.profile.name}: unknown setting(s) on this kernel: {names} "
                               "(misspelled? mark an item `optional = true` if it exists only on some kernels); "
                               "nothing was applied")
            return self._apply(plan, persist)
        finally:
            self.state.unlock()

    def _pending_message(self, pending: JournalState) -> str:
        when = pending.begin.get("started_at", "?")
        boot = "this boot" if pending.boot_id == self.host.boot_id() else f"an earlier boot ({pending.boot_id})"
        return (f"a tuning journal is pending (profile {pending.profile}, applied {when}, {boot}): "
                f"run `guardian-agent tune rollback` first ({pending.path})")

    def _apply(self, plan: Plan, persist: bool) -> ApplyReport:
        report = ApplyReport()
        steps: list[tuple[str, Action, bool]] = []
        for item in plan.applicable:
            for action in item.actions:
                steps.append((item.item, action, item.best_effort))
        if persist:
            action, warnings = self._persist_action(plan)
            report.warnings.extend(warnings)
            if action is not None:
                steps.append(("persist:sysctl.d", action, False))
        if not steps:
            report.nothing_to_do = True
            return report
        report.journal_id = new_journal_id()
        writer = self.state.start({
            "journal_id": report.journal_id, "boot_id": self.host.boot_id(), "profile": plan.profile.name,
            "profile_file": str(plan.profile.file), "variables": plan.profile.variables,
            "host_root": str(self.host.root), "started_at": now_iso(), "pid": os.getpid(),
        }, created=lambda: _kill_point("created"))
        try:
            _kill_point("begin")
            for seq, (name, action, best_effort) in enumerate(steps, start=1):
                error = self._apply_step(writer, seq, name, action, best_effort, report.journal_id)
                if error is None:
                    report.steps.append(StepResult(name, action.path, "applied"))
                    continue
                if best_effort:
                    report.steps.append(StepResult(name, action.path, "refused", error))
                    continue
                _append_if_possible(writer, {"op": "end", "status": "aborted", "error": error})
                refused = f"{name}: the kernel refused {action.target.decode(errors='replace').strip()!r} ({error})"
                raise WorkFailed(self._undo_failed_apply(writer, refused))
            writer.append({"op": "end", "status": "applied"})
        except JournalWriteFailed as error:
            # The journal cannot record the next step (disk full): nothing more is written to the
            # host, and what was written is rolled back from the records already on disk.
            raise WorkFailed(self._undo_failed_apply(writer, f"apply stopped: {error}")) from None
        except KeyboardInterrupt:
            # Ctrl-C or SIGTERM mid-apply: leave the host as it was, then let the CLI exit 130.
            _append_if_possible(writer, {"op": "end", "status": "aborted", "error": "interrupted"})
            self._undo_failed_apply(writer, "interrupted")
            raise
        finally:
            writer.close()
        return report

    def _undo_failed_apply(self, writer: JournalWriter, why: str) -> str:
        """Roll back what a failed apply did; the message says what happened and what to run."""
        writer.close()
        pending = self.state.pending()
        if pending is None:
            return f"{why}; nothing had been applied"
        rollback = self._rollback(pending, force=False)
        undone = sum(1 for step in rollback.steps if step.result == "restored")
        if rollback.failed:
            return (f"{why}; rolling back failed for {', '.join(step.item for step in rollback.failed)}: "
                    f"the journal stays pending, see `guardian-agent tune status --state-dir {self.state.path}` "
                    f"and run `guardian-agent tune rollback --state-dir {self.state.path}`")
        if rollback.archived_to is None:
            return (f"{why}; rolled back {undone} value(s) already applied, but the journal could not be "
                    f"archived ({rollback.journal_error or 'see above'}): once there is space, run "
                    f"`guardian-agent tune rollback --state-dir {self.state.path}` to close it")
        return f"{why}; rolled back {undone} value(s) already applied, journal archived to {rollback.archived_to}"

    def _apply_step(self, writer, seq: int, name: str, action: Action, best_effort: bool,
                    journal_id: str) -> str | None:
        kind = ACTION_KINDS[action.op]
        fields = {"op": action.op, "path": action.path, "compare": action.compare,
                  **kind.journal_fields(self.host, action, f"guardian-qos-{journal_id}-{seq}")}
        writer.append({"op": "intent", "seq": seq, "item": name, "best_effort": best_effort, "action": fields})
        _kill_point(f"intent:{seq}")
        try:
            kind.apply(self.host, action, fields)
        except OSError as error:
            message = f"{os.strerror(error.errno) if error.errno else error}" + (
                f" [{errno_name(error.errno)}]" if error.errno else "")
            writer.append({"op": "failed", "seq": seq, "error": message})
            return message
        _kill_point(f"write:{seq}")
        writer.append({"op": "done", "seq": seq})
        _kill_point(f"done:{seq}")
        return None

    def _persist_action(self, plan: Plan) -> tuple[Action | None, list[str]]:
        values = [(item.sysctl_key, item.target) for item in plan.items
                  if item.kind == "sysctl" and item.compliant is not None]
        if not values:
            return None, ["--persist: the profile has no sysctl values present on this kernel"]
        content = sysctld.render_persist_file(plan.profile.name, values).encode()
        warnings = []
        assignments = sysctld.boot_assignments(self.host, skip=sysctld.PERSIST_FILE)
        for key, target in values:
            for row in sysctld.overriding(assignments, key):
                if row.value != target:
                    warnings.append(f"{key}: {row.where} sets {row.value} and is applied after "
                                    f"{sysctld.PERSIST_FILE} at boot, so it wins over {target}")
        directory = self.host.path(str(Path(sysctld.PERSIST_FILE).parent))
        if not directory.is_dir():
            raise BadInput(f"--persist: {directory} does not exist")
        return Action("write", sysctld.PERSIST_FILE, content, "text"), warnings

    # ------------------------------------------------------------------ rollback
    def rollback(self, force: bool = False) -> RollbackReport:
        self.state.lock()
        try:
            pending = self.state.pending()
            if pending is None:
                raise BadInput(f"nothing to roll back: no pending journal in {self.state.path}")
            self._check_root(pending)
            return self._rollback(pending, force)
        finally:
            self.state.unlock()

    def _check_root(self, journal: JournalState) -> None:
        # A journal written against a fake tree must never be "restored" onto the real /proc.
        root = journal.begin.get("host_root", "/")
        if Path(root) != self.host.root:
            raise BadInput(f"the pending journal was applied to host root {root}, not {self.host.root}: "
                           f"pass --root {root}" if root != "/" else
                           f"the pending journal was applied to the real host (/), not {self.host.root}")

    def _rollback(self, journal: JournalState, force: bool) -> RollbackReport:
        report = RollbackReport(journal.begin.get("journal_id", "?"), journal.profile)
        report.stale_boot = journal.boot_id != self.host.boot_id()
        writer = JournalWriter(journal.path)
        try:
            # Recorded first, so `status` after a rollback cut short knows the values already back at
            # their original were restored by the agent, not "reverted by someone else".
            self._journal_rollback(writer, report, {"op": "rollback_started", "at": now_iso(), "pid": os.getpid()})
            created_dirs = {ACTION_KINDS[i["action"]["op"]].created_directory(i["action"]) for i in journal.intents}
            created_dirs.discard(None)
            for intent in reversed(journal.intents):
                seq = intent["seq"]
                step = self._undo(intent, created_dirs, force, report.stale_boot, journal.boot_id)
                _kill_point(f"undo:{seq}")
                report.steps.append(step)
                self._journal_rollback(writer, report, {"op": "undone", "seq": seq, "result": step.result,
                                                        "detail": step.detail})
            self._journal_rollback(writer, report, {"op": "rolled_back", "at": now_iso(), "force": force,
                                                    "kept": [step.item for step in report.kept]})
        finally:
            writer.close()
        if not report.failed:
            try:
                report.archived_to = self.state.archive(journal)
            except OSError as error:
                report.journal_error = report.journal_error or f"cannot archive the journal: {error.strerror}"
        return report

    @staticmethod
    def _journal_rollback(writer: JournalWriter, report: RollbackReport, record: dict) -> None:
        """Undo records let a rollback cut short resume; restoring is idempotent (each step compares
        the value now with the original first), so a full disk must not stop the restores."""
        if report.journal_error:
            return
        try:
            writer.append(record)
        except JournalWriteFailed as error:
            report.journal_error = str(error)

    def _undo(self, intent: dict, created_dirs: set[str], force: bool, stale: bool, boot_id: str) -> StepResult:
        action = intent["action"]
        name, path, op = intent["item"], action["path"], action["op"]
        runtime = path.startswith(RUNTIME_PREFIXES)
        if stale and runtime and not force:
            return StepResult(name, path, "not replayed",
                              f"journal from an earlier boot ({boot_id}): the reboot reset this value")
        try:
            return ACTION_KINDS[op].undo(name, action, UndoContext(self.host, force, frozenset(created_dirs)))
        except OSError as error:
            return StepResult(name, path, "failed", f"{error.strerror or error} [{errno_name(error.errno)}]")

    # ------------------------------------------------------------------ status
    def status(self) -> dict:
        pending = self.state.pending()
        if pending is None:
            history = self.state.history()
            return {"pending": False, "state_dir": str(self.state.path),
                    "last_journal": str(history[-1]) if history else None}
        self._check_root(pending)
        stale = pending.boot_id != self.host.boot_id()
        rows = []
        for intent in pending.intents:
            action, seq = intent["action"], intent["seq"]
            if seq in pending.failed:
                state, detail = "refused", pending.failed[seq]
            elif seq in pending.undone:
                result = pending.undone[seq]
                state = "rolled back" if result in ROLLED_BACK_RESULTS else f"rollback {result}"
                detail = f"by a rollback that did not finish ({result})"
            elif seq not in pending.done:
                state, detail = "interrupted", "apply died around this write: rollback will check it"
            elif stale and action["path"].startswith(RUNTIME_PREFIXES):
                state, detail = "reset by reboot", ""
            else:
                state, detail = ACTION_KINDS[action["op"]].state(self.host, action, pending.rollback_started)
            rows.append({"item": intent["item"], "path": action["path"], "state": state, "detail": detail})
        return {
            "pending": True, "state_dir": str(self.state.path), "journal": str(pending.path),
            "journal_id": pending.begin.get("journal_id"), "profile": pending.profile,
            "started_at": pending.begin.get("started_at"),
            "apply_finished": pending.finished, "end_status": (pending.end or {}).get("status"),
            "boot": "earlier boot" if stale else "this boot", "boot_id": pending.boot_id, "steps": rows,
            "rollback_started": pending.rollback_started, "journal_damage": pending.damage,
        }

def _append_if_possible(writer: JournalWriter, record: dict) -> None:
    try:
        writer.append(record)
    except JournalWriteFailed:
        pass  # the rollback that follows works from the records already on disk
