"""The fast path for stderr logs whose log_line_prefix starts with a time (%m or %t): duration
entries are found with a substring search and decoded with numpy gathers on the raw block, so no
regular expression captures run per entry.

Why not RE2 captures everywhere: Arrow's extract_regex costs about 1 us per entry (RE2 falls
back to its NFA to report submatches), which alone caps a 32 MB block at ~80 MB/s. A DFA-only
match (`match_substring_regex`) still validates every entry against the full prefix, so this
path is exactly as strict as the regex path; `tests/test_pglog.py` checks both give identical
tables. Statement texts are zero-copy string views into the block, compacted by one cast.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from probes.pglog.prefix import SEVERITY_PATTERN, prefix_to_pattern

DURATION_MARK = "LOG:  duration: "
NUMBER_WINDOW = 14
NAME_WINDOW = 40
KINDS = ("statement", "execute", "plan", "")
KIND_STATEMENT, KIND_EXECUTE, KIND_PLAN, KIND_NONE = range(4)
# Digits -> '0': a literal-insensitive cache key for numbers at the cost of one bytes.translate.
DIGITS_TO_ZERO = bytes.maketrans(b"0123456789", b"0000000000")


def fast_path_layout(prefix: str) -> dict | None:
    """Where the time sits in an entry, when the fast path applies to this prefix."""
    if prefix.startswith("%m"):
        return {"zone_offset": 24}
    if prefix.startswith("%t"):
        return {"zone_offset": 20}
    return None


class FastPath:
    def __init__(self, prefix: str, layout: dict):
        body = prefix_to_pattern(prefix)
        self.duration_pattern = body + DURATION_MARK
        self.entry_pattern = body + SEVERITY_PATTERN
        self.zone_offset = layout["zone_offset"]

    @staticmethod
    def gather(data_view: np.ndarray, positions: np.ndarray, width: int) -> np.ndarray:
        return gather(data_view, positions, width)


# Newlines appended to every block so fixed-width windows never run past the end.
PADDING = b"\n" * 128


def gather(data_view: np.ndarray, positions: np.ndarray, width: int) -> np.ndarray:
    """An (n, width) copy of the bytes starting at each position. A sliding-window view indexed
    on its first axis copies `width` bytes per row without building an (n, width) index matrix
    (which costs 8x the memory and most of the time)."""
    windows = np.lib.stride_tricks.sliding_window_view(data_view, width)
    return windows[np.minimum(positions, len(windows) - 1)]


def string_views(data: pa.Buffer, data_view: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> pa.Array:
    """A utf8 array of data[start:start+length] per row, built as Arrow string views (no byte
    copy here), then compacted into a plain string array by Arrow's cast."""
    count = len(starts)
    views = np.zeros((count, 16), dtype=np.uint8)
    as_int = views.view(np.int32)
    lengths32 = lengths.astype(np.int32)
    as_int[:, 0] = lengths32
    # Up to 12 bytes are stored inline in the view; longer strings keep a 4-byte prefix and point
    # into the data buffer (Arrow's StringView layout).
    head = gather(data_view, starts, 12)
    head[np.arange(12)[None, :] >= lengths[:, None]] = 0
    short = lengths <= 12
    views[:, 4:16] = np.where(short[:, None], head, 0)
    long_rows = ~short
    views[long_rows, 4:8] = head[long_rows, :4]
    as_int[long_rows, 2] = 0
    as_int[long_rows, 3] = starts[long_rows].astype(np.int32)
    array = pa.Array.from_buffers(pa.string_view(), count, [None, pa.py_buffer(views), data])
    return array.cast(pa.string())


