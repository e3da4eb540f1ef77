"""`tune experiment`: does a tuning item help, hurt or do nothing on this host? ABBA rounds of A
(the current settings) and B (the item applied through the journal), judged by the gate.

Round r measures A then B when r is even, B then A when it is odd, so rounds=2 is A B B A: a
drift that is linear in time (a neighbour warming up, a cache filling) adds the same to both arms
and cancels. Every B window is `Engine.apply` of the item, the window, then `Engine.rollback`:
the same fsync'd journal as `tune apply`, so a kill -9 at any point leaves a journal that
`tune rollback` finishes byte-exact, and `apply` refuses to start over it. Nothing is changed
before the workload has shown, in a check window, that it produces samples.

Kill points (GUARDIAN_AGENT_TEST_KILL_AT, as in agent/tuning/engine.py), with I the item and R
the round, both from 1:
    experiment:checked          the workload produced samples; nothing applied yet
    experiment:applied:I.R      B applied (journal pending), its window not started
    experiment:measuring:I.R    halfway through the B window, the workload running
    experiment:measured:I.R     B window over, not rolled back yet
    experiment:rolled-back:I.R  B rolled back and its journal archived
    experiment:judged           every item judged, nothing kept, no bundle yet
    experiment:kept             --keep applied the improving items (their journal stays pending)
"""

from __future__ import annotations

import math
import sys
import threading
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from core.errors import BadInput, WorkFailed
from agent.tuning.engine import Engine, _kill_point
from agent.tuning.verdicts import Judgement, judge_item
from probes.kernel_tuning.plan import Plan, PlanItem

MIN_ROUNDS = 2


@dataclass
class ExperimentItem:
    """What one B arm applies: one plan item (--per-item, --items) or the whole profile."""

    name: str
    plan_items: list[PlanItem]

    @property
    def value_before(self) -> str:
        return "; ".join(f"{i.item}={i.current}" for i in self.plan_items) if len(self.plan_items) > 1 \
            else str(self.plan_items[0].current)

    @property
    def value_after(self) -> str:
        return "; ".join(f"{i.item}={i.target}" for i in self.plan_items) if len(self.plan_items) > 1 \
            else str(self.plan_items[0].target)


@dataclass
class Window:
    item: str
    round: int  # from 1
    arm: str  # A | B
    order: int  # position of the window in the whole experiment, from 1
    samples: list[int]


@dataclass
class ItemOutcome:
    item: ExperimentItem
    judgement: Judgement | None = None
    skipped_reason: str = ""
    kept: bool = False

    @property
    def verdict(self) -> str:
        return self.judgement.verdict if self.judgement else "not measured"


@dataclass
class Outcome:
    run_id: str
    profile: str
    workload: str
    metric: str
    rounds: int
    window_s: float
    items: list[ItemOutcome] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    kept_journal: str = ""

    @property
    def measured(self) -> list[ItemOutcome]:
        return [outcome for outcome in self.items if outcome.judgement is not None]


def choose_items(plan: Plan, per_item: bool, names: list[str] | None) -> tuple[list[ExperimentItem], list[ItemOutcome]]:
    """The B arms to measure, and the items named that cannot be measured (with why)."""
    if plan.unknown:
        raise BadInput(f"profile {plan.profile.name}: unknown setting(s) on this kernel: "
                       f"{', '.join(item.item for item in plan.unknown)}; nothing was changed")
    by_name = {item.item: item for item in plan.items}
    if names:
        missing = [name for name in names if name not in by_name]
        if missing:
            raise BadInput(f"--items: unknown item {missing[0]!r} in profile {plan.profile.name} "
                           f"(items: {', '.join(by_name) or 'none'})")
        chosen = [by_name[name] for name in names]
    else:
        chosen = list(plan.items)
    applicable = [item for item in chosen if item.compliant is False and item.actions]
    skipped = [ItemOutcome(ExperimentItem(item.item, [item]), skipped_reason=_why_not_measured(item))
               for item in chosen if item not in applicable and (names or per_item)]
    if not applicable:
        raise BadInput(f"profile {plan.profile.name}: nothing to experiment with: every chosen item is already at "
                       "its target, needs a reboot or does not apply here (see `tune plan`); nothing was changed")
    if per_item or names:
        return [ExperimentItem(item.item, [item]) for item in applicable], skipped
    return [ExperimentItem(f"profile:{plan.profile.name}", applicable)], skipped


def _why_not_measured(item: PlanItem) -> str:
    if item.compliant:
        return "already at its target"
    if item.reboot_required:
        return "needs a reboot (boot cmdline)"
    return item.note or "not applicable here"


