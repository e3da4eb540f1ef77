"""`guardian-agent gate`: judge a candidate bundle against a baseline bundle."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from core.errors import BadInput, GuardianError

DEFAULT_RECORD_DIR = Path("guardian-reports") / "gate-decisions"


def render_text(verdict) -> str:
    lines = [f"gate: {verdict.verdict.upper()}"
             + ("" if math.isnan(verdict.score) else f" (score {verdict.score:.0f})") + f" — {verdict.reason}"]
    for metric in verdict.metrics:
        flag = "*" if metric.critical else " "
        unit = "pp" if metric.kind == "proportion" else "%"
        effect = "" if math.isnan(metric.effect_pct) else f"{metric.effect_pct:+.1f}{unit}"
        lines.append(f" {flag} {metric.classification:<12} {metric.metric:<40} {effect:>9}  {metric.reason}")
    if any(m.critical for m in verdict.metrics):
        lines.append("   (* critical: a fail here fails the gate)")
    return "\n".join(lines)


def rollout_gate_settings(report):
    """The gate settings the rollout's own plan used (a re-judge starts from what was decided)."""
    from agent.gate.config import settings_from_mapping

    return settings_from_mapping(report.manifest.get("rollout", {}).get("gate_config", {}),
                                 source=f"{report.path} (the plan's gate settings)")


@click.command()
@click.option("--baseline", "baseline_path", type=click.Path(path_type=Path),
              help="Bundle of the running version (blue).")
@click.option("--candidate", "candidate_path", type=click.Path(path_type=Path),
              help="Bundle of the new version (green).")
@click.option("--rollout", "rollout_path", type=click.Path(path_type=Path),
              help="Instead of two bundles: a rollout report/post-mortem, blue vs green re-judged with the "
                   "plan's own gate settings (or --config), on the samples taken up to each decision.")
@click.option("--stage", "stage_number", type=int,
              help="With --rollout: the stage to re-judge (1-based; default: the last one green served).")
@click.option("--config", "config_path", type=click.Path(path_type=Path),
              help="gate.toml: thresholds, directions, critical metrics, no-data policy.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdict as JSON.")
@click.option("--record", "record_dir", type=click.Path(path_type=Path), default=DEFAULT_RECORD_DIR,
              show_default=True, help="Decision record directory (Parquet dataset) the verdict is appended to.")
@click.option("--no-record", is_flag=True, help="Do not append to the decision record.")
def gate(baseline_path: Path | None, candidate_path: Path | None, rollout_path: Path | None,
         stage_number: int | None, config_path: Path | None, as_json: bool, record_dir: Path,
         no_record: bool) -> int:
    """Judge CANDIDATE against BASELINE, metric by metric, on raw samples.

    \b
    Exit codes: 0 pass, 1 fail, 4 inconclusive or marginal (collect more samples
    and run again; the samples needed are reported), 2 bad input.
    A verdict that cannot be appended to --record keeps its exit code; the
    record error is a separate line on stderr.
    """
    from agent.gate.config import load_settings
    from agent.gate.kpi import bundle_metrics
    from agent.gate.record import decision_rows, validate_record_dir
    from agent.gate.verdict import judge
    from reports.bundle import Bundle

    if rollout_path is not None:
        if baseline_path is not None or candidate_path is not None:
            raise BadInput("--rollout replaces --baseline/--candidate: give one or the other")
    elif baseline_path is None or candidate_path is None:
        raise BadInput("give --baseline BUNDLE and --candidate BUNDLE (or --rollout REPORT)")
    elif stage_number is not None:
        raise BadInput("--stage only goes with --rollout")
    settings = load_settings(config_path)
    if not no_record:
        validate_record_dir(record_dir)
    if rollout_path is not None:
        from agent.rollout.driver import rollout_report_metrics

        report = Bundle(rollout_path)
        if config_path is None:
            settings = rollout_gate_settings(report)
        metrics, stage, scope = rollout_report_metrics(report, stage_number, settings.min_samples)
        baseline_name, candidate_name = f"{rollout_path.resolve()}#blue", f"{rollout_path.resolve()}#green@{stage}"
        baseline_run_id = candidate_run_id = report.run_id
        context = f"gate --rollout (stage {stage}, baseline: {scope})"
    else:
        baseline, candidate = Bundle(baseline_path), Bundle(candidate_path)
        metrics = bundle_metrics(baseline, candidate)
        baseline_name, candidate_name = str(baseline_path.resolve()), str(candidate_path.resolve())
        baseline_run_id, candidate_run_id = baseline.run_id, candidate.run_id
        context = "gate"
    if not metrics:
        raise BadInput(f"{baseline_name} and {candidate_name} hold no table the gate can judge "
                       "(turns, syscalls, pg_queries, host, tcp, flows)")
    verdict = judge(metrics, settings)
    rows = decision_rows(verdict, settings, context=context, baseline=baseline_name, candidate=candidate_name,
                         baseline_run_id=baseline_run_id, candidate_run_id=candidate_run_id)
    if as_json:
        payload = verdict.as_dict()
        payload.update({"baseline": baseline_name, "candidate": candidate_name,
                        "baseline_run_id": baseline_run_id, "candidate_run_id": candidate_run_id})
        click.echo(json.dumps(payload, indent=2))
    else:
        click.echo(render_text(verdict))
    if not no_record:
        record_decision(record_dir, rows)
    return verdict.exit_code


def record_decision(record_dir: Path, rows: list[dict]) -> None:
    """Append to the decision record; a failure is its own line, never the verdict's exit code
    (a read-only or full record directory must not turn a pass into a fail)."""
    from agent.gate.record import append_decision

    try:
        append_decision(record_dir, rows)
    except (OSError, GuardianError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
        click.echo(f"guardian-agent: --record {record_dir}: decision not recorded ({reason}); "
                   "the verdict above stands", err=True)


commands = [gate]
