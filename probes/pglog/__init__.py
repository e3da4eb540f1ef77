"""PostgreSQL log analysis: stderr/csvlog/jsonlog (plain, gzip, zstd, bz2) -> per-fingerprint latency.

`analyse_logs(paths, ...)` streams each file in blocks, splits entries without a Python loop per
line (numpy + Arrow compute: probes/pglog/fastpath.py for stderr prefixes starting with a time,
RE2 captures otherwise and for csv/json), fingerprints statements with libpg_query through a
cache (probes/pglog/fingerprint.py), and aggregates into `pg_queries`, `pg_query_minutes` and
`pg_log_errors` (probes/pglog/aggregate.py).
"""

from __future__ import annotations

import json
import re
import time
from datetime import datetime, timezone
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.errors import BadInput
from probes.pglog.aggregate import (COUNTED_KINDS, DEFAULT_MAX_FINGERPRINTS, DEFAULT_MAX_MINUTE_CELLS,
                                   PG_LOG_ERRORS_SCHEMA, PG_QUERIES_SCHEMA, PG_QUERY_MINUTES_SCHEMA,
                                   SOURCE_PLAN, SOURCE_STATEMENT, DurationAggregator, MinuteResolver)
from probes.pglog.fastpath import (DIGITS_TO_ZERO, KIND_EXECUTE, KIND_PLAN, KIND_STATEMENT, FastPath,
                                   fast_path_layout, minute_keys, string_views)
from probes.pglog.fingerprint import FingerprintCache
from probes.pglog.pairing import DurationPairer
from probes.pglog.readers import (BLOCK_BYTES, TIMED_PREFIX, ParseProblems, SyslogAsStderr, SyslogTimes,
                                  compression_of, csv_entry_batches, detect_format, json_entry_batches,
                                  open_stream, read_head, resolve_prefix, server_prefix_has_time,
                                  stderr_block_entries, stderr_blocks, stderr_line_pattern, syslog_to_stderr)

FORMATS = ("auto", "stderr", "syslog", "csv", "json")

__all__ = ["analyse_logs", "capacity_findings", "LogAnalysis", "FORMATS", "PG_QUERIES_SCHEMA", "PG_QUERY_MINUTES_SCHEMA",
           "PG_LOG_ERRORS_SCHEMA", "plan_query_text"]


@dataclass
class FileSummary:
    path: str
    format: str
    compression: str | None
    prefix: str | None
    prefix_match_fraction: float | None
    bytes_read: int
    entries: int
    problems: ParseProblems
    note: str = ""


@dataclass
class LogAnalysis:
    queries: pa.Table
    minutes: pa.Table
    errors: pa.Table
    files: list[FileSummary] = field(default_factory=list)
    durations_counted: int = 0
    bind_parse_phases: int = 0
    paired_durations: int = 0
    parser_calls: int = 0
    unknown_zones: list[str] = field(default_factory=list)
    seconds: float = 0.0
    max_fingerprints: int = DEFAULT_MAX_FINGERPRINTS
    folded_shapes: int = 0
    folded_executions: int = 0
    minute_bucket_s: int = 60

    def summary(self) -> dict:
        return {
            "files": [{"path": f.path, "format": f.format, "compression": f.compression,
                       "prefix": f.prefix, "prefix_match_pct": None if f.prefix_match_fraction is None
                       else round(100 * f.prefix_match_fraction, 1), "bytes": f.bytes_read,
                       "entries": f.entries, **({"note": f.note} if f.note else {})} for f in self.files],
            "durations_counted": self.durations_counted,
            "bind_parse_phases_skipped": self.bind_parse_phases,
            "durations_paired_with_statement_lines": self.paired_durations,
            "fingerprints": self.queries.num_rows,
            "parser_calls": self.parser_calls,
            "unknown_zones_assumed_utc": self.unknown_zones,
            "max_fingerprints": self.max_fingerprints,
            "folded_shapes": self.folded_shapes,
            "folded_executions": self.folded_executions,
            "minute_bucket_s": self.minute_bucket_s,
            "seconds": round(self.seconds, 3),
        }


_QUERY_TEXT = re.compile(r"Query Text: (.*?)(?:\n\t?(?=[A-Z][A-Za-z ]+(?: on |  \(|\s*\(cost=))|\Z)", re.S)


