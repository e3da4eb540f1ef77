"""The sections of the HTML report, one function per kind of evidence, each reading the bundle's
own tables and returning None when the bundle has nothing for it.

Order on the page: findings first (what to fix), then probe status (what could not be seen),
then the evidence. Tables that no section knows (a new probe, chaos runs) get a generic section:
their schema, row count, numeric summaries and first rows, so a new kind shows something useful
before anyone writes a section for it.
"""

from __future__ import annotations

import base64
import re
from collections import OrderedDict
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from reports import html_charts as charts
from reports.html_blocks import (Cell, Chart, Embed, Note, Section, Table, cell, heat_style,
                                 table_from_rows)
from reports.html_data import (ReportSource, log2_histogram, syscall_buckets,
                               syscall_pairs, top_syscalls)
from reports.tuning_impact import effect_text, measured_effect
from reports.turn_stats import flow_turn_stats, turn_row_count

SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}
TOP_SYSCALL_HISTOGRAMS = 6
HEATMAP_PIDS = 20
HEATMAP_SYSCALLS = 15
TOP_FLOWS = 6
TOP_QUERIES = 20
MAX_FINDING_GROUPS = 200
CDF_POINTS = 400
CDF_FRACTIONS = np.linspace(0, 1, CDF_POINTS + 1)[1:].tolist()
TURN_QUANTILES = [0.5, 0.99, 0.999]
# Tables beyond this many rows are summarised (quantiles, buckets), never listed whole.
AGGREGATE_ABOVE_ROWS = 100_000
_DIGITS = re.compile(r"\d+(\.\d+)?")


# ---------------------------------------------------------------------------------------------
# findings and probes


def findings_section(source: ReportSource) -> Section | None:
    table = source.table("findings")
    if table is None:
        return None
    section = Section("findings", "Findings")
    if table.num_rows == 0:
        section.blocks.append(Note("No findings: nothing to fix was seen in this window."))
        return section
    groups = group_findings(table.to_pylist())
    counts = OrderedDict((s, 0) for s in SEVERITY_ORDER)
    for group in groups:
        counts[group["severity"]] = counts.get(group["severity"], 0) + group["count"]
    section.summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    rows = []
    for index, group in enumerate(groups[:MAX_FINDING_GROUPS]):
        subjects = group["subjects"]
        subject_text = subjects[0] + (f" and {len(subjects) - 1} more" if len(subjects) > 1 else "")
        rows.append([
            Cell(group["severity"], style=f"font-weight:600;color:{_severity_colour(group['severity'])}"),
            cell(group["probe"]),
            Cell(subject_text, title="; ".join(subjects[:50])),
            cell(group["message"]),
            cell(group["recommendation"]),
            cell(group["count"], key=f"findings:{index}:count"),
        ])
    shown = (f"the {MAX_FINDING_GROUPS} most severe and frequent groups; all in findings.parquet"
             if len(groups) > MAX_FINDING_GROUPS else "")
    section.blocks.append(Table(["severity", "probe", "subject", "message", "recommendation", "count"], rows,
                                caption=f"{table.num_rows:,} findings in {len(groups):,} groups "
                                        "(one finding repeated across subjects is one row)", note=shown))
    return section


def group_findings(rows: list[dict]) -> list[dict]:
    """One row per (severity, probe, message with its numbers blanked, recommendation): the same
    advice for 13 processes is one row with a count of 13, most severe and most frequent first."""
    groups: dict[tuple, dict] = {}
    for row in rows:
        key = (row.get("severity"), row.get("probe"), _DIGITS.sub("#", row.get("message") or ""),
               _DIGITS.sub("#", row.get("recommendation") or ""))
        group = groups.get(key)
        if group is None:
            group = groups[key] = {**row, "count": 0, "subjects": []}
        group["count"] += 1
        if row.get("subject") and row["subject"] not in group["subjects"]:
            group["subjects"].append(row["subject"])
        if not group["subjects"]:
            group["subjects"].append("")
    return sorted(groups.values(), key=lambda g: (SEVERITY_ORDER.get(g["severity"], 9), -g["count"]))


def _severity_colour(severity: str) -> str:
    return {"critical": "#b3261e", "warning": "#a15c00"}.get(severity, "#3b6fb6")


