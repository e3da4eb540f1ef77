"""The short human summary printed after an audit: findings first, then probe status, headlines."""

from __future__ import annotations

from pathlib import Path

SEVERITY_MARK = {"critical": "CRIT", "warning": "WARN", "info": "info"}
MAX_FINDINGS = 15


def render_summary(result, out_dir: Path, verbose: bool = False) -> str:
    lines: list[str] = []
    findings = result.findings.to_pylist()
    if findings:
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
        lines.append(f"  {outcome.name:<{width}}  {outcome.status:<11}  {detail}")
        if verbose and outcome.detail:
            lines.extend("      " + text for text in outcome.detail.rstrip().splitlines())
    partial = [outcome.name for outcome in result.outcomes if outcome.status == "partial"]
    if partial:
        lines.append(f"  partial: {', '.join(partial)} dropped data (maps full): its numbers are lower "
                     "bounds; see the probe capacity finding")
    if result.headlines:
        lines.append("")
        lines.extend(result.headlines)
    lines.append("")
    state = "interrupted, partial window" if result.interrupted else "complete"
    lines.append(f"Bundle ({state}): {out_dir}  run_id={result.manifest['run_id']}")
    return "\n".join(lines)