class Experiment:
    def __init__(self, engine: Engine, plan: Plan, items: list[ExperimentItem], workload, rounds: int,
                 window_s: float, settings, outcome: Outcome, progress: Callable[[str], None] | None = None):
        if rounds < MIN_ROUNDS:
            raise BadInput(f"--rounds {rounds}: at least {MIN_ROUNDS} (A B B A) so drift cancels")
        if not (math.isfinite(window_s) and window_s > 0):
            raise BadInput(f"--window-s {window_s}: give a finite number of seconds above 0")
        self.engine = engine
        self.plan = plan
        self.items = items
        self.workload = workload
        self.rounds = rounds
        self.window_s = window_s
        self.settings = settings
        self.outcome = outcome
        self.progress = progress or (lambda message: None)

    def refuse_pending(self) -> None:
        pending = self.engine.state.pending()
        if pending is not None:
            raise BadInput(self.engine._pending_message(pending))

    def run(self) -> Outcome:
        self.refuse_pending()
        self.workload.check(self.window_s)
        _kill_point("experiment:checked")
        self.refuse_pending()  # a `tune apply` may have started while the check window ran
        for index, item in enumerate(self.items, start=1):
            samples = {"A": [], "B": []}
            for round_number in range(1, self.rounds + 1):
                arms = ("A", "B") if round_number % 2 else ("B", "A")
                for arm in arms:
                    window = self._window(index, item, round_number, arm)
                    samples[arm].extend(window.samples)
            self.progress(f"{item.name}: judging {len(samples['A'])} A vs {len(samples['B'])} B samples")
            outcome = ItemOutcome(item, judge_item(samples["A"], samples["B"], self.settings))
            self.outcome.items.append(outcome)
            self.progress(f"{item.name}: {outcome.verdict} ({outcome.judgement.reason})")
        _kill_point("experiment:judged")
        return self.outcome

    def _window(self, index: int, item: ExperimentItem, round_number: int, arm: str) -> Window:
        order = len(self.outcome.windows) + 1
        self.progress(f"{item.name}: round {round_number}/{self.rounds}, {arm} window ({self.window_s:g} s)")
        if arm == "A":
            samples = self.workload.measure(self.window_s)
        else:
            samples = self._b_window(index, item, round_number)
        if not samples:
            raise WorkFailed(f"{self.workload.name}: no sample in the {arm} window of round {round_number} "
                             f"({item.name}); every B change was rolled back")
        window = Window(item.name, round_number, arm, order, samples)
        self.outcome.windows.append(window)
        return window

    def _b_window(self, index: int, item: ExperimentItem, round_number: int) -> list[int]:
        where = f"{index}.{round_number}"
        report = self.engine.apply(Plan(self.plan.profile, item.plan_items))
        if report.nothing_to_do:
            raise WorkFailed(f"{item.name}: already at its target when round {round_number} began "
                             "(changed by someone else during the experiment)")
        try:
            _kill_point(f"experiment:applied:{where}")
            timer = threading.Timer(self.window_s / 2, _kill_point, [f"experiment:measuring:{where}"])
            timer.daemon = True
            timer.start()
            try:
                samples = self.workload.measure(self.window_s)
            finally:
                timer.cancel()
            _kill_point(f"experiment:measured:{where}")
        finally:
            self._rollback(report.journal_id, item)
        _kill_point(f"experiment:rolled-back:{where}")
        return samples

    def _rollback(self, journal_id: str, item: ExperimentItem) -> None:
        pending = self.engine.state.pending()
        if pending is None or pending.begin.get("journal_id") != journal_id:
            return
        rollback = self.engine.rollback()
        if rollback.failed or rollback.kept:
            names = ", ".join(step.item for step in rollback.failed + rollback.kept)
            raise WorkFailed(f"{item.name}: rolling back the B window left {names} changed "
                             f"(see `guardian-agent tune status --state-dir {self.engine.state.path}`); "
                             "the experiment stopped")

    def keep_improving(self) -> list[ItemOutcome]:
        """Apply only the items that improved, through the journal (rolled back by `tune rollback`)."""
        improving = [o for o in self.outcome.items if o.verdict == "improves"]
        if not improving:
            return []
        plan_items = [plan_item for o in improving for plan_item in o.item.plan_items]
        report = self.engine.apply(Plan(self.plan.profile, plan_items))
        self.outcome.kept_journal = report.journal_id
        for o in improving:
            o.kept = True
        _kill_point("experiment:kept")
        return improving


def samples_by_arm(outcome: Outcome, item: str) -> tuple[np.ndarray, np.ndarray]:
    def gather(arm):
        chunks = [w.samples for w in outcome.windows if w.item == item and w.arm == arm]
        return np.concatenate([np.asarray(c, dtype=np.int64) for c in chunks]) if chunks else np.zeros(0, np.int64)

    return gather("A"), gather("B")


def terminal_progress() -> Callable[[str], None] | None:
    try:
        if not sys.stderr.isatty():
            return None
    except (AttributeError, ValueError):
        return None
    return lambda message: print(f"… {message}", file=sys.stderr, flush=True)
