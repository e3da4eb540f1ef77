"""Streaming readers for PostgreSQL logs: stderr (any prefix), csvlog and jsonlog, plain, gzip, bz2 or
zstd. Each yields Arrow record batches of *entries* with the same columns, so one vectorised
aggregation serves every format:

    minute  string   "YYYY-MM-DD HH:MM" in the log's own zone (null for %n prefixes)
    zone    string   the zone as written ("UTC", "+02"...)
    epoch   string   seconds since 1970 (only for %n prefixes)
    ms      string   the logged duration ("" when the entry has none)
    kind    string   statement | execute | bind | parse | plan | "" ...
    text    string   what follows the kind (the statement, or an auto_explain plan)
    line    int64    line (stderr/json) or record (csv) number of the entry, 1-based

The stderr reader never runs Python per line: a block's line starts come from numpy, entries
(a line plus its tab-indented continuation lines) are zero-copy views on the block, and one RE2
pass splits every entry into its fields.
"""

from __future__ import annotations

import csv
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from core.errors import BadInput
from probes.pglog.prefix import (SEVERITY_PATTERN, _match_fraction, detect_prefix, prefix_to_pattern, redact_line,
                                 validate_prefix)

# 8 MB: the same throughput as 32 MB blocks at half the peak memory (measured, see docs).
BLOCK_BYTES = 8 << 20
MAX_EXAMPLES = 5

DURATION_PATTERN = (
    r"(?:duration: (?P<ms>[0-9]+\.[0-9]+) ms"
    r"(?:  (?P<kind>statement|execute|bind|parse|plan|fastpath function call)(?: (?P<name>[^:\n]*))?:)?)?"
    r"(?P<text>(?s:.*))"
)

# csvlog columns by PostgreSQL version (the file has no header; the count tells the version).
CSV_COLUMNS = [
    "log_time", "user_name", "database_name", "process_id", "connection_from", "session_id",
    "session_line_num", "command_tag", "session_start_time", "virtual_transaction_id",
    "transaction_id", "error_severity", "sql_state_code", "message", "detail", "hint",
    "internal_query", "internal_query_pos", "context", "query", "query_pos", "location",
    "application_name", "backend_type", "leader_pid", "query_id",
]
CSV_MIN_COLUMNS = 22


@dataclass
class ParseProblems:
    """Everything that was not turned into a duration, counted, with the first examples."""

    counts: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    keep_literals: bool = False

    def add(self, category: str, count: int, examples: list[tuple[int, str]] = ()) -> None:
        if count <= 0:
            return
        self.counts[category] = self.counts.get(category, 0) + count
        kept = self.examples.setdefault(category, [])
        for line, text in examples:
            if len(kept) >= MAX_EXAMPLES:
                break
            text = text.rstrip("\n")[:300]
            kept.append((line, text if self.keep_literals else redact_line(text)))


# -- opening -------------------------------------------------------------------------------------
def compression_of(path: Path) -> str | None:
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic[:2] == b"\x1f\x8b":
        return "gzip"
    if magic == b"\x28\xb5\x2f\xfd":
        return "zstd"
    if magic[:3] == b"BZh" and magic[3:4].isdigit():
        return "bz2"
    return None


class CountingFile:
    """The raw file under a decompressor, so progress counts compressed bytes read."""

    def __init__(self, path: Path):
        self.raw = pa.OSFile(str(path), "rb")
        self.size = self.raw.size()

    def position(self) -> int:
        return self.raw.tell()


def open_stream(path: Path) -> tuple[pa.NativeFile, CountingFile]:
    raw = CountingFile(path)
    compression = compression_of(path)
    stream = pa.CompressedInputStream(raw.raw, compression) if compression else raw.raw
    return stream, raw


def read_head(path: Path, size: int = 1 << 20) -> bytes:
    stream, raw = open_stream(path)
    try:
        return stream.read(size)
    except Exception as error:
        raise BadInput(f"{path}: cannot read ({error})") from None
    finally:
        raw.raw.close()


# The server prints a duration as "<word>: %.3f ms" in its lc_messages language ("duration",
# "Dauer", "durée", "duración", "時間" ...) at the start of a message: after the severity's
# ":  " (stderr) or a field's opening quote (csvlog, jsonlog). Only English messages are parsed.
_DURATION_IN_ANY_LANGUAGE = re.compile(rb"(?::  |\")([^\s\",:]+) ?: +\d+[.,]\d{3} ms\b")