def plan_query_text(plan: str) -> str | None:
    """The statement inside an auto_explain plan message (text or JSON format)."""
    stripped = plan.strip()
    if stripped.startswith("{"):
        try:
            return json.loads(stripped).get("Query Text")
        except ValueError:
            match = re.search(r'"Query Text": "((?:[^"\\]|\\.)*)"', stripped)
            return json.loads(f'"{match.group(1)}"') if match else None
    match = _QUERY_TEXT.search(plan)
    if not match:
        return None
    lines = match.group(1).replace("\n\t", "\n").split("\n")
    # Plan lines follow the query text; the first line with a node and a cost ends it.
    kept = []
    for line in lines:
        if re.search(r"\(cost=\d|\(actual time=", line):
            break
        kept.append(line)
    return "\n".join(kept).strip() or None


class _Analyser:
    def __init__(self, keep_literals: bool, progress: Callable[[int, int], None] | None,
                 max_fingerprints: int = DEFAULT_MAX_FINGERPRINTS,
                 max_minute_cells: int = DEFAULT_MAX_MINUTE_CELLS):
        self.cache = FingerprintCache(keep_literals=keep_literals)
        self.aggregator = DurationAggregator(max_fingerprints, max_minute_cells)
        self.minutes = MinuteResolver()
        self.keep_literals = keep_literals
        self.progress = progress
        self.bind_parse_phases = 0
        self.paired_durations = 0

    def consume(self, entries: pa.Table, problems: ParseProblems, pairer: DurationPairer | None = None) -> None:
        if entries.num_rows == 0:
            return
        if pairer is not None:
            entries = pairer.pair(entries)
        has_duration = pc.not_equal(entries.column("ms"), "")
        kind = entries.column("kind")
        counted = pc.and_(has_duration, pc.is_in(kind, pa.array(COUNTED_KINDS)))
        plans = pc.and_(has_duration, pc.equal(kind, "plan"))
        unattributed = pc.and_(has_duration, pc.equal(kind, ""))
        self.bind_parse_phases += pc.sum(pc.and_(has_duration, pc.is_in(kind, pa.array(["bind", "parse", "fastpath function call"])))).as_py() or 0
        lost = pc.sum(unattributed).as_py() or 0
        if lost:
            rows = entries.filter(unattributed).slice(0, 3)
            problems.add("duration_without_statement", lost,
                         list(zip(rows.column("line").to_pylist(), ["duration: … ms (log_duration=on; "
                              "enable log_min_duration_statement to attribute it)"] * rows.num_rows)))
        self._add(entries.filter(counted), SOURCE_STATEMENT, problems)
        if pc.any(plans).as_py():
            self.consume_plans(entries.filter(plans), problems)

    def consume_fast(self, columns: dict, problems: ParseProblems, zone_offset: int) -> None:
        self.bind_parse_phases += columns["phases"]
        bare = columns["bare_lines"]
        if len(bare):
            problems.add("duration_without_statement", len(bare),
                         [(int(line), "duration: … ms (log_duration=on; enable log_min_duration_statement "
                                      "to attribute it)") for line in bare[:3]])
        malformed = columns["malformed_lines"]
        if len(malformed):
            problems.add("duration_malformed", len(malformed),
                         [(int(line), "duration entry in an unexpected shape") for line in malformed[:3]])
        kind = columns["kind"]
        if len(kind) == 0:
            return
        data_view = columns["data_view"]
        minute_index, minute_texts = minute_keys(data_view, columns["entry_start"], zone_offset)
        epoch_by_key = np.array([self.minutes.epoch_minute(text) for text in minute_texts], dtype=np.int64)
        epoch_minutes = epoch_by_key[minute_index]
        counted = np.flatnonzero((kind == KIND_STATEMENT) | (kind == KIND_EXECUTE))
        if len(counted):
            starts, lengths = columns["text_start"][counted], columns["text_length"][counted]
            texts = string_views(columns["buffer"], data_view, starts, lengths)
            mapped = columns["padded"].translate(DIGITS_TO_ZERO)
            keys = string_views(pa.py_buffer(mapped), np.frombuffer(mapped, np.uint8), starts, lengths)
            fingerprint_ids = self.cache.ids(texts, digit_keys=keys)
            self.aggregator.add(fingerprint_ids, pa.array(np.full(len(counted), SOURCE_STATEMENT, np.int8)),
                                pa.array(epoch_minutes[counted]), pa.array(columns["us"][counted]))
        plans = np.flatnonzero(kind == KIND_PLAN)
        if len(plans):
            texts = string_views(columns["buffer"], data_view, columns["text_start"][plans],
                                 columns["text_length"][plans]).to_pylist()
            rows = pa.table({"text": texts, "ms": [f"{us / 1000:.3f}" for us in columns["us"][plans]],
                             "kind": ["plan"] * len(plans), "line": columns["line"][plans],
                             "epoch_minute": epoch_minutes[plans]})
            self.consume_plans(rows, problems)

    def consume_plans(self, plan_rows: pa.Table, problems: ParseProblems) -> None:
        texts = [plan_query_text(text) for text in plan_rows.column("text").to_pylist()]
        found = pa.array([text is not None for text in texts])
        missing = len(texts) - sum(found.to_pylist())
        if missing:
            problems.add("plan_without_query_text", missing,
                         [(line, "auto_explain plan without Query Text") for line in
                          plan_rows.filter(pc.invert(found)).column("line").to_pylist()[:3]])
        plan_rows = plan_rows.filter(found).set_column(
            plan_rows.schema.get_field_index("text"), "text",
            pa.array([t for t in texts if t is not None], pa.string()))
        self._add(plan_rows, SOURCE_PLAN, problems)

    def _add(self, rows: pa.Table, source: int, problems: ParseProblems) -> None:
        if rows.num_rows == 0:
            return
        fingerprint_ids = self.cache.ids(rows.column("text").combine_chunks())
        milliseconds = pc.cast(rows.column("ms"), pa.float64())
        durations_us = pc.cast(pc.round(pc.multiply(milliseconds, 1000.0)), pa.int64()).combine_chunks()
        minutes = rows.column("epoch_minute") if "epoch_minute" in rows.column_names \
            else self.minutes.epoch_minutes(rows)
        if isinstance(minutes, pa.ChunkedArray):
            minutes = minutes.combine_chunks()
        sources = pa.array(np.full(rows.num_rows, source, dtype=np.int8))
        self.aggregator.add(fingerprint_ids, sources, minutes, durations_us)


