"""`guardian-agent rollout`: blue/green + canary rollouts driven by the gate."""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime, timezone
from dataclasses import replace
from pathlib import Path

import click

from agent.commands.report import NO_HTML_OPTION, emit_html_report
from core.errors import BadInput

PLAN_OPTION = click.option("--plan", "plan_path", type=click.Path(path_type=Path), help="rollout.toml")
JOURNAL_OPTION = click.option("--journal", "journal_path", type=click.Path(path_type=Path),
                              help="The rollout's journal file (instead of --plan).")


def _progress(message: str) -> None:
    click.echo(f"… {message}", err=True)


def _check(plan) -> int:
    """Validate the plan, then connect to the balancer: socket, backend, both servers, their state."""
    from agent.rollout.adapters import make_adapter
    from agent.rollout.journal import current_roles

    blue, green = current_roles(plan.journal_path, plan.traffic.blue, plan.traffic.green)
    adapter = make_adapter(replace(plan.traffic, blue=blue, green=green))
    notes = adapter.check()
    click.echo(f"plan {plan.name}: valid ({len(plan.stages)} stages: "
               + " → ".join(f"{s.weight_pct:g}%" for s in plan.stages) + ")")
    view = adapter.observe()
    if view is not None:
        click.echo(f"balancer: blue {blue} {view.blue.state} weight {view.blue.weight:g}, "
                   f"green {green} {view.green.state} weight {view.green.weight:g} ({view.instance or 'read back'})")
    for note in notes:
        click.echo(f"warning: {note}", err=True)
    return 0


def _report_outcome(name: str, outcome, no_html: bool = False, as_json: bool = False) -> int:
    if as_json:
        # Progress and warnings stay on stderr; stdout is the one JSON object (as `chaos run --json`).
        data = {"name": name, **outcome.as_dict(), "exit_code": outcome.exit_code, "html": None}
        if outcome.report_dir and not no_html:
            from reports.html import write_report

            data["html"] = str(write_report(Path(outcome.report_dir)).path)
        click.echo(json.dumps(data, indent=2, default=str))
        return outcome.exit_code
    line = f"rollout {name}: {outcome.status} — {outcome.reason}"
    if outcome.decision_to_blue_ms is not None:
        line += f" (blue restored {outcome.decision_to_blue_ms:.0f} ms after the decision)"
    click.echo(line)
    for result in outcome.after_promotion:
        click.echo(f"after promotion: {result['experiment']}: {result['verdict']}"
                   + (f" — {result.get('reason', '')}" if result["verdict"] != "held" else ""))
    if outcome.chaos_not_held and outcome.status == "promoted":
        click.echo(f"the promotion stands (green serves 100%); {len(outcome.chaos_not_held)} experiment(s) after it "
                   "did not hold: exit 1")
    if outcome.report_dir:
        click.echo(f"report: {outcome.report_dir}")
        emit_html_report(outcome.report_dir, no_html)
    return outcome.exit_code


def _run(plan_path: Path, check_only: bool, no_html: bool = False, as_json: bool = False) -> int:
    from agent.rollout.driver import RolloutDriver
    from agent.rollout.plan import load_plan

    plan = load_plan(plan_path)
    if check_only:
        return _check(plan)
    return _report_outcome(plan.name, RolloutDriver(plan, progress=_progress).run(), no_html, as_json)


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
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as one JSON object.")
@NO_HTML_OPTION
@click.pass_context
def rollout(ctx: click.Context, plan_path: Path | None, check_only: bool, no_html: bool = False,
            as_json: bool = False):
    """Prepare, validate and shift traffic to green stage by stage; promote or roll back.

    `rollout --plan FILE` is `rollout run --plan FILE`; `--check` validates the plan and connects to
    the balancer. Controls: status, pause, resume, promote, abort, undo, retry. Exit codes: 0
    promoted, 1 rolled back, failed or undone, or promoted but an [after_promotion] chaos
    experiment did not hold (refuted, aborted, invalid: the promotion stands, the JSON says so),
    2 bad plan (an [after_promotion] experiment that is missing or invalid included).
    """
    if ctx.invoked_subcommand is not None:
        return None
    if plan_path is None:
        raise BadInput("rollout: give --plan FILE (or a subcommand: run, status, pause, resume, promote, abort, "
                       "undo, retry)")
    return _run(plan_path, check_only, no_html, as_json)