def foreign_durations(path: Path) -> tuple[str, int] | None:
    """(phrase, line number) of the first duration in the head of PATH when the durations there
    are all in a language other than English; None when there are English ones, or none."""
    head = read_head(path)
    matches = list(_DURATION_IN_ANY_LANGUAGE.finditer(head))
    if not matches or any(match.group(1) == b"duration" for match in matches):
        return None
    first = matches[0]
    return first.group(0).lstrip(b': "').decode(errors="replace"), head.count(b"\n", 0, first.start()) + 1


# -- syslog ----------------------------------------------------------------------------------------
# log_destination = syslog, as rsyslog or syslog-ng write it to a file: each line of a message is
# "Nov 24 10:00:00 host postgres[123]: [7-1] <what stderr would hold>", the message's later
# lines "[7-2]", "[7-3]" ...; the server also cuts lines longer than ~900 bytes into such pieces.
# The tab the server puts after every newline inside a message arrives escaped as "#011".
# The header's time is BSD ("Nov 24 10:00:00", no year, no zone) or RFC 3339 (rsyslog's
# RSYSLOG_FileFormat, Debian 12's default: "2026-11-24T10:00:00.123456+01:00"). Heroku's logplex
# frames the same message as RFC 5424 ("<134>1 2026-...+00:00 host app postgres.1234 - [5-1]
# sql_error_code = 00000 LOG:  ...", optionally octet-counted) or, from `heroku logs`, as
# "2026-...+00:00 app[postgres.1234]: [DATABASE] [5-1] ...".
_BSD_TIME = rb"[A-Z][a-z]{2} [ \d]\d \d\d:\d\d:\d\d"
_ISO_TIME = rb"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?"
# Everything between the time and the sequence number [n-m]: host, tag[pid] or app and procid,
# Heroku's [DATABASE] tag; a '[' in it never starts an [n-m].
_MIDDLE = rb"(?:[^\n\[]|\[(?!\d+-\d+\]))*?"
_SYSLOG_HEADER = (rb"(?:\d+ )?(?:<\d{1,3}>\d{0,2} ?)?(?P<time>" + _BSD_TIME + rb"|" + _ISO_TIME + rb") "
                  + _MIDDLE + rb"\[\d+-")
_SYSLOG_LINE = re.compile(rb"^" + _SYSLOG_HEADER + rb"\d+\] ?", re.M)
# A piece of a cut line: a later piece ([n-2] ...) that does not start a new line of the message.
# (The server always writes "] " before the text: no optional space, or backtracking would let
# the lookahead see " #011" and join real line breaks.)
_SYSLOG_CUT = re.compile(rb"\n" + _SYSLOG_HEADER + rb"(?:[2-9]|\d\d+)\] (?!#011)")
# For servers whose log_line_prefix has no time (the usual syslog setup): the whole header with
# its parts, to put the syslog time and pid in front of the message's first line.
_SYSLOG_PARTS = re.compile(rb"^(?:\d+ )?(?:<\d{1,3}>\d{0,2} ?)?(?:(?P<bsd>" + _BSD_TIME + rb")|(?P<iso>"
                           + _ISO_TIME + rb")) (?P<middle>" + _MIDDLE + rb")\[\d+-(?P<line>\d+)\] ?", re.M)
