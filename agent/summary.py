"""The short human summary printed after an audit: findings first, then probe status, headlines."""

from __future__ import annotations

from pathlib import Path

SEVERITY_MARK = {"critical": "CRIT", "warning": "WARN", "info": "info"}
MAX_FINDINGS = 15
HISTOGRAM_SYSCALLS = 3
HISTOGRAM_FLOWS = 2
HISTOGRAM_WIDTH = 40


COLLECTED_STATUSES = ("ok", "partial", "interrupted")


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
    partial = [outcome.name for outcome in result.outcomes if outcome.status == "partial"]
    if partial:
        lines.append(f"  partial: {', '.join(partial)} dropped data (maps full): its numbers are lower "
                     "bounds; see the probe capacity finding")
    if result.headlines:
        lines.append("")
        lines.extend(result.headlines)
    histograms = bundle_histograms(out_dir)
    if histograms:
        lines.append("")
        lines.extend(histograms)
    lines.append("")
    state = "interrupted, partial window" if result.interrupted else "complete"
    lines.append(f"Bundle ({state}): {out_dir}  run_id={result.manifest['run_id']}")
    return "\n".join(lines)


def log2_histogram_lines(buckets: list[tuple[int, int, int]], unit: str = "nsecs") -> list[str]:
    """bcc's print_log2_hist layout (bcc 0.26 table.py): `lo -> hi : count |****|`, stars scaled
    to the largest bucket and rounded down, the empty buckets between the first and the last
    kept so the shape reads true."""
    if not buckets:
        return []
    by_low = {low: (high, count) for low, high, count in buckets}
    low, last = buckets[0][0], buckets[-1][0]
    largest = max(count for _, _, count in buckets)
    wide = buckets[-1][1] > 1 << 32  # bcc widens its columns past 32 buckets
    number, header = ("%20d -> %-20d", "%-29s") if wide else ("%10d -> %-10d", "%-19s")
    lines = [f"     {header % unit} : count     distribution"]
    while low <= last:
        high, count = by_low.get(low, (low * 2, 0))
        stars = "*" * min(HISTOGRAM_WIDTH, HISTOGRAM_WIDTH * count // largest)
        lines.append(f"{number % (low, high - 1)} : {count:<8} |{stars:<{HISTOGRAM_WIDTH}}|")
        low = high if high > low else low * 2
    return lines


def bundle_histograms(out_dir: Path) -> list[str]:
    """Latency histograms for the worst syscalls (by max, ignoring calls that wait by design)
    and the slowest flows' turns, read back from the bundle just written."""
    import pyarrow.compute as pc

    from core.errors import BadInput
    from reports.html_data import latency_log2_histogram, log2_histogram, open_source, syscall_buckets, syscall_pairs

    try:
        source = open_source(Path(out_dir))
    except BadInput:
        return []
    lines: list[str] = []
    pairs, buckets = syscall_pairs(source), syscall_buckets(source)
    if pairs is not None and buckets is not None and pairs.num_rows:
        from probes.syscalls import WAITING_SYSCALLS

        every: dict[str, int] = {}
        for syscall, max_ns in zip(pairs["syscall"].to_pylist(), pairs["max_ns"].to_pylist()):
            every[syscall] = max(every.get(syscall, 0), max_ns or 0)
        # A target that only sleeps or polls still gets its histograms: waits are left out only
        # when something else ran.
        worst = {name: value for name, value in every.items() if name not in WAITING_SYSCALLS} or every
        for syscall in sorted(worst, key=lambda name: -worst[name])[:HISTOGRAM_SYSCALLS]:
            histogram = log2_histogram(buckets, pc.equal(buckets["syscall"], syscall))
            if histogram:
                lines.append(f"{syscall}: latency of every traced call (max {worst[syscall]:,} ns)")
                lines.extend(log2_histogram_lines(histogram))
    turns = source.table("turns")
    if turns is not None and turns.num_rows and "latency_ns" in turns.column_names:
        import numpy as np

        latency = turns["latency_ns"].to_numpy(zero_copy_only=False)
        flows = turns["flow"].to_numpy(zero_copy_only=False) if "flow" in turns.column_names else np.zeros(latency.size)
        tails = {flow: np.quantile(latency[flows == flow], 0.99) for flow in np.unique(flows)[:1000]}
        for flow in sorted(tails, key=lambda f: -tails[f])[:HISTOGRAM_FLOWS]:
            lines.append(f"flow {flow}: request -> response turn latency (p99 {tails[flow]:,.0f} ns)")
            lines.extend(log2_histogram_lines(latency_log2_histogram(latency[flows == flow])))
    return lines