def probes_section(source: ReportSource) -> Section | None:
    probes = source.manifest.get("probes") or []
    if not probes:
        return None
    rows = []
    for record in probes:
        status = record.get("status", "")
        colour = "#3a7d44" if status == "ok" else "#b3261e" if status == "failed" else "#a15c00"
        tables = ", ".join(f"{name}={count:,}" for name, count in (record.get("tables") or {}).items())
        rows.append([cell(record.get("name")), Cell(status, key=f"probes:{record.get('name')}:status",
                                                     style=f"color:{colour};font-weight:600"),
                     cell(record.get("reason") or ""), cell(tables), cell(record.get("seconds"))])
    bad = sum(1 for r in probes if r.get("status") not in ("ok", "interrupted"))
    section = Section("probes", "Probes", summary=f"{len(probes)} probes, {bad} not ok")
    section.blocks.append(Table(["probe", "status", "reason", "tables (rows)", "seconds"], rows))
    return section


# ---------------------------------------------------------------------------------------------
# host


def host_section(source: ReportSource) -> Section | None:
    table = source.table("host")
    if table is None:
        return None
    section = Section("host", "CPU and host")
    if table.num_rows == 0:
        section.blocks.append(Note("The host table is empty (no sample completed in the window).", "warning"))
        return section
    per_cpu = table.filter(pc.greater_equal(table["cpu"], 0))
    split_columns = [c for c in ("user_pct", "nice_pct", "system_pct", "irq_pct", "softirq_pct", "steal_pct",
                                 "iowait_pct") if c in table.column_names]
    if per_cpu.num_rows:
        aggregates = [(c, "mean") for c in split_columns + ["busy_pct"] if c in table.column_names]
        aggregates += [(c, "sum") for c in ("interrupts", "softirqs", "softirqs_net_rx", "softirqs_timer",
                                            "context_switches") if c in table.column_names]
        grouped = per_cpu.group_by(["cpu"], use_threads=False).aggregate(aggregates)
        grouped = grouped.take(pc.sort_indices(grouped, [("cpu", "ascending")]))
        cpus = [f"cpu{c}" for c in grouped["cpu"].to_pylist()]
        stacks = {c.removesuffix("_pct"): grouped[f"{c}_mean"].to_pylist() for c in split_columns}
        section.blocks.append(Chart(charts.stacked_bars_svg(cpus, stacks, "CPU time split per CPU (mean over the window)",
                                                            "% of CPU")))
        counters = {c: grouped[f"{c}_sum"].to_pylist() for c in ("interrupts", "softirqs")
                    if f"{c}_sum" in grouped.column_names}
        if counters:
            section.blocks.append(Chart(charts.grouped_bars_svg(cpus, counters, "Interrupts and softirqs per CPU (window total)",
                                                                "count")))
        rows = []
        for row in grouped.to_pylist():
            rows.append({"cpu": row["cpu"], **{c: row.get(f"{c}_mean") for c in split_columns + ["busy_pct"]},
                         **{c: row.get(f"{c}_sum") for c in ("interrupts", "softirqs", "context_switches")}})
        columns = ["cpu"] + split_columns + ["busy_pct", "interrupts", "softirqs", "context_switches"]
        section.blocks.append(table_from_rows(rows, [c for c in columns if any(c in r for r in rows)],
                                              "host", "cpu", ("busy_pct", "interrupts"), limit=256))
        busy = _busy_over_time(per_cpu)
        if busy:
            section.blocks.append(Chart(charts.lines_svg(busy, "CPU busy over the window", "seconds", "busy %")))
    return section


def _busy_over_time(per_cpu: pa.Table) -> dict:
    if "busy_pct" not in per_cpu.column_names or "ts" not in per_cpu.column_names:
        return {}
    times = pc.cast(per_cpu["ts"], pa.int64()).to_numpy(zero_copy_only=False)
    start = times.min() if times.size else 0
    series = {}
    cpus = sorted(set(per_cpu["cpu"].to_pylist()))[:16]
    cpu_values = per_cpu["cpu"].to_numpy(zero_copy_only=False)
    busy = per_cpu["busy_pct"].to_numpy(zero_copy_only=False)
    for cpu in cpus:
        mask = cpu_values == cpu
        order = np.argsort(times[mask])
        series[f"cpu{cpu}"] = (((times[mask][order] - start) / 1e6).tolist(), busy[mask][order].tolist())
    return series


