"""`guardian-agent rollout`: blue/green + canary rollouts driven by the gate."""

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

PLAN_OPTION = click.option("--plan", "plan_path", type=click.Path(path_type=Path), help="rollout.toml")


def _progress(message: str) -> None:
    click.echo(f"… {message}", err=True)


def _run(plan_path: Path, check_only: bool, no_html: bool = False) -> int:
    from agent.rollout.driver import RolloutDriver
    from agent.rollout.plan import load_plan

    plan = load_plan(plan_path)
    if check_only:
        click.echo(f"plan {plan.name}: valid ({len(plan.stages)} stages: "
                   + " → ".join(f"{s.weight_pct:g}%" for s in plan.stages) + ")")
        return 0
    outcome = RolloutDriver(plan, progress=_progress).run()
    line = f"rollout {plan.name}: {outcome.status} — {outcome.reason}"
    if outcome.decision_to_blue_ms is not None:
        line += f" (blue restored {outcome.decision_to_blue_ms:.0f} ms after the decision)"
    click.echo(line)
    if outcome.report_dir:
        click.echo(f"report: {outcome.report_dir}")
        emit_html_report(outcome.report_dir, no_html)
    return outcome.exit_code


def _journal_path(plan_path: Path | None, journal_path: Path | None) -> Path:
    if journal_path is not None:
        return journal_path
    if plan_path is None:
        raise BadInput("give --plan FILE or --journal FILE")
    from agent.rollout.plan import load_plan

    return load_plan(plan_path).journal_path


@click.group(invoke_without_command=True)
@PLAN_OPTION
@click.option("--check", "check_only", is_flag=True, help="Validate the plan and exit.")
@NO_HTML_OPTION
@click.pass_context
def rollout(ctx: click.Context, plan_path: Path | None, check_only: bool, no_html: bool = False):
    """Prepare, validate and shift traffic to green stage by stage; promote or roll back.

    `rollout --plan FILE` is `rollout run --plan FILE`. Exit codes: 0 promoted, 1 rolled back
    or failed, 2 bad plan.
    """
    if ctx.invoked_subcommand is not None:
        return None
    if plan_path is None:
        raise BadInput("rollout: give --plan FILE (or a subcommand: run, status, abort)")
    return _run(plan_path, check_only, no_html)


@rollout.command(name="run")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), required=True, help="rollout.toml")
@click.option("--check", "check_only", is_flag=True, help="Validate the plan and exit.")
@NO_HTML_OPTION
def run_command(plan_path: Path, check_only: bool, no_html: bool = False) -> int:
    """Run a rollout plan."""
    return _run(plan_path, check_only, no_html)


@rollout.command()
@PLAN_OPTION
@click.option("--journal", "journal_path", type=click.Path(path_type=Path), help="The rollout's journal file.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(plan_path: Path | None, journal_path: Path | None, as_json: bool) -> int:
    """Where the last rollout stands, from its journal."""
    from agent.rollout.journal import last_run

    state = last_run(_journal_path(plan_path, journal_path))
    stage = state.current_stage
    terminal = state.terminal
    summary = {"run_id": state.run_id, "name": state.start.get("name"), "status": state.status,
               "pid": state.pid, "started_at": datetime.fromtimestamp(state.start["ts"], timezone.utc).isoformat(),
               "stage": None if stage is None else stage["stage"] + 1,
               "stages": len(state.start.get("stages", [])),
               "weight_pct": None if stage is None else stage["weight_pct"], "weights": state.weights,
               "last_event": state.last["event"], "reason": (terminal or {}).get("reason", ""),
               "decisions": [{k: r.get(k) for k in ("stage", "decision", "verdict", "reason")}
                             for r in state.records if r["event"] == "decision"]}
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return 0
    click.echo(f"rollout {summary['name']} run {summary['run_id']}: {summary['status']}")
    if summary["stage"] is not None:
        click.echo(f"  stage {summary['stage']}/{summary['stages']} (green {summary['weight_pct']:g}%)")
    if summary["weights"]:
        click.echo(f"  weights: blue {summary['weights']['blue']:g}, green {summary['weights']['green']:g}")
    for decision in summary["decisions"]:
        click.echo(f"  stage {decision['stage'] + 1}: {decision['decision']} ({decision['verdict']}) "
                   f"{decision['reason']}")
    if summary["reason"]:
        click.echo(f"  reason: {summary['reason']}")
    if summary["status"] == "interrupted":
        click.echo("  the driver is gone without a final record: run `rollout abort` to make sure blue serves")
    return 0


@rollout.command()
@PLAN_OPTION
@click.option("--journal", "journal_path", type=click.Path(path_type=Path), help="The rollout's journal file.")
@click.option("--reason", default="aborted by operator", show_default=True)
def abort(plan_path: Path | None, journal_path: Path | None, reason: str) -> int:
    """Stop the rollout and put all traffic on blue (works from the journal alone)."""
    from agent.rollout.driver import restore_blue_from_journal
    from agent.rollout.journal import last_run, pid_alive

    path = _journal_path(plan_path, journal_path)
    state = last_run(path)
    if state.status == "promoted":
        raise BadInput(f"rollout {state.start.get('name')} run {state.run_id} was promoted: nothing to abort "
                       "(roll forward or start a new rollout to go back)")
    if state.driver_alive() and state.pid != os.getpid():
        # The driver rolls back itself on SIGTERM and writes the post-mortem.
        os.kill(state.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while pid_alive(state.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
    record = restore_blue_from_journal(path, reason, "aborted")
    click.echo(f"rollout {state.start.get('name')} run {state.run_id}: aborted, blue serves 100% "
               f"({record['decision_to_blue_ms']:.0f} ms)")
    return 0


commands = [rollout]