def _read_file(analyser: _Analyser, path: Path, log_format: str, prefix: str | None,
               problems: ParseProblems, announce: Callable[[str], None],
               block_bytes: int = BLOCK_BYTES, fast: bool = True) -> FileSummary:

    if not path.exists():
        raise BadInput(f"{path}: no such file")
    if not path.is_file():
        raise BadInput(f"{path}: not a regular file")
    head = read_head(path)
    chosen = detect_format(path, head) if log_format == "auto" else log_format
    compression = compression_of(path)
    used_prefix, fraction = None, None
    stream, raw = open_stream(path)
    entries_seen = 0
    note = ""
    pairer = DurationPairer()
    try:
        if chosen == "syslog":
            # The server's own lines are inside the syslog ones: read them as a stderr log.
            whole_lines = head[:head.rfind(b"\n") + 1]
            if server_prefix_has_time(whole_lines):
                head = syslog_to_stderr(whole_lines)
                stream = SyslogAsStderr(stream)
            else:
                # The usual syslog setup (and Heroku's): no time in log_line_prefix, so each
                # message takes the syslog header's time and pid, as if logged with '%m [%p] '.
                modified = datetime.fromtimestamp(path.stat().st_mtime, timezone.utc)
                times = SyslogTimes(modified.year, modified.month)
                head = times.convert(whole_lines)
                stream = SyslogAsStderr(stream, times.convert)
                if prefix is not None and not re.search(r"%[mtn]", prefix.replace("%%", "")):
                    prefix = TIMED_PREFIX + prefix
                note = "the server's log_line_prefix has no time: each message takes its syslog time and pid"
                note += f" ({times.note})" if times.note else ""
                announce(f"{path}: {note}")
        if chosen in ("stderr", "syslog"):
            used_prefix, fraction = resolve_prefix(head, prefix, path)
            if prefix is None:
                announce(f"{path}: detected log_line_prefix {used_prefix!r} "
                         f"({fraction:.0%} of the first lines match)")
            pattern = stderr_line_pattern(used_prefix)
            layout = fast_path_layout(used_prefix) if fast else None
            fast_path = FastPath(used_prefix, layout) if layout else None
            line_base = 0
            for block in stderr_blocks(stream, block_bytes):
                entries, lines = stderr_block_entries(block, pattern, line_base, problems, fast_path)
                line_base += lines
                if isinstance(entries, dict):
                    entries_seen += entries["entries"]
                    analyser.consume_fast(entries, problems, layout["zone_offset"])
                else:
                    entries_seen += entries.num_rows
                    analyser.consume(entries, problems, pairer)
                if analyser.progress:
                    analyser.progress(raw.position(), raw.size)
        else:
            batches = csv_entry_batches(stream, head, problems, block_bytes) if chosen == "csv" else \
                json_entry_batches(stream, problems, block_bytes)
            for entries in batches:
                entries_seen += entries.num_rows
                analyser.consume(entries, problems, pairer)
                if analyser.progress:
                    analyser.progress(raw.position(), raw.size)
    except BadInput as error:
        if str(path) in str(error):
            raise
        raise BadInput(f"{path}: {error}") from None
    except (pa.ArrowInvalid, OSError, EOFError) as error:
        raise BadInput(f"{path}: cannot read as {chosen}{' (' + compression + ')' if compression else ''}: "
                       f"{str(error).splitlines()[0][:200]}") from None
    finally:
        raw.raw.close()
    analyser.paired_durations += pairer.paired
    return FileSummary(str(path), chosen, compression, used_prefix, fraction, raw.size, entries_seen, problems,
                       note)