def interrupts_section(source: ReportSource) -> Section | None:
    table = source.table("interrupts")
    if table is None or table.num_rows == 0:
        return None
    grouped = table.group_by(["source", "name", "cpu"], use_threads=False).aggregate([("count", "sum")])
    by_name: dict[str, dict[int, int]] = {}
    for row in grouped.to_pylist():
        by_name.setdefault(f"{row['source']}:{row['name']}", {})[row["cpu"]] = row["count_sum"]
    cpus = sorted({row["cpu"] for row in grouped.to_pylist()})
    top = sorted(by_name, key=lambda n: -sum(by_name[n].values()))[:12]
    rows = []
    largest = max((v for n in top for v in by_name[n].values()), default=0)
    for name in top:
        rows.append([cell(name)] + [Cell(f"{by_name[name].get(c, 0):,}", style=heat_style(by_name[name].get(c, 0), largest),
                                         numeric=True) for c in cpus])
    section = Section("interrupts", "Interrupts and softirqs per CPU")
    section.blocks.append(Table(["source:name"] + [f"cpu{c}" for c in cpus], rows,
                                caption="window counts, the 12 busiest sources"))
    return section


# ---------------------------------------------------------------------------------------------
# syscalls


def syscalls_section(source: ReportSource) -> Section | None:
    pairs = syscall_pairs(source)
    if pairs is None:
        return None
    section = Section("syscalls", "Syscall latency")
    if pairs.num_rows == 0:
        section.blocks.append(Note("The syscalls table is empty (no traced process made a syscall).", "warning"))
        return section
    top = top_syscalls(pairs, 20)
    buckets = syscall_buckets(source)
    section.summary = f"{len(set(pairs['pid'].to_pylist())):,} processes, {len(set(pairs['syscall'].to_pylist())):,} syscalls"
    rows = [{**row, "mean_ns": row["total_ns"] / row["count"] if row["count"] else None} for row in top]
    section.blocks.append(table_from_rows(rows, ["syscall", "count", "total_ns", "mean_ns", "max_ns"],
                                          "syscalls", "syscall", ("count", "total_ns", "max_ns"),
                                          caption="top syscalls by total time (all traced processes)"))
    if buckets is not None and buckets.num_rows:
        for row in top[:TOP_SYSCALL_HISTOGRAMS]:
            histogram = log2_histogram(buckets, pc.equal(buckets["syscall"], row["syscall"]))
            if histogram:
                section.blocks.append(Chart(charts.log2_histogram_svg(
                    histogram, f"{row['syscall']}: latency, log2 buckets ({row['count']:,} calls)")))
    section.blocks.append(_syscall_heatmap(pairs))
    return section


def _syscall_heatmap(pairs: pa.Table) -> Table:
    """pid x syscall total time: the busiest processes (rows) by the costliest syscalls (columns)."""
    rows = pairs.select(["pid", "comm", "syscall", "total_ns"]).to_pylist() if "comm" in pairs.column_names else [
        {**r, "comm": ""} for r in pairs.select(["pid", "syscall", "total_ns"]).to_pylist()]
    by_pid: dict[tuple, dict[str, int]] = {}
    syscall_totals: dict[str, int] = {}
    for row in rows:
        by_pid.setdefault((row["pid"], row["comm"] or ""), {})[row["syscall"]] = row["total_ns"]
        syscall_totals[row["syscall"]] = syscall_totals.get(row["syscall"], 0) + row["total_ns"]
    syscalls = sorted(syscall_totals, key=lambda s: -syscall_totals[s])[:HEATMAP_SYSCALLS]
    pids = sorted(by_pid, key=lambda p: -sum(by_pid[p].values()))[:HEATMAP_PIDS]
    largest = max((by_pid[p].get(s, 0) for p in pids for s in syscalls), default=0)
    body = []
    for pid, comm in pids:
        body.append([cell(pid), cell(comm)] + [
            Cell(charts.format_ns(by_pid[(pid, comm)][s]) if by_pid[(pid, comm)].get(s) else "",
                 style=heat_style(by_pid[(pid, comm)].get(s, 0), largest),
                 title=f"{comm} ({pid}) {s}: {by_pid[(pid, comm)].get(s, 0):,} ns") for s in syscalls])
    note = (f"the {len(pids)} busiest of {len(by_pid):,} processes" if len(by_pid) > len(pids) else "")
    return Table(["pid", "comm"] + syscalls, body, note=note,
                 caption="pid × syscall heat map: total time in the syscall (hover a cell for nanoseconds)",
                 sortable=False)


# ---------------------------------------------------------------------------------------------
# tcp


