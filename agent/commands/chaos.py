"""`guardian-agent chaos run|plan|doctor|status|abort`: chaos experiments (PICT), see docs/chaos.md.

Exit codes: 0 hypothesis held (or the command did its job), 1 refuted / aborted / not-steady /
invalid (the JSON says which) or the work failed, 2 bad input or refused (environment, kill switch).
Every chaos command first sweeps faults left by an agent that died (from the journal alone).
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime, timezone
from pathlib import Path

import click

from agent.commands.report import NO_HTML_OPTION, emit_html_report
from core.errors import BadInput

STATE_DIR_OPTION = click.option("--state-dir", type=click.Path(path_type=Path),
                                help="Journal, kill switch and decision record "
                                     "(default /var/lib/guardian-agent/chaos, or $GUARDIAN_AGENT_CHAOS_DIR).")
CONFIG_OPTION = click.option("--config", "config_path", type=click.Path(path_type=Path),
                             help="Agent config (default /etc/guardian-agent/config.toml): its `environment` "
                                  "marker and [dataset].")
ENVIRONMENT_OPTION = click.option("--environment", help="Mark this host as environment NAME for this command "
                                                        "(instead of the config's marker).")
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def _progress(message: str) -> None:
    click.echo(f"… {message}", err=True)


def _state_dir(explicit: Path | None, create: bool) -> Path:
    from agent.chaos import journal

    directory = journal.state_dir(explicit)
    if create:
        journal.ensure_state_dir(directory)
    return directory


def _sweep(directory: Path) -> list[dict]:
    from agent.chaos.session import sweep_leftovers

    return sweep_leftovers(directory, _progress)


def _load(experiment_path: Path, config_path: Path | None, environment: str | None):
    from agent.chaos.session import load_for_run

    return load_for_run(experiment_path, config_path, environment)


def _print_checks(checks: list[dict]) -> None:
    width = max((len(check["name"]) for check in checks), default=10)
    for check in checks:
        click.echo(f"  {check['name']:<{width}}  {check['classification']:<12}  {check['reason']}")


@click.group()
def chaos():
    """Chaos experiments on paper trading: steady state, faults, a gate verdict against a control.

    \b
    Exit codes: 0 hypothesis held, 1 refuted / aborted / not-steady / invalid,
                2 bad experiment or refused (environment marker, kill switch).
    """


@chaos.command(name="run")
@click.argument("experiment_path", metavar="EXPERIMENT.toml", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path),
              help="Bundle directory (created; refused if not empty). Default STATE_DIR/runs/<run_id>.")
@JSON_OPTION
@ENVIRONMENT_OPTION
@CONFIG_OPTION
@STATE_DIR_OPTION
@click.option("--no-publish", is_flag=True, help="Do not add the run to the fleet dataset (chaos_runs).")
@NO_HTML_OPTION
def run_command(experiment_path: Path, out_dir: Path | None, as_json: bool, environment: str | None,
                config_path: Path | None, state_dir: Path | None, no_publish: bool, no_html: bool = False) -> int:
    """Run one experiment end to end and write its bundle."""
    from agent.chaos.report import summary
    from agent.chaos.session import run_experiment

    outcome = run_experiment(experiment_path, out_dir=out_dir, environment=environment, config_path=config_path,
                             state_dir=state_dir, publish_run=not no_publish,
                             progress=_progress if not as_json else (lambda message: None))
    data = summary(outcome)
    if as_json:
        if not no_html and outcome.bundle_dir is not None:
            from reports.html import write_report

            data["report"] = str(write_report(Path(outcome.bundle_dir)).path)
        click.echo(json.dumps(data, indent=2, default=str))
        return outcome.exit_code
    click.echo(f"chaos {outcome.title!r}: {outcome.verdict} — {outcome.reason}")
    _print_checks(data["checks"])
    if outcome.recovery_s is not None:
        click.echo(f"  recovery: {outcome.recovery_s:.2f} s")
    for row in outcome.findings:
        if row["severity"] != "info":
            click.echo(f"  [{row['severity']}] {row['message']}\n      → {row['recommendation']}")
    click.echo(f"bundle: {outcome.bundle_dir}")
    if outcome.published:
        click.echo(f"dataset: {outcome.published}")
    emit_html_report(outcome.bundle_dir, no_html)
    return outcome.exit_code


def _one_evaluation(experiment) -> dict:
    """`chaos plan`: one second of the steady-state requests and the safeguards on them."""
    from agent.chaos.checks import tolerance_check
    from agent.chaos.sampler import GroupCollector, window_stats

    steady = experiment.steady_state
    collectors = {"experiment": GroupCollector("experiment", steady.url, steady)}
    if steady.control_url:
        collectors["control"] = GroupCollector("control", steady.control_url, steady)
    for collector in collectors.values():
        collector.set_phase("before")
        collector.start()
    time.sleep(1.0)
    for collector in collectors.values():
        collector.stop()
    groups = {name: collector.snapshot() for name, collector in collectors.items()}
    result = {"steady_state": {name: tolerance_check(f"{name}.steady_state", samples, steady, 1).as_dict()
                               for name, samples in groups.items()},
              "safeguards": []}
    for safeguard in experiment.safeguards:
        group, metric = (("control", safeguard.metric[8:]) if safeguard.metric.startswith("control_")
                         else ("experiment", safeguard.metric))
        value = window_stats(groups.get(group, []))[metric]
        result["safeguards"].append({"safeguard": safeguard.describe(), "value": value,
                                     "would_abort": safeguard.tripped(value)})
    return result


@chaos.command(name="plan")
@click.argument("experiment_path", metavar="EXPERIMENT.toml", type=click.Path(path_type=Path))
@JSON_OPTION
@ENVIRONMENT_OPTION
@CONFIG_OPTION
@STATE_DIR_OPTION
def plan_command(experiment_path: Path, as_json: bool, environment: str | None, config_path: Path | None,
                 state_dir: Path | None) -> int:
    """Dry run: resolved targets, backends, the exact undo of every fault, one evaluation of the
    steady state and the safeguards. Nothing is injected."""
    from agent.chaos.experiment import check_environment
    from agent.chaos.runner import prepare_injectors
    from core.host import Host

    _sweep(_state_dir(state_dir, create=False))
    experiment, _config, host_environment, marker_source = _load(experiment_path, config_path, environment)
    try:
        check_environment(experiment, host_environment, marker_source)
        refusal = ""
    except BadInput as error:
        refusal = str(error)
    injectors = prepare_injectors(experiment, Host.real())
    plans = [{"fault": fault.where, "kind": fault.kind, "duration_s": fault.duration_s, **injector.plan()}
             for fault, injector in zip(experiment.faults, injectors, strict=True)]
    for injector in injectors:  # a dry run: the standby children check() started end here
        injector.discard()
    data = {"title": experiment.title, "hypothesis": experiment.hypothesis, "environment": experiment.environment,
            "host_environment": host_environment, "refused": refusal or None, "planned_s": experiment.planned_s,
            "faults": plans, "evaluation": _one_evaluation(experiment)}
    if as_json:
        click.echo(json.dumps(data, indent=2, default=str))
        return 0
    click.echo(f"chaos plan {experiment.title!r} ({experiment.planned_s:g} s): nothing injected")
    click.echo(f"  environment: {experiment.environment} (this host: {host_environment or 'no marker'})"
               + (" — a run would be REFUSED" if refusal else ""))
    for plan in plans:
        click.echo(f"  {plan['fault']} {plan['kind']} for {plan['duration_s']:g} s on {plan.get('target')} "
                   f"via {plan.get('backend')}")
        click.echo(f"      blast radius: {plan.get('blast_radius')}")
        click.echo(f"      undo: {plan.get('undo')}")
    for name, check in data["evaluation"]["steady_state"].items():
        click.echo(f"  steady state now ({name}): {check['classification']} — {check['reason']}")
    for row in data["evaluation"]["safeguards"]:
        value = "no data" if row["value"] is None else f"{row['value']:.2f}"
        click.echo(f"  safeguard {row['safeguard']}: now {value}" + (" — WOULD ABORT" if row["would_abort"] else ""))
    return 0


@chaos.command(name="doctor")
@JSON_OPTION
@STATE_DIR_OPTION
def doctor_command(as_json: bool, state_dir: Path | None) -> int:
    """Every fault kind: available or not here, why, and the backend it would use."""
    from agent.chaos.faults import REGISTRY
    from core.host import Host

    _sweep(_state_dir(state_dir, create=False))
    host = Host.real()
    rows = []
    for injector in REGISTRY:
        try:
            available, reason, backend = injector.availability(host)
        except Exception as error:  # noqa: BLE001 - a crashing check is a bug, reported not raised
            available, reason, backend = False, f"check failed: {type(error).__name__}: {error}", ""
        rows.append({"kind": injector.kind, "status": "available" if available else "unavailable",
                     "backend": backend, "reason": reason, "owned_by_kernel": injector.owned_by_kernel,
                     "description": injector.description})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return 0
    width = max((len(row["kind"]) for row in rows), default=4)
    for row in rows:
        lifetime = "dies with the agent" if row["owned_by_kernel"] else "journal + watchdog"
        click.echo(f"{row['kind']:<{width}}  {row['status']:<11}  {row['backend'] or '-'}  ({lifetime})  "
                   f"{row['description']}")
        if row["reason"]:
            click.echo(f"{'':<{width}}  ↳ {row['reason']}")
    return 0


@chaos.command(name="status")
@JSON_OPTION
@STATE_DIR_OPTION
def status_command(as_json: bool, state_dir: Path | None) -> int:
    """The active (or last) experiment and its active faults, from the journal."""
    from agent.chaos import journal

    directory = _state_dir(state_dir, create=False)
    swept = _sweep(directory)
    state = journal.read_state(directory)
    last = state.last
    data = {"state_dir": str(directory), "kill_switch": journal.kill_switch_path(directory).exists(),
            "swept": len(swept), "journal_damage": state.damage or None,
            "active_faults": [{"run_id": f.run_id, "index": f.index, "kind": f.kind, "applied": f.applied}
                              for f in state.active_faults()],
            "run": None if last is None else {
                "run_id": last.run_id, "title": last.start.get("title"), "status": last.status,
                "pid": last.start.get("pid"),
                "started_at": datetime.fromtimestamp(last.start["ts"], timezone.utc).isoformat(),
                "phase": next((r["phase"] for r in reversed(last.records) if r["event"] == "phase"), None),
                "verdict": (last.finished or {}).get("verdict"), "reason": (last.finished or {}).get("reason")}}
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return 0
    if last is None:
        click.echo(f"no chaos run recorded in {directory}")
    else:
        run = data["run"]
        click.echo(f"chaos run {run['run_id']} {run['title']!r}: {run['status']}"
                   + (f", phase {run['phase']}" if run["phase"] and last.finished is None else ""))
        if run["reason"]:
            click.echo(f"  {run['reason']}")
    for fault in data["active_faults"]:
        click.echo(f"  active: fault[{fault['index']}] {fault['kind']} of run {fault['run_id']}")
    if data["kill_switch"]:
        click.echo(f"  kill switch present: {journal.kill_switch_path(directory)} (runs are refused)")
    if state.damage:
        click.echo(f"  journal: {state.damage}")
    return 0


@chaos.command(name="abort")
@STATE_DIR_OPTION
@click.option("--reason", default="aborted by operator", show_default=True)
def abort_command(state_dir: Path | None, reason: str) -> int:
    """Remove every active fault from the journal alone (no experiment file needed)."""
    from agent.chaos import journal
    from agent.chaos.sweep import sweep

    directory = _state_dir(state_dir, create=False)
    if not journal.journal_path(directory).exists():
        click.echo(f"no chaos journal in {directory}: nothing to abort")
        return 0
    state = journal.read_state(directory)
    for run in state.running():
        pid = run.start.get("pid")
        if pid and pid != os.getpid():
            journal.append(directory, "abort_requested", run_id=run.run_id, reason=reason)
            os.kill(pid, signal.SIGTERM)  # the runner removes its faults at once and writes its bundle
    deadline = time.monotonic() + 5
    while journal.read_state(directory).running() and time.monotonic() < deadline:
        time.sleep(0.05)
    removed = sweep(directory, by="abort", include_running=True)
    click.echo(f"chaos abort: {len(state.active_faults())} fault(s) were active, "
               f"{len(removed)} undone from the journal now; none active")
    return 0


commands = [chaos]