_PID_IN_MIDDLE = re.compile(rb"[\[.](\d+)\]?(?::| |$)")
_ISO_PARTS = re.compile(rb"(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d)(?:\.(\d+))?(Z|[+-]\d\d:?\d\d)?")
_MONTHS = {name.encode(): number for number, name in enumerate(
    ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"), start=1)}
_SERVER_TIME = re.compile(rb"^(?:\d{4}-\d\d-\d\d \d\d:\d\d:\d\d|\d{9,}\.\d)")
# What a message starts with once its syslog time is put in front (TIMED_PREFIX + the server's).
TIMED_PREFIX = "%m [%p] "


def looks_like_syslog(head: bytes) -> bool:
    lines = [line for line in head.split(b"\n")[:20] if line]
    return bool(lines) and sum(bool(_SYSLOG_LINE.match(line)) for line in lines) * 2 >= len(lines)


def syslog_to_stderr(data: bytes) -> bytes:
    """Complete syslog lines -> the stderr log the server would have written (regexes over the
    whole block: C speed, no Python loop per line)."""
    return _SYSLOG_LINE.sub(b"", _SYSLOG_CUT.sub(b"", data)).replace(b"#011", b"\t")


def server_prefix_has_time(head: bytes) -> bool:
    """Whether the server's own lines inside the syslog ones start with a time (%m, %t, %n)."""
    first_lines = [line for line in syslog_to_stderr(head).split(b"\n")[:200] if line and line[:1] != b"\t"]
    return not first_lines or sum(bool(_SERVER_TIME.match(line)) for line in first_lines) * 2 >= len(first_lines)


class SyslogTimes:
    """Puts each message's syslog time and pid in front of its first line, as '%m [%p] ' would:
    for servers logging to syslog without a time in log_line_prefix. BSD times have no year and
    no zone: the year is the file's (from its modification time, a December line in a January
    file is the year before) and the zone UTC, which `note` says."""

    def __init__(self, year: int, month: int):
        self.year, self.month = year, month
        self.bsd_seen = False

    @property
    def note(self) -> str:
        return (f"BSD syslog times carry no year or zone: taken as {self.year} (the file's date) in UTC"
                if self.bsd_seen else "")

    def _replace(self, match: re.Match) -> bytes:
        if match.group("line") != b"1":
            return b""
        pid_match = None
        for pid_match in _PID_IN_MIDDLE.finditer(match.group("middle")):
            pass
        pid = pid_match.group(1) if pid_match else b"0"
        if match.group("bsd"):
            self.bsd_seen = True
            stamp = match.group("bsd")
            month = _MONTHS.get(stamp[:3], 1)
            year = self.year - 1 if month > self.month else self.year
            day = int(stamp[4:6])
            return b"%d-%02d-%02d %s.000 UTC [%s] " % (year, month, day, stamp[7:15], pid)
        date, clock, fraction, zone = _ISO_PARTS.match(match.group("iso")).groups()
        zone = b"UTC" if zone in (None, b"Z") else zone.replace(b":", b"")
        return b"%s %s.%s %s [%s] " % (date, clock, (fraction or b"000")[:3].ljust(3, b"0"), zone, pid)

    def convert(self, data: bytes) -> bytes:
        return _SYSLOG_PARTS.sub(self._replace, _SYSLOG_CUT.sub(b"", data)).replace(b"#011", b"\t")


class SyslogAsStderr:
    """A read()-able view of a syslog stream as stderr text, converted a complete line at a time
    (so stderr_blocks can cut it at entry boundaries as usual)."""

    def __init__(self, stream, convert=syslog_to_stderr) -> None:
        self.stream = stream
        self.carry = b""
        self.convert = convert

    def read(self, size: int) -> bytes:
        while True:
            chunk = self.stream.read(size)
            if not chunk:
                rest, self.carry = self.carry, b""
                return self.convert(rest)
            data = self.carry + chunk
            # Keep back the last complete line, and the line its pieces hang from if it is a
            # piece: pieces of it may start the next chunk.
            position = data.rfind(b"\n", 0, max(data.rfind(b"\n"), 0))
            while position >= 0 and _SYSLOG_CUT.match(data, position):
                position = data.rfind(b"\n", 0, position)
            cut = position + 1
            self.carry = data[cut:]
            converted = self.convert(data[:cut])
            if converted:
                return converted


def detect_format(path: Path, head: bytes) -> str:
    name = path.name.lower()
    for suffix in (".gz", ".zst", ".zstd", ".bz2"):
        name = name.removesuffix(suffix)
    if name.endswith(".json"):
        return "json"
    if name.endswith(".csv"):
        return "csv"
    first = head.lstrip()[:1]
    if first == b"{":
        return "json"
    first_line = head.split(b"\n", 1)[0]
    # csvlog's first field is the time; some shippers (and spreadsheets) quote every field.
    if first_line.lstrip(b'"')[:4].isdigit() and first_line.count(b",") >= CSV_MIN_COLUMNS - 1:
        return "csv"
    if looks_like_syslog(head):
        return "syslog"
    return "stderr"


# -- stderr --------------------------------------------------------------------------------------
def _entry_boundary(buffer: bytes) -> int:
    """Length of the longest prefix of `buffer` that ends at an entry boundary (a newline
    followed by the start of a new entry, not by a tab-indented continuation line or a blank
    line), or 0 when there is none yet."""
    position = len(buffer)
    while True:
        position = buffer.rfind(b"\n", 0, position)
        if position < 0:
            return 0
        following = buffer[position + 1: position + 2]
        if following and following not in (b"\t", b"\n"):
            return position + 1


def stderr_blocks(stream, block_bytes: int = BLOCK_BYTES) -> Iterator[bytes]:
    carry = b""
    upcoming = stream.read(block_bytes)
    while upcoming:
        chunk = upcoming
        # Reading one block ahead tells whether this is the last one, whose last entry is
        # complete however it ends.
        upcoming = stream.read(block_bytes)
        buffer = carry + chunk if carry else chunk
        if not upcoming:
            carry = buffer
            break
        cut = _entry_boundary(buffer)
        if cut == 0:
            carry = buffer
            continue
        carry = buffer[cut:]
        yield buffer[:cut]
    if carry:
        yield carry if carry.endswith(b"\n") else carry + b"\n"


def sample_entry_lines(head: bytes, limit: int = 2000) -> list[str]:
    text = head.decode("utf-8", "replace")
    lines = text.split("\n")[:-1] if len(head) >= (1 << 20) else text.split("\n")
    return [line for line in lines if line and not line.startswith("\t")][:limit]


def resolve_prefix(head: bytes, prefix: str | None, path: Path) -> tuple[str, float]:
    lines = sample_entry_lines(head)
    if prefix is not None:
        validate_prefix(prefix)
        fraction = _match_fraction(prefix, lines) if lines else 1.0
        if lines and fraction < 0.5:
            example = redact_line(next(line for line in lines)[:120])
            raise BadInput(f"{path}: --prefix {prefix!r} matches only {fraction:.0%} of the first "
                           f"{len(lines)} lines (e.g. {example!r}); check log_line_prefix")
        return prefix, fraction
    if not lines:
        return "%m [%p] ", 1.0
    return detect_prefix(lines)


def stderr_line_pattern(prefix: str) -> str:
    return prefix_to_pattern(prefix) + SEVERITY_PATTERN + DURATION_PATTERN


def _as_utf8(data: bytes) -> bytes:
    try:
        # Arrow's validation is SIMD; bytes.decode would build a str we do not need.
        pa.StringArray.from_buffers(1, pa.py_buffer(np.array([0, len(data)], np.int32)),
                                    pa.py_buffer(data)).validate(full=True)
        return data
    except pa.ArrowInvalid:
        # Logs mix client encodings; replacement keeps every line countable.
        return data.decode("utf-8", "replace").encode("utf-8")


def _has_statement_lines(entries: pa.Array) -> bool:
    return bool(pc.any(pc.match_substring(entries, "LOG:  statement: ")).as_py()
                or pc.any(pc.match_substring(entries, "LOG:  execute ")).as_py())


def stderr_block_entries(data: bytes, line_pattern: str, line_base: int, problems: ParseProblems,
                         fast=None) -> tuple[pa.Table | dict, int]:
    """Entries of one block (ending at an entry boundary) and the number of lines it held.

    With `fast` (a fastpath.FastPath) the duration rows come back as decoded columns (a dict);
    otherwise as the regex-extracted entries table shared with csv/json."""
    data = _as_utf8(data)
    if not data.endswith(b"\n"):
        data += b"\n"
    bytes_view = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(bytes_view == 10)
    line_starts = np.empty(len(newlines), dtype=np.int64)
    line_starts[0] = 0
    line_starts[1:] = newlines[:-1] + 1
    first_bytes = bytes_view[line_starts]
    # Continuation lines of a multi-line message start with a tab (elog.c append_with_tabs);
    # blank lines carry nothing and stay with the entry before them. Log shippers and editors
    # that expand tabs leave space-indented continuations: an entry starts with its prefix
    # (%m/%t/%p... never a space), so those are continuations too, not broken lines.
    continuation = (first_bytes == 9) | (first_bytes == 10) | (first_bytes == 32)
    entry_lines = np.flatnonzero(~continuation)
    orphans = int(entry_lines[0]) if len(entry_lines) else len(line_starts)
    if orphans:
        problems.add("continuation_without_entry", orphans,
                     [(line_base + 1, data[: newlines[0]].decode("utf-8", "replace"))])
    offsets = np.empty(len(entry_lines) + 1, dtype=np.int64)
    offsets[:-1] = line_starts[entry_lines]
    offsets[-1] = len(data)
    entries = pa.StringArray.from_buffers(len(entry_lines), pa.py_buffer(offsets.astype(np.int32)),
                                          pa.py_buffer(data))
    line_numbers = entry_lines + line_base + 1
    if fast is not None:
        from probes.pglog.fastpath import fast_block_entries

        columns, unmatched = fast_block_entries(fast, data, offsets[:-1], offsets[1:], line_numbers, entries)
        if len(columns["bare_lines"]) or _has_statement_lines(entries):
            # log_statement / log_duration logs: the statement and its duration are separate
            # entries, which the regex path pairs by pid (across blocks too).
            fast = None
    if fast is None:
        fields = pc.extract_regex(entries, line_pattern)
        unmatched = fields.is_null().to_numpy(zero_copy_only=False)
    unmatched_count = int(unmatched.sum())
    if unmatched_count:
        positions = np.flatnonzero(unmatched)[:MAX_EXAMPLES]
        problems.add("line_does_not_match_prefix", unmatched_count,
                     [(int(line_numbers[i]), entries[int(i)].as_py()) for i in positions])
    if fast is not None:
        columns["entries"] = len(entries) - unmatched_count
        return columns, len(line_starts)
    table = pa.Table.from_arrays(fields.flatten(), names=[f.name for f in fields.type])
    table = table.append_column("line", pa.array(line_numbers, pa.int64())).filter(pa.array(~unmatched))
    return table, len(line_starts)


# -- csvlog --------------------------------------------------------------------------------------
def csv_column_count(head: bytes) -> int:
    reader = csv.reader(io.StringIO(head.decode("utf-8", "replace")))
    try:
        first = next(reader)
    except (StopIteration, csv.Error):
        return len(CSV_COLUMNS)
    return len(first)


def csv_entry_batches(stream, head: bytes, problems: ParseProblems,
                      block_bytes: int = BLOCK_BYTES) -> Iterator[pa.Table]:
    import pyarrow.csv as pacsv

    count = csv_column_count(head)
    if count < CSV_MIN_COLUMNS or count > len(CSV_COLUMNS) + 4:
        raise BadInput(f"not a csvlog file: the first record has {count} fields "
                       f"(PostgreSQL writes {CSV_MIN_COLUMNS}-{len(CSV_COLUMNS)})")
    names = CSV_COLUMNS[:count] + [f"extra_{i}" for i in range(max(0, count - len(CSV_COLUMNS)))]
    wanted = ["log_time", "process_id", "error_severity", "message"]
    record_number = [0]

    def invalid_row(row) -> str:
        problems.add("csv_row_malformed", 1, [(row.number or 0, row.text or "")])
        return "skip"

    reader = pacsv.open_csv(
        stream,
        read_options=pacsv.ReadOptions(column_names=names, block_size=block_bytes, use_threads=True),
        parse_options=pacsv.ParseOptions(newlines_in_values=True, invalid_row_handler=invalid_row),
        convert_options=pacsv.ConvertOptions(column_types={n: pa.string() for n in wanted},
                                             include_columns=wanted, strings_can_be_null=False,
                                             quoted_strings_can_be_null=False),
    )
    for batch in reader:
        table = pa.Table.from_batches([batch])
        lines = pa.array(np.arange(record_number[0] + 1, record_number[0] + 1 + table.num_rows), pa.int64())
        record_number[0] += table.num_rows
        yield _message_entries(table.column("log_time"), table.column("message"), lines, problems,
                               table.column("error_severity"), table.column("process_id"))


def _message_entries(log_time, message, lines, problems: ParseProblems, severity, pid) -> pa.Table:
    """Entries from csv/json records: the time is fixed-format (%m style), the message is the
    text after the prefix."""
    log_time = log_time.combine_chunks() if isinstance(log_time, pa.ChunkedArray) else log_time
    message = message.combine_chunks() if isinstance(message, pa.ChunkedArray) else message
    fields = pc.extract_regex(message, "^" + DURATION_PATTERN)
    table = pa.Table.from_arrays(fields.flatten(), names=[f.name for f in fields.type])
    minute = pc.utf8_slice_codeunits(log_time, 0, 16)
    zone = pc.utf8_trim_whitespace(pc.utf8_slice_codeunits(log_time, 23))
    zone = pc.replace_substring_regex(zone, r"^\d*\s*", "")
    table = table.append_column("minute", minute).append_column("zone", zone).append_column("line", lines)
    pid = pc.cast(pc.if_else(pc.equal(pc.cast(pid, pa.string()), ""), "0", pc.cast(pid, pa.string())), pa.int64())
    return table.append_column("severity", pc.cast(severity, pa.string())).append_column("pid", pid)


# -- jsonlog -------------------------------------------------------------------------------------
# CloudNativePG wraps each of the server's records in its own JSON line:
# {"level":"info","ts":...,"logger":"postgres","msg":"record","record":{"log_time":...,
#  "process_id":"123","error_severity":"LOG","message":"duration: ..."}}
CLOUDNATIVEPG_RECORD = pa.struct([("log_time", pa.string()), ("process_id", pa.string()),
                                  ("error_severity", pa.string()), ("message", pa.string())])
JSON_SCHEMA = pa.schema([("timestamp", pa.string()), ("pid", pa.int64()), ("error_severity", pa.string()),
                         ("message", pa.string()), ("record", CLOUDNATIVEPG_RECORD)])


def _unwrap_cloudnativepg(table: pa.Table) -> pa.Table:
    """Rows of CloudNativePG's wrapped records take their fields from the record; any other JSON
    object without PostgreSQL's jsonlog fields (Cloud SQL, a shipper's own) is refused."""
    record = table.column("record").combine_chunks()
    wrapped = pc.invert(pc.is_null(record))
    if pc.any(wrapped).as_py():
        fields = record.flatten()
        names = [field.name for field in CLOUDNATIVEPG_RECORD]
        by_name = dict(zip(names, fields))
        pid = pc.cast(by_name["process_id"], pa.int64(), safe=False) if len(record) else by_name["process_id"]
        table = pa.table({
            "timestamp": pc.if_else(wrapped, by_name["log_time"], table.column("timestamp").combine_chunks()),
            "pid": pc.if_else(wrapped, pid, table.column("pid").combine_chunks()),
            "error_severity": pc.if_else(wrapped, by_name["error_severity"],
                                         table.column("error_severity").combine_chunks()),
            "message": pc.if_else(wrapped, by_name["message"], table.column("message").combine_chunks()),
        })
    if table.num_rows and table.column("message").null_count == table.num_rows:
        raise BadInput("JSON objects that are neither PostgreSQL's jsonlog nor CloudNativePG records "
                       "(no 'message' field); point pg-log at the server's own log (stderr, csvlog "
                       "or jsonlog)")
    return table


def json_entry_batches(stream, problems: ParseProblems, block_bytes: int = BLOCK_BYTES) -> Iterator[pa.Table]:
    import pyarrow.json as pajson

    options = pajson.ParseOptions(explicit_schema=JSON_SCHEMA, unexpected_field_behavior="ignore")
    line_base = 0
    for block in stderr_blocks(stream, block_bytes):
        line_count = block.count(b"\n")
        try:
            table = pajson.read_json(io.BytesIO(block), parse_options=options,
                                     read_options=pajson.ReadOptions(block_size=max(len(block), 1 << 20)))
            lines = pa.array(np.arange(line_base + 1, line_base + 1 + table.num_rows), pa.int64())
            if table.num_rows != line_count:
                # Blank lines are skipped by the reader, so record numbers no longer map to
                # lines: fall back to the careful path to keep line numbers honest.
                raise ValueError("blank lines")
        except (pa.ArrowInvalid, ValueError):
            table, lines = _json_block_carefully(block, line_base, problems, options)
            if line_base == 0 and table.num_rows == 0:
                raise BadInput("not a jsonlog file: no line of the first block is a JSON object "
                               "(use --format stderr or csv)") from None
        line_base += line_count
        table = _unwrap_cloudnativepg(table)
        if table.num_rows:
            yield _message_entries(table.column("timestamp"), table.column("message"), lines, problems,
                                   table.column("error_severity"), table.column("pid"))


def _json_block_carefully(block: bytes, line_base: int, problems: ParseProblems, options):
    """A block the fast reader refused: find the broken lines one by one (only this block)."""
    import pyarrow.json as pajson

    good, numbers, bad = [], [], []
    for index, line in enumerate(block.split(b"\n")):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError
        except ValueError:
            bad.append((line_base + index + 1, line.decode("utf-8", "replace")))
            continue
        good.append(line)
        numbers.append(line_base + index + 1)
    problems.add("json_line_malformed", len(bad), bad[:MAX_EXAMPLES])
    if not good:
        return JSON_SCHEMA.empty_table(), pa.array([], pa.int64())
    table = pajson.read_json(io.BytesIO(b"\n".join(good) + b"\n"), parse_options=options)
    return table, pa.array(numbers, pa.int64())