def tcp_section(source: ReportSource) -> Section | None:
    table = source.table("tcp")
    if table is None:
        return None
    section = Section("tcp", "TCP connections")
    if table.num_rows == 0:
        section.blocks.append(Note("No TCP connection of the targets was seen in the window."))
        return section
    if "srtt_us_p50" in table.column_names:
        order = pc.sort_indices(table, [("srtt_us_p50", "descending")])
        table = table.take(order)
    rows = table.to_pylist()
    for row in rows:
        row["connection"] = f"{row.get('laddr')}:{row.get('lport')} → {row.get('raddr')}:{row.get('rport')}"
    columns = [c for c in ("connection", "pid", "comm", "role", "direction", "srtt_us_p50", "srtt_us_p99",
                           "srtt_us_max", "retransmits", "bytes_sent", "bytes_received") if c in rows[0] ]
    section.blocks.append(table_from_rows(rows, columns, "tcp", "connection", ("srtt_us_p50", "srtt_us_max")))
    shown = [r for r in rows if r.get("srtt_us_p50") is not None][:20]
    if shown:
        labels = [f"{r.get('role') or '?'} {r.get('raddr')}:{r.get('rport')}" for r in shown]
        section.blocks.append(Chart(charts.grouped_bars_svg(
            labels, {"p50": [r["srtt_us_p50"] for r in shown], "max": [r.get("srtt_us_max") for r in shown]},
            "smoothed RTT per connection (label: role and peer)", "sRTT µs", log_y=True)))
    if "role" in table.column_names and "srtt_us_p50" in table.column_names:
        roles = table.group_by(["role"], use_threads=False).aggregate(
            [("srtt_us_p50", "approximate_median"), ("srtt_us_max", "max"), ("pid", "count")])
        section.blocks.append(table_from_rows(
            [{"role": r["role"], "connections": r["pid_count"], "srtt_us_p50 (median)": r["srtt_us_p50_approximate_median"],
              "srtt_us_max": r["srtt_us_max_max"]} for r in roles.to_pylist()],
            ["role", "connections", "srtt_us_p50 (median)", "srtt_us_max"], caption="sRTT by peer role"))
    return section


# ---------------------------------------------------------------------------------------------
# flows and turns (pcap, capture probe, rollout KPI samples)


def flows_section(source: ReportSource) -> Section | None:
    flows = source.table("flows")
    if flows is None and not source.has("turns"):
        return None
    section = Section("turns", "Flows and request → response turns")
    if flows is not None and flows.num_rows:
        order = pc.sort_indices(flows, [("turns", "descending")]) if "turns" in flows.column_names else None
        rows = (flows.take(order) if order is not None else flows).slice(0, 50).to_pylist()
        columns = [c for c in ("flow", "client", "server", "packets", "bytes", "turns", "turn_p50_ns",
                               "turn_p99_ns", "turn_max_ns", "retransmits") if c in flows.column_names]
        section.blocks.append(table_from_rows(rows, columns, "flows", "flow", ("packets", "bytes", "turns"),
                                              total_rows=flows.num_rows, caption="flows by turns"))
    # Streamed from the file (reports/turn_stats.py): the page's memory does not grow with turns.
    paths = source.files.get("turns", [])
    turn_rows = turn_row_count(paths)
    if turn_rows == 0 or "latency_ns" not in pq.read_schema(paths[0]).names:
        section.blocks.append(Note("No request → response turns in this bundle."))
        return section
    if turn_rows > AGGREGATE_ABOVE_ROWS:
        section.blocks.append(Note(f"turns has {turn_rows:,} rows: shown as per-flow quantiles, log2 buckets "
                                   f"and a {CDF_POINTS}-point CDF, not row by row (the Parquet file has them all).",
                                   "aggregated"))
    summary_rows = []
    cdfs = {}
    for flow in flow_turn_stats(paths, TOP_FLOWS, TURN_QUANTILES + CDF_FRACTIONS):
        label = "all" if flow.flow is None else f"flow {flow.flow}"
        p50, p99, p999 = flow.quantiles_ns[:len(TURN_QUANTILES)]
        summary_rows.append({"flow": label, "turns": flow.turns, "p50_ns": p50, "p99_ns": p99,
                             "p999_ns": p999, "max_ns": flow.max_ns})
        cdfs[label] = ([max(x, 1) for x in flow.quantiles_ns[len(TURN_QUANTILES):]], CDF_FRACTIONS)
        if flow.log2:
            section.blocks.append(Chart(charts.log2_histogram_svg(flow.log2, f"{label}: turn latency, log2 buckets "
                                                                               f"({flow.turns:,} turns)")))
    section.blocks.insert(1 if flows is not None and flows.num_rows else 0, table_from_rows(
        summary_rows, ["flow", "turns", "p50_ns", "p99_ns", "p999_ns", "max_ns"], "turns", "flow",
        ("turns", "p50_ns", "p99_ns", "max_ns"), caption="turn latency per flow (quantiles: observed values)"))
    if cdfs:
        section.blocks.append(Chart(charts.cdf_svg(cdfs, "turn latency CDF per flow", "latency ns")))
    return section


