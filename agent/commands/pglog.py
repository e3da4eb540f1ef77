"""`guardian-agent pg-log FILE... --out DIR`: PostgreSQL slow-query logs -> a report bundle."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click

from agent.commands.report import NO_HTML_OPTION, emit_html_report
from core.errors import BadInput


@click.command(name="pg-log")
@click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="Bundle directory (created; refused if not empty).")
@click.option("--format", "log_format", type=click.Choice(["auto", "stderr", "syslog", "csv", "json"]),
              default="auto", show_default=True, help="Log format (auto: from name and content).")
@click.option("--prefix", help="The server's log_line_prefix (stderr and syslog logs; default: detected and printed).")
@click.option("--keep-literals", is_flag=True,
              help="Keep one example statement with its literals per fingerprint (sensitive!).")
@click.option("--top", "top_count", type=int, default=10, show_default=True,
              help="Fingerprints printed in the summary.")
@click.option("--max-fingerprints", type=int,
              help="Distinct fingerprints kept (default 100,000); beyond it the rarest fold into an "
                   "'other' row, and a finding says how many.")
@click.option("--max-minute-cells", type=int,
              help="Fingerprint x minute cells of pg_query_minutes (default 400,000); beyond it the "
                   "series' buckets widen (2, 5, 10, 15, 30, 60 ... minutes).")
@NO_HTML_OPTION
@click.pass_obj
def pg_log(obj, files, out_dir, log_format, prefix, keep_literals, top_count, max_fingerprints=None,
           max_minute_cells=None, no_html=False) -> int:
    """Slow-query log analysis: per-fingerprint calls, total and p50/p99/p99.9/max at microsecond
    resolution from stderr (any log_line_prefix), syslog, csvlog or jsonlog files, plain, gzip,
    bz2 or zstd; FILE `-` reads standard input.

    \b
    Writes pg_queries, pg_query_minutes, pg_log_errors (and findings when a cap was reached).
    Lines that could not be used are counted in pg_log_errors (never silently dropped); literals
    never reach the bundle unless --keep-literals. Memory stays flat in the log's size: state is
    kept per fingerprint only. Exit 0 done, 1 failed, 2 bad input.
    """
    from reports.bundle import validate_out_dir

    if top_count < 0:
        raise BadInput(f"--top must be >= 0, not {top_count}")
    caps = {name: value for name, value in (("max_fingerprints", max_fingerprints),
                                             ("max_minute_cells", max_minute_cells)) if value is not None}
    for name, value in caps.items():
        if value < 1:
            raise BadInput(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    if sum(str(path) == "-" for path in files) > 1:
        raise BadInput("- (standard input) can be given once")
    check_files([path for path in files if str(path) != "-"])
    if prefix is not None and log_format not in ("auto", "stderr", "syslog"):
        raise BadInput("--prefix only applies to stderr and syslog logs")
    validate_out_dir(out_dir)
    with tempfile.TemporaryDirectory(prefix="guardian-pglog-stdin-") as spool_dir:
        files = [spool_stdin(Path(spool_dir)) if str(path) == "-" else path for path in files]
        return _pg_log(obj, files, out_dir, log_format, prefix, keep_literals, top_count, no_html,
                       caps)


def check_files(files) -> None:
    from agent.input_files import check_input_file

    for path in files:
        check_input_file(path, not_regular_hint="pipe it into `pg-log -` instead")


def spool_stdin(spool_dir: Path) -> Path:
    """The log is read twice (format and prefix detection on its head, then the stream), so
    standard input is copied to a temporary file first, in 1 MiB pieces (memory stays flat)."""
    import shutil
    import sys

    if sys.stdin is None or sys.stdin.isatty():
        raise BadInput("-: standard input is a terminal; pipe a log into it (e.g. zcat log.gz | ... pg-log -)")
    path = spool_dir / "stdin"
    with open(path, "wb") as spool:
        shutil.copyfileobj(sys.stdin.buffer, spool, 1 << 20)
    return path


MINUTE_ROWS_PER_GROUP = 65_536


def write_in_row_groups(writer, name: str, table) -> int:
    """The per-minute series in row groups of 65,536 rows: Parquet's writer then encodes one
    group at a time instead of the whole table (400,000 cells at the cap: ~35 MB less at peak)."""
    with writer.table_stream(name, table.schema, "pg-log") as stream:
        for offset in range(0, table.num_rows, MINUTE_ROWS_PER_GROUP):
            stream.write(table.slice(offset, MINUTE_ROWS_PER_GROUP))
    return table.num_rows


def _pg_log(obj, files, out_dir, log_format, prefix, keep_literals, top_count, no_html: bool, caps: dict) -> int:
    from core.host import Host
    from probes.base import findings_table
    from probes.pglog import analyse_logs, capacity_findings
    from reports.bundle import BundleWriter

    refuse_foreign_language(files)
    # The byte-progress line the pcap command draws (one stderr line, terminal only).
    from agent.progress import terminal_progress

    verbose = obj.verbose
    started = time.monotonic()
    analysis = analyse_logs(list(files), log_format=log_format, prefix=prefix,
                            keep_literals=keep_literals, progress=terminal_progress("pg-log"),
                            announce=lambda message: click.echo(message, err=True), **caps)
    seconds = time.monotonic() - started
    writer = BundleWriter(out_dir, host=Host.real())
    counts = {
        "pg_queries": writer.write_table("pg_queries", analysis.queries, "pg-log"),
        "pg_query_minutes": write_in_row_groups(writer, "pg_query_minutes", analysis.minutes),
        "pg_log_errors": writer.write_table("pg_log_errors", analysis.errors, "pg-log"),
    }
    findings = capacity_findings(analysis)
    if findings:
        counts["findings"] = writer.write_table("findings", findings_table(findings), "pg-log")
    from reports.bundle import ProbeRecord

    writer.add_probe(ProbeRecord("pg-log", "ok", "", counts, seconds))
    writer.finish(extra={"source": "pg-log", "pg_log": analysis.summary()})

    total_bytes = sum(f.bytes_read for f in analysis.files)
    click.echo(f"pg-log: {len(analysis.files)} file(s), {total_bytes / 1e6:,.1f} MB in {seconds:.2f} s "
               f"({total_bytes / 1e6 / max(seconds, 1e-6):,.0f} MB/s); {analysis.durations_counted:,} "
               f"executions, {analysis.queries.num_rows} fingerprints")
    for summary in analysis.files:
        if summary.prefix is not None:
            click.echo(f"  {summary.path}: {summary.format}, log_line_prefix {summary.prefix!r}")
    rows = analysis.queries.slice(0, top_count).to_pylist()
    if rows:
        click.echo(f"  {'total_ms':>11} {'calls':>9} {'p50_ms':>9} {'p99_ms':>9} {'p99.9_ms':>9} {'max_ms':>9}  query")
    for row in rows:
        query = row["query"] if len(row["query"]) <= 70 else row["query"][:69] + "…"
        click.echo(f"  {row['total_ms']:>11,.1f} {row['calls']:>9,} {row['p50_ms']:>9.3f} {row['p99_ms']:>9.3f} "
                   f"{row['p999_ms']:>9.3f} {row['max_ms']:>9.3f}  {query}")
    problems = analysis.errors.to_pylist()
    for problem in problems:
        click.echo(f"  not used: {problem['count']:,} × {problem['category']}"
                   + (f" (first at line {problem['first_line']})" if problem["first_line"] else ""), err=True)
        if verbose:
            for example in problem["examples"]:
                click.echo(f"      {example}", err=True)
    if analysis.unknown_zones:
        click.echo(f"  time zone(s) {', '.join(analysis.unknown_zones)} not in the tz database or ambiguous: "
                   "their times are taken as UTC (said in the manifest as unknown_zones_assumed_utc); "
                   "set log_timezone = 'UTC' or use %z offsets", err=True)
    for row in findings:
        click.echo(f"  {row['severity']}: {row['message']}", err=True)
    if analysis.durations_counted == 0:
        click.echo("  no statement durations found: is log_min_duration_statement set (0 logs every "
                   "statement, N logs those slower than N ms)?", err=True)
    click.echo(f"bundle: {writer.out_dir}")
    emit_html_report(writer.out_dir, no_html)
    return 0


def refuse_foreign_language(files) -> None:
    """Logs whose durations are in another language would parse to nothing: say so up front
    (exit 2, nothing written) instead of reporting zero executions."""
    from probes.pglog.readers import foreign_durations

    for path in files:
        found = foreign_durations(path)
        if found:
            phrase, line = found
            raise BadInput(f"{path}:{line}: durations logged in another language ('{phrase}'); pg-log reads "
                           "English server messages: set lc_messages = 'C' in postgresql.conf and reload")


commands = [pg_log]