def capacity_findings(analysis: "LogAnalysis") -> list[dict]:
    """What the caps folded away (degrade gracefully, and say so)."""
    from probes.base import finding

    rows = []
    if analysis.folded_shapes:
        rows.append(finding(
            "pg-log", "warning", "fingerprints folded",
            f"{analysis.folded_executions:,} executions of {analysis.folded_shapes:,} statement shapes were "
            f"folded into the 'other' row: the log holds more than {analysis.max_fingerprints:,} distinct "
            "fingerprints, and the rarest (fewest calls when the cap was reached) are kept only in total",
            "raise --max-fingerprints (each busy fingerprint costs a fixed ~12 kB histogram row), or look for "
            "statements built with inlined values that libpg_query cannot normalise (e.g. generated "
            "identifiers)"))
    if analysis.minute_bucket_s > 60:
        rows.append(finding(
            "pg-log", "info", "per-minute series widened",
            f"pg_query_minutes holds {analysis.minute_bucket_s // 60}-minute buckets (bucket_s = "
            f"{analysis.minute_bucket_s}) instead of one per minute: fingerprints x minutes exceeded the "
            "series' cap; pg_queries is unaffected",
            "read fewer days at once, or raise the cap with --max-minute-cells"))
    return rows


def analyse_logs(paths: list[Path], log_format: str = "auto", prefix: str | None = None,
                 keep_literals: bool = False, progress: Callable[[int, int], None] | None = None,
                 announce: Callable[[str], None] = lambda message: None,
                 block_bytes: int = BLOCK_BYTES, fast: bool = True,
                 max_fingerprints: int = DEFAULT_MAX_FINGERPRINTS,
                 max_minute_cells: int = DEFAULT_MAX_MINUTE_CELLS) -> LogAnalysis:
    if log_format not in FORMATS:
        raise BadInput(f"--format must be one of {', '.join(FORMATS)}")
    if max_fingerprints < 1:
        raise BadInput(f"--max-fingerprints must be at least 1, not {max_fingerprints}")
    started = time.monotonic()
    analyser = _Analyser(keep_literals, progress, max_fingerprints, max_minute_cells)
    files = []
    for path in paths:
        problems = ParseProblems(keep_literals=keep_literals)
        files.append(_read_file(analyser, Path(path), log_format, prefix, problems, announce, block_bytes, fast))
    queries, minutes = analyser.aggregator.finish(analyser.cache)
    unparsed = queries.filter(pc.invert(queries.column("parsed")))
    error_rows = []
    for summary in files:
        for category, count in summary.problems.counts.items():
            examples = summary.problems.examples.get(category, [])
            error_rows.append({"category": category, "count": count, "file": summary.path,
                               "first_line": examples[0][0] if examples else None,
                               "examples": [f"{line}: {text}" for line, text in examples]})
    if unparsed.num_rows:
        error_rows.append({
            "category": "statement_not_parsed_by_libpg_query",
            "count": int(pc.sum(unparsed.column("calls")).as_py()), "file": None, "first_line": None,
            "examples": unparsed.column("query").to_pylist()[:5]})
    errors = pa.Table.from_pylist(error_rows, schema=PG_LOG_ERRORS_SCHEMA)
    return LogAnalysis(
        queries=queries, minutes=minutes, errors=errors, files=files,
        durations_counted=int(pc.sum(queries.column("calls")).as_py() or 0),
        bind_parse_phases=analyser.bind_parse_phases, paired_durations=analyser.paired_durations,
        parser_calls=analyser.cache.parser_calls,
        unknown_zones=sorted(analyser.minutes.unknown_zones), seconds=time.monotonic() - started,
        max_fingerprints=max_fingerprints, folded_shapes=analyser.aggregator.folded_shapes,
        folded_executions=int(analyser.aggregator.calls[0]),
        minute_bucket_s=analyser.aggregator.minute_width * 60)