# ---------------------------------------------------------------------------------------------
# stacks


def stacks_section(source: ReportSource) -> Section | None:
    table = source.table("stacks")
    svg_path = source.extra("stacks.svg")
    diff_path = source.extra("stacks.diff.svg")
    if table is None and svg_path is None and diff_path is None:
        return None
    section = Section("stacks", "Flame graphs")
    for path, caption in ((svg_path, "flame graph: click a frame to zoom, Ctrl-F (or Search) to highlight "
                                     "frames matching a regular expression"),
                          (diff_path, "differential flame graph: red frames grew their own (self) share "
                                      "of samples, blue ones shrank")):
        if path is not None:
            section.blocks.append(_embed_svg(path, caption))
    if source.extra("stacks.speedscope.json"):
        section.blocks.append(Note("stacks.speedscope.json in the bundle opens in speedscope "
                                   "(time-ordered samples: its Time Order view shows when each stack ran)."))
    if table is not None and table.num_rows:
        rows = table.take(pc.sort_indices(table, [("samples", "descending")])).slice(0, 20).to_pylist()
        for row in rows:
            row["leaf"] = row["stack"].rsplit(";", 1)[-1]
        columns = [c for c in ("pid", "process", "thread", "samples", "leaf") if c in rows[0]]
        section.blocks.append(table_from_rows(rows, columns, total_rows=table.num_rows,
                                              caption="hottest stacks (leaf frame shown; full stack in stacks.parquet)"))
    elif table is not None:
        section.blocks.append(Note("No stack samples: the targets did not run on a CPU during the window."))
    return section


def _embed_svg(path, caption: str) -> Embed:
    data = path.read_bytes()
    match = re.search(rb'height="(\d+)"', data[:2000])
    height = min(int(match.group(1)) + 10, 1400) if match else 600
    return Embed("data:image/svg+xml;base64," + base64.b64encode(data).decode(), height, caption, path.name)


# ---------------------------------------------------------------------------------------------
# kernel, jitter


def kernel_section(source: ReportSource) -> Section | None:
    table = source.table("kernel")
    if table is None:
        return None
    section = Section("kernel", "Kernel tuning audit")
    if table.num_rows == 0:
        section.blocks.append(Note("The kernel table is empty."))
        return section
    rows = table.to_pylist()
    rows.sort(key=lambda r: (r.get("compliant") is not False, r.get("item")))
    off = sum(1 for r in rows if r.get("compliant") is False)
    section.summary = f"{off} of {len(rows)} items out of profile {rows[0].get('profile') or ''}".strip()
    body = []
    for row in rows:
        compliant = row.get("compliant")
        style = "color:#b3261e;font-weight:600" if compliant is False else "color:#3a7d44" if compliant else ""
        body.append([cell(row.get("item")), cell(row.get("current")), cell(row.get("expected")),
                     Cell("n/a" if compliant is None else "yes" if compliant else "no",
                          key=f"kernel:{row.get('item')}:compliant", style=style),
                     cell(row.get("risk")), cell(row.get("reboot_required")), _measured_cell(row),
                     cell(row.get("why")), cell(row.get("source"))])
    section.blocks.append(Table(["item", "current", "expected", "compliant", "risk", "reboot required",
                                 "measured effect here", "why", "source"], body))
    return section


MEASURED_STYLES = {"improves": "color:#3a7d44", "worsens": "color:#b3261e;font-weight:600"}


def _measured_cell(row: dict) -> Cell:
    """The last `tune experiment` verdict for the item on this host (the impact ledger)."""
    effect = measured_effect(row)
    if effect is None:
        return Cell("not measured", key=f"kernel:{row.get('item')}:measured")
    return Cell(effect_text(effect), key=f"kernel:{row.get('item')}:measured",
                style=MEASURED_STYLES.get(effect["verdict"], ""))