@rollout.command(name="run")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), required=True, help="rollout.toml")
@click.option("--check", "check_only", is_flag=True, help="Validate the plan and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as one JSON object.")
@NO_HTML_OPTION
def run_command(plan_path: Path, check_only: bool, no_html: bool = False, as_json: bool = False) -> int:
    """Run a rollout plan."""
    return _run(plan_path, check_only, no_html, as_json)


def _live_view(state) -> dict | None:
    """What the balancer says now (best effort: status must work with the balancer gone too)."""
    from agent.rollout.adapters import adapter_from_dict

    try:
        view = adapter_from_dict(state.start["traffic"]).observe()
    except Exception as error:  # noqa: BLE001 - reported, not raised
        return {"error": str(error).splitlines()[0]}
    return None if view is None else view.as_dict()


def _next_step(state, journal: Path, balancer: dict | None) -> str:
    """The command an operator should run now, or ''."""
    live_green = (balancer or {}).get("green", {}).get("weight")
    green_serves = bool(live_green) if live_green is not None else bool((state.weights or {}).get("green"))
    if state.status == "interrupted":
        if green_serves:
            return (f"the driver and its watchdog are gone with green still taking traffic: run "
                    f"`guardian-agent rollout abort --journal {journal}` to put blue back, or "
                    f"`guardian-agent rollout retry --journal {journal}` after it")
        return f"the driver is gone without a final record: run `guardian-agent rollout abort --journal {journal}`"
    if state.status == "running" and state.last_of("paused") is not None and \
            (state.last_of("resumed") or {}).get("ts", 0) < state.last_of("paused")["ts"]:
        return (f"paused: `guardian-agent rollout resume --journal {journal}`, `... promote --reason TEXT` "
                f"or `... abort`")
    if state.status == "promoted" and state.last_of("decommission_pending") and not state.last_of("decommissioned"):
        return f"blue kept until decommission: `guardian-agent rollout undo --journal {journal}` brings it back"
    if state.status in ("rolled_back", "failed", "aborted", "undone"):
        return f"`guardian-agent rollout retry --journal {journal}` runs the stages again"
    return ""


@rollout.command()
@PLAN_OPTION
@JOURNAL_OPTION
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status(plan_path: Path | None, journal_path: Path | None, as_json: bool) -> int:
    """Where the last rollout stands, from its journal and the balancer.

    Exit codes: 0, or 1 when the rollout was interrupted (driver and watchdog gone, no final
    record) and traffic may still be split.
    """
    from agent.rollout.journal import last_run

    path = _journal_path(plan_path, journal_path)
    state = last_run(path)
    stage = state.current_stage
    terminal = state.terminal
    balancer = _live_view(state)
    summary = {"run_id": state.run_id, "name": state.start.get("name"), "status": state.status,
               "pid": state.pid, "started_at": datetime.fromtimestamp(state.start["ts"], timezone.utc).isoformat(),
               "stage": None if stage is None else stage["stage"] + 1,
               "stages": len(state.start.get("stages", [])),
               "weight_pct": None if stage is None else stage["weight_pct"], "weights": state.weights,
               "balancer": balancer,
               "last_event": state.last["event"], "reason": (terminal or {}).get("reason", ""),
               "decisions": [{k: r.get(k) for k in ("stage", "decision", "verdict", "reason")}
                             for r in state.records if r["event"] == "decision"]}
    summary["next"] = _next_step(state, path, balancer)
    code = 1 if state.status == "interrupted" else 0
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return code
    click.echo(f"rollout {summary['name']} run {summary['run_id']}: {summary['status']}")
    if summary["stage"] is not None:
        click.echo(f"  stage {summary['stage']}/{summary['stages']} (green {summary['weight_pct']:g}%)")
    if summary["weights"]:
        click.echo(f"  weights (journal): blue {summary['weights']['blue']:g}, green {summary['weights']['green']:g}")
    if balancer and "error" not in balancer:
        click.echo(f"  balancer now: blue {balancer['blue']['weight']:g} {balancer['blue']['state']}, "
                   f"green {balancer['green']['weight']:g} {balancer['green']['state']}")
    elif balancer:
        click.echo(f"  balancer unreadable: {balancer['error']}")
    for decision in summary["decisions"]:
        click.echo(f"  stage {decision['stage'] + 1}: {decision['decision']} ({decision['verdict']}) "
                   f"{decision['reason']}")
    if summary["reason"]:
        click.echo(f"  reason: {summary['reason']}")
    if summary["next"]:
        click.echo(f"  next: {summary['next']}")
    return code