def parse_microseconds(window: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PostgreSQL logs durations as '%.3f ms': the digits without the dot are microseconds.
    Returns (microseconds, length of the number, well-formed?)."""
    is_space = window == 32
    has_space = is_space.any(axis=1)
    number_length = np.where(has_space, is_space.argmax(axis=1), 0)
    columns = np.arange(window.shape[1])[None, :]
    inside = columns < number_length[:, None]
    values = window - np.uint8(48)  # wraps around for non-digits, so digits are exactly < 10
    digits = inside & (values < 10)
    dots = inside & (window == 46)
    dot_position = np.where(dots, columns, -1).max(axis=1)
    # Well formed: only digits and one dot inside the number, three digits after the dot.
    ok = has_space & (digits.sum(axis=1) + 1 == number_length) & (dots.sum(axis=1) == 1) \
        & ((number_length - dot_position - 1) == 3)
    value = np.zeros(len(window), dtype=np.int64)
    for column in range(int(number_length.max(initial=0))):
        value = np.where(digits[:, column], value * 10 + values[:, column], value)
    return value, number_length, ok


def _matches(entries: pa.Array, rows: np.ndarray, pattern: str) -> np.ndarray:
    """Mask over all entries: rows that match `pattern` (only `rows` are considered). When most
    rows are asked for, matching everything beats gathering the subset first."""
    result = np.zeros(len(entries), dtype=bool)
    if len(rows) == 0:
        return result
    if len(rows) * 2 >= len(entries):
        matched = pc.match_substring_regex(entries, pattern).to_numpy(zero_copy_only=False)
        result[rows] = matched[rows]
    else:
        result[rows] = pc.match_substring_regex(entries.take(pa.array(rows)), pattern).to_numpy(zero_copy_only=False)
    return result


def fast_block_entries(fast: FastPath, data: bytes, entry_starts: np.ndarray, entry_ends: np.ndarray,
                       line_numbers: np.ndarray, entries: pa.Array) -> tuple[dict, np.ndarray]:
    """Duration rows of one block, decoded without per-entry regex captures.

    Returns (columns, unmatched mask over all entries)."""
    padded = data + PADDING
    data_view = np.frombuffer(padded, dtype=np.uint8)
    buffer = pa.py_buffer(padded)
    found = pc.find_substring(entries, DURATION_MARK).to_numpy(zero_copy_only=False)
    verified = _matches(entries, np.flatnonzero(found >= 0), fast.duration_pattern)
    others = np.flatnonzero(~verified)
    unmatched = np.zeros(len(entries), dtype=bool)
    if len(others):
        unmatched[others] = ~_matches(entries, others, fast.entry_pattern)[others]

    rows = np.flatnonzero(verified)
    starts = entry_starts[rows]
    ends = entry_ends[rows] - 1  # drop the newline
    number_at = starts + found[rows] + len(DURATION_MARK)
    microseconds, number_length, well_formed = parse_microseconds(
        fast.gather(data_view, number_at, NUMBER_WINDOW))
    after_number = number_at + number_length
    # After the number: " ms" then either the end of the entry (log_duration) or "  <kind>".
    tail = fast.gather(data_view, after_number, 8)
    well_formed &= (tail[:, 0] == 32) & (tail[:, 1] == ord("m")) & (tail[:, 2] == ord("s"))
    bare = well_formed & (tail[:, 3] == 10)
    kind_at = after_number + 5
    first, second = tail[:, 5], tail[:, 6]
    kind = np.full(len(rows), KIND_NONE, dtype=np.int8)
    kind[(first == ord("s")) & (second == ord("t"))] = KIND_STATEMENT
    kind[(first == ord("e")) & (second == ord("x"))] = KIND_EXECUTE
    kind[(first == ord("p")) & (second == ord("l"))] = KIND_PLAN
    # parse, bind and fastpath-call durations are phases, not statement executions.
    phases = well_formed & ~bare & (((first == ord("b")) & (second == ord("i"))) |
                                    ((first == ord("p")) & (second == ord("a"))) |
                                    ((first == ord("f")) & (second == ord("a"))))
    text_at = np.where(kind == KIND_STATEMENT, kind_at + len("statement:"),
                       np.where(kind == KIND_PLAN, kind_at + len("plan:"), kind_at))
    executes = np.flatnonzero(kind == KIND_EXECUTE)
    if len(executes):
        # execute <name>: the statement follows the first ": " after the portal name.
        window = fast.gather(data_view, kind_at[executes], NAME_WINDOW)
        colon = (window[:, :-1] == ord(":")) & (window[:, 1:] == 32)
        has_colon = colon.any(axis=1)
        text_at[executes] = kind_at[executes] + np.where(has_colon, colon.argmax(axis=1) + 1, 0)
        long_names = executes[~has_colon]
        for row in long_names:  # names longer than the window: rare, found one by one
            position = padded.find(b": ", int(kind_at[row]), int(ends[row]))
            text_at[row] = position + 1 if position >= 0 else ends[row]
    usable = well_formed & ~bare & (kind != KIND_NONE)
    text_at = np.minimum(text_at, ends)
    keep = np.flatnonzero(usable)
    columns = {
        "us": microseconds[keep],
        "kind": kind[keep],
        "text_start": text_at[keep],
        "text_length": ends[keep] - text_at[keep],
        "entry_start": starts[keep],
        "line": line_numbers[rows[keep]],
        # A duration with no statement (log_duration = on) or an unknown kind: reported.
        "bare_lines": line_numbers[rows[well_formed & ~usable & ~phases]],
        "phases": int(phases.sum()),
        "malformed_lines": line_numbers[rows[~well_formed]],
        "entries": len(entries),
        "buffer": buffer,
        "padded": padded,
        "data_view": data_view,
    }
    return columns, unmatched


def minute_keys(data_view: np.ndarray, entry_starts: np.ndarray, zone_offset: int) -> tuple[np.ndarray, list[str]]:
    """(index into distinct keys per row, distinct 'YYYY-MM-DD HH:MM ZONE' strings)."""
    window = gather(data_view, entry_starts, zone_offset + 8)
    # Blank the seconds (and milliseconds) so rows group by minute.
    window[:, 16:zone_offset] = 0
    # The zone ends at a space or a ':' (RDS's '%t:%r:'; the server never prints a colon in it).
    zone_window = window[:, zone_offset:]
    is_end = (zone_window == 32) | (zone_window == 58)
    zone_length = np.where(is_end.any(axis=1), is_end.argmax(axis=1), 8)
    window[np.arange(window.shape[1])[None, :] >= (zone_offset + zone_length)[:, None]] = 0
    # A log is (nearly) in time order: compare each row with the one before and only look up
    # where the minute changes, instead of sorting every row's key.
    changes = np.flatnonzero(np.any(window[1:] != window[:-1], axis=1)) + 1
    run_starts = np.r_[0, changes]
    run_index = np.zeros(len(window), dtype=np.int64)
    run_index[changes] = 1
    run_index = np.cumsum(run_index)
    texts: list[str] = []
    position_of: dict[bytes, int] = {}
    run_key = np.empty(len(run_starts), dtype=np.int64)
    for run, row in enumerate(run_starts):
        raw = window[row].tobytes()
        key = position_of.get(raw)
        if key is None:
            key = position_of[raw] = len(texts)
            texts.append(raw[:16].decode("ascii", "replace") + " "
                         + raw[zone_offset:].rstrip(b"\x00").decode("ascii", "replace"))
        run_key[run] = key
    return run_key[run_index], texts
