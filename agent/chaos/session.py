"""One chaos experiment from its file to its bundle: what `chaos run` does, as a library call,
so a rollout can run experiments after promotion (`run_after_promotion`) the same way.

Order: validate everything (file, faults, targets, backends) -> refuse unless the host
carries the experiment's environment marker -> refuse while the kill switch is present or another
run is active -> sweep leftovers -> run -> bundle, gate decision record, chaos_runs dataset.
Nothing is injected before every refusal had its chance.
"""

from __future__ import annotations

import signal
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from core.errors import BadInput, GuardianError
from core.host import Host
from agent.chaos import journal


def load_for_run(experiment_path: Path, config_path: Path | None, environment: str | None):
    """(experiment, agent config, host environment marker, where the marker came from)."""
    from agent.chaos.experiment import load_experiment
    from agent.config import load_config

    experiment = load_experiment(experiment_path)
    config = load_config(config_path)
    if environment is not None:
        return experiment, config, environment, "--environment"
    return experiment, config, config.environment, f"config {config.path or '(none)'}"


def sweep_leftovers(directory: Path, progress: Callable[[str], None]) -> list[dict]:
    """The sweep at the start of every chaos command: faults of agents that are gone."""
    from agent.chaos.sweep import sweep

    if not journal.journal_path(directory).exists():
        return []
    removed = sweep(directory, by="sweep")
    if removed:
        progress(f"swept {len(removed)} fault(s) left by an agent that died")
    return removed


def refuse_if_blocked(directory: Path) -> None:
    if journal.kill_switch_path(directory).exists():
        raise BadInput(f"refused: kill switch {journal.kill_switch_path(directory)} is present "
                       "(remove it to allow chaos runs again)")
    running = journal.read_state(directory).running()
    if running:
        raise BadInput(f"refused: chaos run {running[0].run_id} (pid {running[0].start.get('pid')}) is active; "
                       "one experiment at a time (`chaos status`, `chaos abort`)")


def run_experiment(experiment_path: Path, *, out_dir: Path | None = None, environment: str | None = None,
                   config_path: Path | None = None, state_dir: Path | None = None, publish_run: bool = True,
                   progress: Callable[[str], None] = lambda message: None):
    """Run one experiment end to end; returns the runner's Outcome (bundle_dir, published set)."""
    from agent.chaos.experiment import check_environment
    from agent.chaos.report import record_decisions, write_bundle
    from agent.fleet.publish import publish
    from agent.chaos.runner import ChaosRun, prepare_injectors
    from reports.bundle import new_run_id, validate_out_dir

    experiment, config, host_environment, marker_source = load_for_run(experiment_path, config_path, environment)
    check_environment(experiment, host_environment, marker_source)
    if out_dir is not None:
        validate_out_dir(out_dir)
    directory = journal.ensure_state_dir(journal.state_dir(state_dir))
    sweep_leftovers(directory, progress)
    refuse_if_blocked(directory)
    host = Host.real()
    injectors = prepare_injectors(experiment, host)

    run_id = new_run_id(host.hostname())
    started_at = datetime.now(timezone.utc)
    run = ChaosRun(experiment, injectors, directory, run_id, progress=progress, host=host)
    with abort_on_signals(run):
        outcome = run.run()
        try:
            outcome.bundle_dir = write_bundle(run, outcome, out_dir or directory / "runs" / run_id, started_at)
            record_decisions(outcome, experiment, directory)
            if publish_run:
                try:
                    outcome.published = publish(outcome.bundle_dir, run_id, config)
                except Exception as error:  # noqa: BLE001 - the bundle is written; the dataset can catch up
                    outcome.published = f"not published: {error}"
        finally:
            run.finish(outcome)
    return outcome


class abort_on_signals:
    """SIGINT/SIGTERM abort the run (faults removed at once) instead of killing the agent; only
    in the main thread, where Python delivers signals."""

    def __init__(self, run):
        self.run, self.previous = run, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum, frame):  # noqa: ARG002 - signal signature
        self.run.request_abort(f"{signal.Signals(signum).name} received", "signal")

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def run_after_promotion(experiment_paths: list[Path], *, state_dir: Path | None = None,
                        config_path: Path | None = None, environment: str | None = None,
                        progress: Callable[[str], None] = lambda message: None) -> list[dict]:
    """For the rollout driver: run the experiments a plan names after promotion, one after the
    other; one summary per experiment (verdict, reason, bundle), a refusal or bad file included
    as verdict "invalid" with its reason, so the rollout's bundle can report a refuted hypothesis."""
    from agent.chaos.report import summary

    results = []
    for path in experiment_paths:
        try:
            outcome = run_experiment(Path(path), environment=environment, config_path=config_path,
                                     state_dir=state_dir, progress=progress)
            results.append({"experiment": str(path), **summary(outcome)})
        except Exception as error:  # noqa: BLE001 - after a promotion nothing may crash the rollout
            reason = str(error) if isinstance(error, GuardianError) else f"{type(error).__name__}: {error}"
            results.append({"experiment": str(path), "verdict": "invalid", "reason": reason,
                            "recovery_s": None, "checks": [], "bundle": None})
    return results


def rollout_findings(results: list[dict]) -> list[dict]:
    """Findings rows (the shared `findings` schema) for a rollout's bundle from
    run_after_promotion's results: a refuted hypothesis is critical, anything but held a warning."""
    from probes.base import finding

    rows = []
    for result in results:
        verdict = result.get("verdict")
        if verdict == "held":
            continue
        severity = "critical" if verdict == "refuted" else "warning"
        bundle = f" (bundle {result['bundle']})" if result.get("bundle") else ""
        rows.append(finding("chaos", severity, result["experiment"],
                            f"after promotion, chaos experiment {verdict}: {result.get('reason', '')}{bundle}",
                            "fix the weakness the experiment names before the next rollout, or roll back"
                            if verdict == "refuted" else "run the experiment again (`chaos plan` shows why)"))
    return rows
