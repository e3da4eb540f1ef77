"""The short human summary printed after an audit: findings first, then probe status, headlines."""

from __future__ import annotations

from pathlib import Path

SEVERITY_MARK = {"critical": "CRIT", "warning": "WARN", "info": "info"}
MAX_FINDINGS = 15


COLLECTED_STATUSES = ("ok", "interrupted")


def nothing_collected(result) -> bool:
    """No probe collected anything: "Findings: none" would read as a clean bill of health."""
    return not any(outcome.status in COLLECTED_STATUSES for outcome in result.outcomes)


def render_summary(result, out_dir: Path, verbose: bool = False) -> str:
    lines: list[str] = []
    findings = result.findings.to_pylist()
    if nothing_collected(result):
        statuses = sorted({outcome.status for outcome in result.outcomes}) or ["none selected"]
        lines.append(f"NOTHING MEASURED: every requested probe was {' or '.join(statuses)} (reasons below); "
                     "no findings does not mean a healthy host")
    elif findings:
        lines.append(f"Findings ({len(findings)}, most severe first):")
        for row in findings[:MAX_FINDINGS]:
            lines.append(f"  [{SEVERITY_MARK.get(row['severity'], row['severity'])}] "
                         f"{row['probe']}: {row['subject']}: {row['message']}")
            if row["recommendation"]:
                lines.append(f"         → {row['recommendation']}")
        if len(findings) > MAX_FINDINGS:
            lines.append(f"  … {len(findings) - MAX_FINDINGS} more in findings.parquet")
    else:
        lines.append("Findings: none")
    lines.append("")
    lines.append("Probes:")
    width = max((len(outcome.name) for outcome in result.outcomes), default=4)
    for outcome in result.outcomes:
        tables = ", ".join(f"{name}={table.num_rows}" for name, table in outcome.tables.items()
                           if name != "findings")
        detail = outcome.reason if outcome.status != "ok" else tables
        if outcome.status == "ok" and outcome.reason:
            detail = f"{tables}  ({outcome.reason})" if tables else outcome.reason  # a filter, a loss
        lines.append(f"  {outcome.name:<{width}}  {outcome.status:<11}  {detail}")
        if verbose and outcome.detail:
            lines.extend("      " + text for text in outcome.detail.rstrip().splitlines())
    if result.headlines:
        lines.append("")
        lines.extend(result.headlines)
    lines.append("")
    state = "interrupted, partial window" if result.interrupted else "complete"
    lines.append(f"Bundle ({state}): {out_dir}  run_id={result.manifest['run_id']}")
    return "\n".join(lines)