def jitter_section(source: ReportSource) -> Section | None:
    table = source.table("jitter")
    if table is None:
        return None
    section = Section("jitter", "Jitter per CPU (busy-loop gaps)")
    if table.num_rows == 0:
        section.blocks.append(Note("The jitter table is empty."))
        return section
    rows = sorted(table.to_pylist(), key=lambda r: r["cpu"])
    section.blocks.append(table_from_rows(rows, [c for c in ("cpu", "meter", "gap_count", "lost_pct", "gap_p50_ns", "gap_p99_ns",
                                                             "gap_p999_ns", "gap_max_ns", "threshold_ns")
                                                 if c in table.column_names],
                                          "jitter", "cpu", ("gap_count", "gap_max_ns"), limit=256))
    cpus = [f"cpu{r['cpu']}" for r in rows]
    section.blocks.append(Chart(charts.grouped_bars_svg(
        cpus, {k: [r.get(k) or 0 for r in rows] for k in ("gap_p99_ns", "gap_max_ns")},
        "busy-loop gaps per CPU", "ns", log_y=True)))
    return section


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def postgres_section(source: ReportSource) -> Section | None:
    queries = source.table("pg_queries")
    statements = source.table("postgres")
    advice = source.table("pg_index_advice")
    minutes = source.table("pg_query_minutes")
    if queries is None and statements is None and advice is None:
        return None
    section = Section("postgres", "PostgreSQL")
    if queries is not None:
        if queries.num_rows == 0:
            section.blocks.append(Note("No statement durations in the logs (is log_min_duration_statement set?)."))
        else:
            top = queries.take(pc.sort_indices(queries, [("total_ms", "descending")])).slice(0, TOP_QUERIES)
            section.blocks.append(table_from_rows(
                top.to_pylist(), [c for c in ("fingerprint", "query", "calls", "total_ms", "p50_ms", "p99_ms", "p999_ms",
                                              "max_ms") if c in queries.column_names],
                "pg_queries", "fingerprint", ("calls", "total_ms", "p50_ms", "p99_ms", "p999_ms"),
                total_rows=queries.num_rows, caption="top queries by total time (normalized, no literals)"))
            if minutes is not None and minutes.num_rows:
                section.blocks.extend(_minute_charts(minutes, top["fingerprint"].to_pylist()[:5]))
    if statements is not None and statements.num_rows:
        top = statements.take(pc.sort_indices(statements, [("total_ms", "descending")])).slice(0, TOP_QUERIES)
        section.blocks.append(table_from_rows(
            top.to_pylist(), [c for c in ("database", "query", "calls", "total_ms", "mean_ms", "rows",
                                          "shared_blks_read", "temp_blks_written") if c in statements.column_names],
            total_rows=statements.num_rows, caption="pg_stat_statements over the window, by total time"))
    if advice is not None:
        if advice.num_rows:
            section.blocks.append(table_from_rows(
                advice.to_pylist(), [c for c in ("table", "columns", "calls", "cost_before", "cost_after",
                                                 "cost_reduction_pct", "confirmed", "statement") if c in advice.column_names],
                caption="index advice (hypothetical indexes checked with hypopg)"))
        else:
            section.blocks.append(Note("Index advice: no sequential scan worth an index was found."))
    return section


def _minute_charts(minutes: pa.Table, fingerprints: list[str]) -> list[Chart]:
    wanted = minutes.filter(pc.is_in(minutes["fingerprint"], pa.array(fingerprints)))
    if wanted.num_rows == 0:
        return []
    stamps = pc.cast(wanted["minute"], pa.int64()).to_numpy(zero_copy_only=False)
    start = stamps.min()
    fps = wanted["fingerprint"].to_numpy(zero_copy_only=False)
    calls = {}
    total = {}
    for fingerprint in fingerprints:
        mask = fps == fingerprint
        order = np.argsort(stamps[mask])
        xs = ((stamps[mask][order] - start) / 60).tolist()
        calls[fingerprint[:12]] = (xs, wanted["calls"].to_numpy(zero_copy_only=False)[mask][order].tolist())
        total[fingerprint[:12]] = (xs, wanted["total_ms"].to_numpy(zero_copy_only=False)[mask][order].tolist())
    return [Chart(charts.lines_svg(calls, "calls per minute (top 5 fingerprints by total time)", "minutes", "calls")),
            Chart(charts.lines_svg(total, "total time per minute", "minutes", "ms"))]


# ---------------------------------------------------------------------------------------------
# gate and rollout


