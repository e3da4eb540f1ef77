"""`guardian-agent tune experiment`: measure what each tuning item does to a workload's latency."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import click

from agent.option_types import Seconds
from core.errors import EXIT_INCONCLUSIVE, BadInput


def _item_names(value: str | None) -> list[str] | None:
    if value is None:
        return None
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names:
        raise BadInput("--items: give item names separated by commas (see `tune plan`)")
    return names


def render(summary: dict) -> str:
    lines = [f"Experiment {summary['run_id']}: profile {summary['profile']}, workload {summary['workload']} "
             f"({summary['rounds']} ABBA rounds of {summary['window_s']:g} s windows)"]
    width = min(max((len(row["item"]) for row in summary["items"]), default=4), 40)
    lines.append(f"{'ITEM':<{width}}  {'VERDICT':<20}  {'P50 EFFECT':<24}  {'P99 EFFECT':<24}  A/B SAMPLES")
    for row in summary["items"]:
        def effect(prefix):
            value = row.get(f"{prefix}_effect_pct")
            if value is None:
                return "-"
            low, high = row.get(f"{prefix}_effect_low_pct"), row.get(f"{prefix}_effect_high_pct")
            interval = f" [{low:+.1f}, {high:+.1f}]" if low is not None and high is not None else ""
            return f"{value:+.1f}%{interval}"

        counts = f"{row.get('a_samples') or 0}/{row.get('b_samples') or 0}"
        lines.append(f"{row['item']:<{width}}  {row['verdict']:<20}  {effect('p50'):<24}  {effect('p99'):<24}  {counts}"
                     + ("  (kept)" if row.get("kept") else ""))
    if summary["findings"]:
        lines.append("")
        lines += [f"- {message}" for message in summary["findings"]]
    if summary.get("kept_journal"):
        lines.append(f"Kept {', '.join(summary['kept'])} (journal {summary['kept_journal']}); "
                     "undo with `guardian-agent tune rollback`.")
    lines.append(f"Bundle: {summary['bundle']}")
    if summary.get("published"):
        lines.append(f"dataset: {summary['published']}")
    return "\n".join(lines)


def publish_config(config_path: Path | None):
    """The agent config whose dataset receives the run, or None: a host without an agent config
    keeps its ledger in the tune state directory only (a test or a one-off run never writes into
    a fleet dataset it did not name). A bad config is bad input, before anything changes."""
    from agent.config import DEFAULT_CONFIG_PATH, load_config

    if config_path is None and not DEFAULT_CONFIG_PATH.exists():
        return None
    return load_config(config_path)


def publish_run(config, bundle_dir: Path, run_id: str) -> str:
    from agent.fleet.publish import publish

    if config is None:
        return "not published (no agent config: --config)"
    try:
        return publish(bundle_dir, run_id, config)
    except Exception as error:  # noqa: BLE001 - the bundle and the ledger are written; collect catches up
        return f"not published: {error}"


def experiment_options(function):
    options = [
        click.option("--profile", required=True, help="Profile name or path to a .toml file."),
        click.option("--workload", "workload_command", metavar="CMD",
                     help="Command printing one latency per line (integer ns, or JSON with latency_ns/_us/_ms)."),
        click.option("--kpi-url", metavar="URL", help="HTTP URL timed request -> response (the rollout's collector)."),
        click.option("--kpi", "builtin", type=click.Choice(["loopback-rtt", "timer-jitter", "syscall"]),
                     help="Built-in workload."),
        click.option("--per-item", is_flag=True, help="Measure every item of the profile alone."),
        click.option("--items", metavar="A,B", help="Measure only these items (plan names), each alone."),
        click.option("--rounds", type=click.IntRange(min=2, max=1000), default=4, show_default=True,
                     help="ABBA rounds (one A and one B window each; at least 2)."),
        click.option("--window-s", type=Seconds(3600.0), default=5.0, show_default=True,
                     help="Seconds per measuring window."),
        click.option("--keep", is_flag=True, help="Afterwards apply the items that improved (through the journal)."),
        click.option("--gate-config", type=click.Path(path_type=Path),
                     help="Gate settings TOML overriding the thresholds of tuning.latency_ns[.p99]."),
        click.option("--out", "out_dir", type=click.Path(path_type=Path),
                     help="Bundle directory (created; refused if not empty). Default STATE_DIR/experiments/<run_id>."),
        click.option("--json", "as_json", is_flag=True, help="Machine-readable output."),
        click.option("--config", "config_path", type=click.Path(path_type=Path),
                     help="Agent config whose [dataset] receives the tuning_impact rows "
                          "(default /etc/guardian-agent/config.toml when it exists)."),
        click.option("--no-publish", is_flag=True, help="Do not add the run to the fleet dataset."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def run_experiment(host, profile, profile_dir, profile_vars, state_dir, workload_command, kpi_url, builtin,
                   per_item, items, rounds, window_s, keep, gate_config, out_dir, as_json,
                   config_path=None, no_publish=False) -> int:
    from agent.commands.tune import _engine, _plan
    from agent.tuning import experiment as experiments
    from agent.tuning.experiment_report import record_decisions, write_bundle
    from agent.tuning.verdicts import load_settings
    from agent.tuning.workloads import make_workload
    from reports.bundle import new_run_id, validate_out_dir

    # Everything is validated before the first window: nothing on the host changes on bad input.
    if per_item and items:
        raise BadInput("--per-item and --items: give one of them")
    names = _item_names(items)
    settings = load_settings(gate_config)
    agent_config = None if no_publish else publish_config(config_path)
    workload = make_workload(workload_command, kpi_url, builtin)
    plan = _plan(profile, profile_dir, profile_vars, host)
    chosen, skipped = experiments.choose_items(plan, per_item, names)
    engine = _engine(host, state_dir)
    run_id = new_run_id(host.hostname())
    out_dir = validate_out_dir(out_dir or engine.state.path / "experiments" / run_id)
    outcome = experiments.Outcome(run_id, plan.profile.name, workload.name, workload.metric, rounds, window_s)
    experiment = experiments.Experiment(engine, plan, chosen, workload, rounds, window_s, settings, outcome,
                                        None if as_json else experiments.terminal_progress())
    started_at = datetime.now(timezone.utc)
    experiment.run()
    outcome.items.extend(skipped)
    if keep:
        experiment.keep_improving()
    record_decisions(outcome, settings, engine.state.path)
    summary = write_bundle(outcome, out_dir, host, engine.state.path, started_at)
    summary["published"] = publish_run(agent_config, out_dir, run_id)
    click.echo(json.dumps(summary, indent=2, default=str) if as_json else render(summary))
    if all(item.verdict == "inconclusive" for item in outcome.measured):
        return EXIT_INCONCLUSIVE
    return 0