def _send_control(plan_path: Path | None, journal_path: Path | None, action: str, reason: str) -> int:
    from agent.rollout.journal import Journal, last_run

    path = _journal_path(plan_path, journal_path)
    state = last_run(path)
    if not state.driver_alive():
        raise BadInput(f"rollout {state.start.get('name')} run {state.run_id} is {state.status}: no running "
                       f"driver to {action}")
    Journal(path).append("control", run_id=state.run_id, action=action, reason=reason, by_pid=os.getpid())
    click.echo(f"rollout {state.start.get('name')} run {state.run_id}: {action} sent (the driver acts at its next "
               "evaluation)")
    return 0


@rollout.command()
@PLAN_OPTION
@JOURNAL_OPTION
@click.option("--reason", default="paused by operator", show_default=True)
def pause(plan_path: Path | None, journal_path: Path | None, reason: str) -> int:
    """Hold the current stage: weights stay, judging goes on (a fail still rolls back), no advance."""
    return _send_control(plan_path, journal_path, "pause", reason)


@rollout.command()
@PLAN_OPTION
@JOURNAL_OPTION
@click.option("--reason", default="resumed by operator", show_default=True)
def resume(plan_path: Path | None, journal_path: Path | None, reason: str) -> int:
    """Continue a paused stage (its dwell starts again)."""
    return _send_control(plan_path, journal_path, "resume", reason)


@rollout.command()
@PLAN_OPTION
@JOURNAL_OPTION
@click.option("--reason", required=True, help="Why the remaining stages are skipped (recorded).")
def promote(plan_path: Path | None, journal_path: Path | None, reason: str) -> int:
    """Skip the remaining stages: green to 100% now (only while green is UP)."""
    return _send_control(plan_path, journal_path, "promote", reason)


@rollout.command()
@PLAN_OPTION
@JOURNAL_OPTION
@click.option("--reason", default="undone by operator", show_default=True)
def undo(plan_path: Path | None, journal_path: Path | None, reason: str) -> int:
    """After a promotion, before blue is decommissioned: blue serves 100% again."""
    from agent.rollout.driver import undo_promotion
    from agent.rollout.journal import last_run

    path = _journal_path(plan_path, journal_path)
    state = last_run(path)
    in_grace = state.status == "promoted" and state.last_of("decommission_pending") is not None \
        and state.last_of("decommissioned") is None and _pid_alive(state.pid)
    if in_grace:
        # The driver is waiting out the grace period: it undoes (and then skips the decommission).
        from agent.rollout.journal import Journal

        Journal(path).append("control", run_id=state.run_id, action="undo", reason=reason, by_pid=os.getpid())
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if last_run(path).status == "undone":
                click.echo(f"rollout {state.start.get('name')} run {state.run_id}: undone, blue serves 100%")
                return 0
            time.sleep(0.1)
        raise BadInput(f"run {state.run_id}: the driver did not confirm the undo within 30 s; see `rollout status`")
    record = undo_promotion(path, reason)
    click.echo(f"rollout {state.start.get('name')} run {state.run_id}: undone, blue serves 100% "
               f"({record['decision_to_blue_ms']:.0f} ms)")
    for failure in record["hook_failures"]:
        click.echo(f"warning: {failure}", err=True)
    return 1 if record["hook_failures"] else 0


def _pid_alive(pid: int) -> bool:
    from agent.rollout.journal import pid_alive

    return pid_alive(pid)


@rollout.command()
@PLAN_OPTION
@JOURNAL_OPTION
def retry(plan_path: Path | None, journal_path: Path | None) -> int:
    """Run the stages of a rolled-back, failed, aborted or undone rollout again (green is already
    deployed: prepare is skipped, validate runs). Works from the journal alone."""
    from agent.rollout.driver import RolloutDriver
    from agent.rollout.journal import last_run
    from agent.rollout.plan import load_plan, parse_plan

    path = _journal_path(plan_path, journal_path)
    state = last_run(path)
    if state.status in ("running", "promoted"):
        raise BadInput(f"rollout {state.start.get('name')} run {state.run_id} is {state.status}: nothing to retry")
    if state.status == "interrupted":
        raise BadInput(f"run {state.run_id} was interrupted: run `guardian-agent rollout abort --journal {path}` "
                       "first, so blue is known to serve")
    plan = load_plan(plan_path) if plan_path is not None else parse_plan(state.start["plan_data"],
                                                                          Path(state.start["plan"]))
    outcome = RolloutDriver(plan, progress=_progress, retry_of=state.run_id, skip_prepare=True).run()
    return _report_outcome(plan.name, outcome)


@rollout.command()
@PLAN_OPTION
@JOURNAL_OPTION
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