def gate_section(source: ReportSource) -> Section | None:
    name = "rollout_verdicts" if source.has("rollout_verdicts") else "gate_decisions"
    table = source.table(name)
    if table is None:
        return None
    section = Section("gate", "Gate decisions" if name == "gate_decisions" else "Gate verdicts per stage")
    if table.num_rows == 0:
        section.blocks.append(Note("No gate evaluation was recorded."))
        return section
    order = pc.sort_indices(table, [("decided_at", "descending")])
    rows = table.take(order).to_pylist()
    decisions: OrderedDict[str, list[dict]] = OrderedDict()
    for row in rows:
        decisions.setdefault(row["decision_id"], []).append(row)
    latest_id, latest = next(iter(decisions.items()))
    head = latest[0]
    section.summary = f"latest: {head['verdict']} — {head.get('gate_reason') or ''}"
    section.blocks.append(Note(f"Latest decision {latest_id} ({head.get('context')}): verdict "
                               f"{head['verdict'].upper()}, score {cell(head.get('score')).text}. {head.get('gate_reason') or ''}",
                               "warning" if head["verdict"] != "pass" else "info"))
    metrics = [r for r in latest if r.get("metric")]
    if metrics:
        colours = [{"pass": "#3a7d44", "fail": "#b3261e"}.get(_classification_kind(r["classification"]), "#a15c00")
                   for r in metrics]
        section.blocks.append(Chart(charts.intervals_svg(
            [r["metric"] for r in metrics], [r.get("effect_pct") for r in metrics],
            [r.get("effect_low_pct") for r in metrics], [r.get("effect_high_pct") for r in metrics],
            [r.get("threshold_pct") for r in metrics], colours,
            "per-metric effect with its interval against the threshold")))
        section.blocks.append(table_from_rows(
            metrics, ["metric", "classification", "critical", "effect_pct", "effect_low_pct", "effect_high_pct",
                      "threshold_pct", "p_value", "baseline_count", "candidate_count", "samples_needed", "reason"],
            "gate", "metric", ("effect_pct", "threshold_pct", "baseline_count", "candidate_count")))
    if len(decisions) > 1:
        history = [{"decision_id": d, "decided_at": r[0]["decided_at"], "context": r[0]["context"],
                    "verdict": r[0]["verdict"], "score": r[0]["score"], "reason": r[0]["gate_reason"]}
                   for d, r in decisions.items()]
        section.blocks.append(table_from_rows(history, ["decided_at", "context", "verdict", "score", "reason"],
                                              caption="every decision, newest first"))
    return section


def _classification_kind(classification: str) -> str:
    text = (classification or "").lower()
    if "fail" in text or "regress" in text or "worse" in text:
        return "fail"
    if "pass" in text or "improv" in text or "equivalent" in text or "better" in text:
        return "pass"
    return "other"


def rollout_section(source: ReportSource) -> Section | None:
    rollout = source.manifest.get("rollout")
    stages = source.table("rollout_stages")
    if not rollout and stages is None:
        return None
    rollout = rollout or {}
    section = Section("rollout", f"Rollout {rollout.get('name', '')}".strip(),
                      summary=f"{rollout.get('status', '')}: {rollout.get('reason', '')}")
    section.blocks.append(Note(f"Status {rollout.get('status', '?')}: {rollout.get('reason', '')}",
                               "info" if rollout.get("status") == "promoted" else "warning"))
    for result in rollout.get("after_promotion", []):
        # Chaos experiments run after the promotion: a refuted one is said here, next to the status.
        held = result.get("verdict") == "held"
        section.blocks.append(Note(f"After promotion, chaos experiment {result.get('experiment')}: "
                                   f"{result.get('verdict')}" + ("" if held else f" — {result.get('reason', '')} "
                                   "(the promotion stands)"), "info" if held else "warning"))
    if stages is not None and stages.num_rows:
        rows = stages.to_pylist()
        for row in rows:
            row["stage"] = row["stage"] + 1
        section.blocks.append(table_from_rows(rows, stages.column_names, limit=200,
                                              caption="per stage and version: samples, latency, errors"))
    turns = source.table("turns")
    if turns is not None and turns.num_rows and "version" in turns.column_names:
        section.blocks.extend(_rollout_charts(source, turns, rollout))
    return section


