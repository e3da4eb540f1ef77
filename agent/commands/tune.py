"""`guardian-agent tune plan|apply|rollback|status`: kernel tuning profiles with exact rollback."""

from __future__ import annotations

import json
from pathlib import Path

import click

from agent.commands import tune_experiment as _tune_experiment
from core.errors import EXIT_DRIFT, BadInput, WorkFailed


def _common(function):
    options = [
        click.option("--profile-dir", type=click.Path(path_type=Path), help="Extra directory searched first for profiles."),
        click.option("--var", "profile_vars", multiple=True, metavar="KEY=VALUE", help="Profile variable (repeatable)."),
        click.option("--state-dir", type=click.Path(path_type=Path),
                     help="Journal directory (default /var/lib/guardian-agent/journal, or $GUARDIAN_AGENT_STATE_DIR)."),
        click.option("--root", "host_root", type=click.Path(path_type=Path), hidden=True,
                     help="Host root for /proc and /sys (tests point it at a fake tree)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def _host(host_root):
    from core.host import Host

    if host_root is None:
        return Host.real()
    if not Path(host_root).is_dir():
        raise BadInput(f"--root {host_root}: not a directory")
    return Host(Path(host_root).resolve())


def _engine(host, state_dir):
    from agent.tuning.engine import Engine
    from agent.tuning.journal import StateDir, state_dir as resolve_state_dir

    return Engine(host, StateDir(resolve_state_dir(state_dir)))


def _plan(profile, profile_dir, profile_vars, host):
    from probes.kernel_tuning.plan import build_plan
    from probes.kernel_tuning.profiles import load_profile, parse_variables

    loaded = load_profile(profile, profile_dir, parse_variables(profile_vars), host)
    return build_plan(host, loaded)


def render_plan(plan) -> str:
    lines = [f"Profile {plan.profile.name} ({plan.profile.file})"]
    if plan.profile.variables:
        lines.append("Variables: " + ", ".join(f"{k}={v}" for k, v in plan.profile.variables.items()))
    width = min(max((len(item.item) for item in plan.items), default=4), 42)
    lines.append(f"{'STATUS':<7} {'ITEM':<{width}}  CURRENT → TARGET  [risk; source]")
    for item in plan.items:
        current = "absent" if item.current is None else item.current
        reboot = "; reboot required" if item.reboot_required else ""
        lines.append(f"{item.status:<7} {item.item:<{width}}  {current} → {item.target}  "
                     f"[{item.risk}{reboot}; {item.source}]")
        if item.status != "ok":
            if item.why:
                lines.append(f"{'':<7} {'':<{width}}  why: {item.why}")
            if item.note:
                lines.append(f"{'':<7} {'':<{width}}  note: {item.note}")
    counts = {status: sum(1 for item in plan.items if item.status == status)
              for status in ("ok", "drift", "reboot", "n/a", "unknown")}
    lines.append("")
    lines.append(f"{len(plan.items)} items: {counts['ok']} compliant, {counts['drift']} to apply, "
                 f"{counts['reboot']} need a reboot, {counts['n/a']} not applicable here"
                 + (f", {counts['unknown']} UNKNOWN (apply refuses them)" if counts["unknown"] else ""))
    line = plan.cmdline_line()
    if line:
        lines.append(f"Boot cmdline: add to GRUB_CMDLINE_LINUX in /etc/default/grub, run update-grub, reboot:")
        lines.append(f"  {line}")
    return "\n".join(lines)


def plan_rows(plan) -> list[dict]:
    return [{"item": i.item, "kind": i.kind, "status": i.status, "current": i.current, "target": i.target,
             "compliant": i.compliant, "why": i.why, "risk": i.risk, "reboot_required": i.reboot_required,
             "source": i.source, "note": i.note} for i in plan.items]


@click.group()
def tune() -> None:
    """Kernel tuning profiles: plan (read-only diff), apply (journaled), rollback (exact), status.

    \b
    Profiles are searched in --profile-dir, /etc/guardian-agent/profiles, then the built-in ones
    (trading-latency, cpu-isolation, postgres-oltp). Exit codes: 0 done/compliant, 1 failed,
    2 bad input, 3 drift (plan: not compliant; rollback: values changed by someone else were kept).
    """


@tune.command(name="plan")
@click.option("--profile", required=True, help="Profile name or path to a .toml file.")
@_common
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def plan_command(profile, profile_dir, profile_vars, state_dir, host_root, as_json):
    """Read-only diff: item by item current → target, why, risk, reboot, source. Exit 3 on drift."""
    host = _host(host_root)
    plan = _plan(profile, profile_dir, profile_vars, host)
    if as_json:
        click.echo(json.dumps({"profile": plan.profile.name, "items": plan_rows(plan),
                               "cmdline_add": plan.cmdline_line()}, indent=2))
    else:
        click.echo(render_plan(plan))
    return EXIT_DRIFT if plan.drifted else 0


@tune.command(name="apply")
@click.option("--profile", required=True, help="Profile name or path to a .toml file.")
@_common
@click.option("--yes", is_flag=True, help="Apply (without it: show the plan and stop).")
@click.option("--persist", is_flag=True, help="Also write /etc/sysctl.d/90-guardian-agent.conf (rollback removes it).")
def apply_command(profile, profile_dir, profile_vars, state_dir, host_root, yes, persist):
    """Apply a profile through the crash-safe journal. Refuses to stack on a pending journal."""
    host = _host(host_root)
    plan = _plan(profile, profile_dir, profile_vars, host)
    engine = _engine(host, state_dir)
    if not yes:
        click.echo(render_plan(plan))
        pending = engine.state.pending()
        if pending is not None:
            click.echo(f"\nA journal is pending ({pending.path}): apply would refuse; run `tune rollback` first.")
        count = sum(len(item.actions) for item in plan.applicable)
        click.echo(f"\nNothing applied: re-run with --yes to apply {count} change(s)"
                   + (" and write the sysctl.d file." if persist else "."))
        return 0
    report = engine.apply(plan, persist=persist)
    for warning in report.warnings:
        click.echo(f"warning: {warning}", err=True)
    if report.nothing_to_do:
        click.echo(f"Profile {plan.profile.name}: nothing to apply (runtime items already compliant).")
    else:
        names = [step.item for step in report.steps]
        for step in report.steps:
            detail = f"  ({step.detail})" if step.detail else ""
            where = f" {step.path}" if names.count(step.item) > 1 else ""
            click.echo(f"{step.result:<8} {step.item}{where}{detail}")
        applied = sum(1 for step in report.steps if step.result == "applied")
        click.echo(f"Applied {applied} change(s); journal {report.journal_id} in {engine.state.path}. "
                   "Undo with `guardian-agent tune rollback`.")
    reboot = [item for item in plan.items if item.reboot_required and item.compliant is False]
    if reboot:
        click.echo(f"{len(reboot)} boot item(s) need a reboot; add to GRUB_CMDLINE_LINUX: {plan.cmdline_line()}")
    return 0


@tune.command(name="rollback")
@_common
@click.option("--force", is_flag=True, help="Also restore values someone else changed since apply.")
def rollback_command(profile_dir, profile_vars, state_dir, host_root, force):
    """Restore every journaled value exactly, in reverse order. Exit 3 if changed values were kept."""
    host = _host(host_root)
    engine = _engine(host, state_dir)
    report = engine.rollback(force=force)
    if report.stale_boot:
        click.echo("The journal is from an earlier boot: runtime values were reset by the reboot and are "
                   "not replayed" + (" (--force: checked anyway)." if force else "; files are restored."))
    names = [step.item for step in report.steps]
    for step in report.steps:
        detail = f"  ({step.detail})" if step.detail else ""
        where = f" {step.path}" if names.count(step.item) > 1 else ""
        click.echo(f"{step.result:<12} {step.item}{where}{detail}")
    restored = sum(1 for step in report.steps if step.result in ("restored", "forced"))
    click.echo(f"Rolled back profile {report.profile}: {restored} restored, {len(report.kept)} kept "
               f"(changed by someone else), {len(report.failed)} failed.")
    if report.archived_to:
        click.echo(f"Journal archived to {report.archived_to}")
    if report.kept:
        click.echo("Kept values are named above; `tune rollback` has finished. Restore them by hand "
                   "or re-apply and roll back with --force.")
    if report.failed:
        raise WorkFailed(f"{len(report.failed)} value(s) could not be restored; the journal stays pending")
    return EXIT_DRIFT if report.kept else 0


@tune.command(name="status")
@_common
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def status_command(profile_dir, profile_vars, state_dir, host_root, as_json):
    """Show the pending journal, what is applied and any drift since. Exit 3 on drift."""
    host = _host(host_root)
    status = _engine(host, state_dir).status()
    if as_json:
        click.echo(json.dumps(status, indent=2))
    elif not status["pending"]:
        click.echo(f"No pending journal in {status['state_dir']}."
                   + (f" Last: {status['last_journal']}" if status.get("last_journal") else ""))
    else:
        finished = "finished" if status["apply_finished"] else "DID NOT FINISH (crashed or killed)"
        click.echo(f"Pending journal {status['journal_id']}: profile {status['profile']}, applied "
                   f"{status['started_at']} ({status['boot']}), apply {finished}")
        if status.get("rollback_started"):
            click.echo("A rollback started and did not finish: run `guardian-agent tune rollback` to complete it.")
        if status.get("journal_damage"):
            click.echo(f"Journal: {status['journal_damage']} (the records before it are used).")
        for row in status["steps"]:
            detail = f"  ({row['detail']})" if row["detail"] else ""
            click.echo(f"  {row['state']:<16} {row['item']}{detail}")
    drifted = status.get("pending") and any(row["state"] == "drifted" for row in status["steps"])
    return EXIT_DRIFT if drifted else 0


@tune.command(name="experiment")
@_tune_experiment.experiment_options
@_common
def experiment_command(host_root, **options):
    """Measure each item's effect: ABBA rounds of A (current) and B (applied through the journal).

    \b
    Verdict per item, judged by the gate: improves, no measurable effect, worsens, inconclusive.
    Exit codes: 0 the experiment ran (whatever the verdicts), 1 failed, 2 bad input (nothing
    changed; also a pending journal), 4 inconclusive for every item.
    """
    return _tune_experiment.run_experiment(_host(host_root), **options)


commands = [tune]