def _rollout_charts(source: ReportSource, turns: pa.Table, rollout: dict) -> list[Chart]:
    stamps = pc.cast(turns["ts"], pa.int64()).to_numpy(zero_copy_only=False)
    unit = 1e9 if turns.schema.field("ts").type.unit == "ns" else 1e6
    start = stamps.min()
    seconds = (stamps - start) / unit
    latency_ms = turns["latency_ns"].to_numpy(zero_copy_only=False) / 1e6
    versions = turns["version"].to_numpy(zero_copy_only=False)
    stage_values = turns["stage"].to_numpy(zero_copy_only=False) if "stage" in turns.column_names else None
    series_p50, series_p99 = {}, {}
    for version in sorted(set(versions.tolist())):
        mask = versions == version
        buckets = np.floor(seconds[mask]).astype(np.int64)
        values = latency_ms[mask]
        xs, p50, p99 = [], [], []
        order = np.argsort(buckets, kind="stable")
        buckets, values = buckets[order], values[order]
        edges = np.flatnonzero(np.diff(buckets)) + 1
        for bucket_values, second in zip(np.split(values, edges), buckets[np.r_[0, edges]]):
            xs.append(float(second))
            p50.append(float(np.quantile(bucket_values, 0.5)))
            p99.append(float(np.quantile(bucket_values, 0.99, method="higher")))
        series_p50[f"{version} p50"] = (xs, p50)
        series_p99[f"{version} p99"] = (xs, p99)
    markers = []
    verdicts = source.table("rollout_verdicts")
    if verdicts is not None and verdicts.num_rows:
        first = verdicts.group_by(["decision_id", "verdict"], use_threads=False).aggregate([("decided_at", "min")])
        for row in first.to_pylist():
            markers.append((row["decided_at_min"].timestamp() - start / unit, row["verdict"]))
    charts_out = [Chart(charts.lines_svg({**series_p50, **series_p99}, "KPI latency per second by version "
                                         "(dashed: gate decisions)", "seconds", "ms", markers=markers, log_y=True))]
    if stage_values is not None:
        weights = {s.get("weight_pct") for s in rollout.get("stages", [])}
        stage_weights = [s.get("weight_pct") for s in rollout.get("stages", [])]
        xs, ys = [], []
        for stage in sorted(set(stage_values.tolist())):
            if stage < 0:
                continue
            xs.append(float(seconds[stage_values == stage].min()))
            ys.append(float(stage_weights[stage]) if stage < len(stage_weights) else float("nan"))
        if xs and weights:
            xs.append(float(seconds.max()))
            ys.append(ys[-1])
            charts_out.append(Chart(charts.lines_svg({"green weight": (xs, ys)}, "traffic weight on green per stage",
                                                     "seconds", "% of traffic", markers=markers, step=True)))
    return charts_out


# ---------------------------------------------------------------------------------------------
# anything else


KNOWN_TABLES = {"findings", "host", "interrupts", "syscalls", "syscall_buckets", "tcp", "flows", "turns", "stacks",
                "kernel", "jitter", "pg_queries", "pg_query_minutes", "postgres", "pg_index_advice",
                "rollout_verdicts", "rollout_stages", "gate_decisions"}


def generic_sections(source: ReportSource) -> list[Section]:
    sections = []
    for name in source.table_names():
        if name in KNOWN_TABLES:
            continue
        table = source.table(name)
        section = Section(f"table-{name}", f"Table {name}", summary=f"{table.num_rows:,} rows")
        if table.num_rows == 0:
            section.blocks.append(Note(f"{name} is empty."))
            section.blocks.append(Table(["column", "type"], [[cell(f.name), cell(str(f.type))] for f in table.schema],
                                        sortable=False))
        else:
            numeric = [f.name for f in table.schema if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)]
            if numeric and table.num_rows > 1:
                section.blocks.append(_numeric_summary(table, numeric))
            if table.num_rows > 50:
                section.blocks.append(Note(f"{name} has {table.num_rows:,} rows: its numeric columns are "
                                           "summarised above and its first 50 rows listed.", "aggregated"))
            # Keyed by row number ("<table>:<row>:<column>"), so a script or a test can read any cell.
            rows = [dict(row, _row=index) for index, row in enumerate(table.slice(0, 50).to_pylist())]
            section.blocks.append(table_from_rows(rows, table.column_names, name, "_row", tuple(table.column_names),
                                                  total_rows=table.num_rows))
        sections.append(section)
    return sections


def _numeric_summary(table: pa.Table, columns: list[str]) -> Table:
    rows = []
    for name in columns[:30]:
        values = table[name].to_numpy(zero_copy_only=False).astype(float)
        values = values[~np.isnan(values)]
        if values.size == 0:
            rows.append({"column": name})
            continue
        q = np.quantile(values, [0.5, 0.99])
        rows.append({"column": name, "min": float(values.min()), "p50": float(q[0]), "p99": float(q[1]),
                     "max": float(values.max()), "mean": float(values.mean())})
    return table_from_rows(rows, ["column", "min", "p50", "p99", "max", "mean"], caption="numeric columns")


SECTIONS: tuple[Callable[[ReportSource], Section | None], ...] = (
    findings_section, probes_section, rollout_section, gate_section, kernel_section, host_section,
    interrupts_section, syscalls_section, tcp_section, flows_section, stacks_section, postgres_section,
    jitter_section,
)


def build_sections(source: ReportSource) -> list[Section]:
    sections = [section for build in SECTIONS if (section := build(source)) is not None]
    return sections + generic_sections(source)
