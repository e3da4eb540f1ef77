"""log_line_prefix: turn a prefix into an RE2 pattern, and detect the prefix from a log's lines.

pgBadger's quietest failure is a prefix that does not match: it writes an empty report. Here the
prefix is either given or detected from the file (and printed), and a prefix that matches too few
lines is refused with the lines it failed on.
"""

from __future__ import annotations

import re

from core.errors import BadInput

# Severity words PostgreSQL writes after the prefix (elog.c error_severity()).
SEVERITIES = ("DEBUG1", "DEBUG2", "DEBUG3", "DEBUG4", "DEBUG5", "LOG", "INFO", "NOTICE", "WARNING",
              "ERROR", "FATAL", "PANIC", "DETAIL", "HINT", "CONTEXT", "STATEMENT", "QUERY", "LOCATION")
SEVERITY_PATTERN = "(?P<severity>" + "|".join(SEVERITIES) + "):  "

# Time escapes capture the minute and the zone separately: the per-minute series only needs the
# minute, and the zone is converted once per distinct value, not once per line.
_TIME_WITH_MS = (r"(?P<minute>\d{4}-\d\d-\d\d \d\d:\d\d):\d\d\.\d+ (?P<zone>[A-Za-z0-9+-]+)")
_TIME_NO_MS = (r"(?P<minute>\d{4}-\d\d-\d\d \d\d:\d\d):\d\d (?P<zone>[A-Za-z0-9+-]+)")
# The server prints the zone with pg_strftime's %Z: an abbreviation or a tzdata numeric one
# ("+0530", "-03"), never a colon, so a prefix like RDS's '%t:%r:' ends the zone at the ':'.
_EPOCH = r"(?P<epoch>\d+)\.\d+"
# Free-text escapes (user, database, application...) match lazily up to the next literal; none of
# them can hold a newline.
_ANY = r"[^\n]*?"

ESCAPES = {
    "m": _TIME_WITH_MS,
    "t": _TIME_NO_MS,
    "n": _EPOCH,
    "p": r"\d+",
    "P": r"\d*",
    "l": r"\d+",
    "c": r"[0-9a-f]+\.[0-9a-f]+",
    "s": r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [A-Za-z0-9+:-]+",
    "v": r"[0-9/]*",
    "x": r"\d+",
    "e": r"[0-9A-Z]{5}",
    "Q": r"-?\d+",
    "u": _ANY, "d": _ANY, "a": _ANY, "h": _ANY, "r": _ANY, "b": _ANY, "i": _ANY,
}
TIME_ESCAPES = {"m", "t", "n"}

# Prefixes seen in the wild, tried in order when none is given: Debian's default, PostgreSQL's
# default, pgBadger's recommended ones, and the managed services' fixed prefixes.
CANDIDATE_PREFIXES = (
    "%m [%p] %q%u@%d ",
    "%m [%p] ",
    "%t [%p]: [%l-1] user=%u,db=%d,app=%a,client=%h ",
    "%t [%p]: [%l-1] user=%u,db=%d ",
    "%t [%p]: [%l-1] ",
    "%m [%p]: [%l-1] user=%u,db=%d,app=%a,client=%h ",
    "%m [%p]: [%l-1] ",
    "%t:%r:%u@%d:[%p]:",
    "%m:%r:%u@%d:[%p]:",
    "%t [%p] %q%u@%d ",
    "%t [%p] ",
    "%m [%p] %q[user=%u,db=%d,app=%a] ",
    "%m %p ",
    "%t %p ",
    "< %m >",
    "< %t >",
    "%m [%p-%l] %q%u@%d ",
    "%t [%p-%l] %q%u@%d ",
    "%m [%p] %u@%d/%a ",
    "%m %u %d [%p] ",
    "%n [%p] ",
    # Heroku Postgres (log_line_prefix 'sql_error_code = %e ', through syslog: the time and pid
    # come from the syslog header, readers.SyslogTimes).
    "%m [%p] sql_error_code = %e ",
)


def prefix_to_pattern(prefix: str) -> str:
    """RE2 pattern (anchored, without the severity) for a log_line_prefix."""
    parts: list[str] = []
    optional_from: int | None = None
    pid_named = False
    index = 0
    while index < len(prefix):
        char = prefix[index]
        if char == "%" and index + 1 < len(prefix):
            code = prefix[index + 1]
            index += 2
            if code == "%":
                parts.append("%")
            elif code == "q":
                # %q: what follows is only written for session processes (not the checkpointer...).
                optional_from = len(parts)
            elif code == "p" and not pid_named:
                # The backend pid pairs log_statement lines with their log_duration lines.
                parts.append(r"(?P<pid>\d+)")
                pid_named = True
            elif code in ESCAPES:
                parts.append(ESCAPES[code])
            else:
                raise BadInput(f"--prefix {prefix!r}: unknown escape %{code}")
            continue
        parts.append(re.escape(char))
        index += 1
    if optional_from is not None:
        parts = parts[:optional_from] + ["(?:" + "".join(parts[optional_from:]) + ")?"]
    return "^" + "".join(parts)


def validate_prefix(prefix: str) -> None:
    codes = set(re.findall(r"%(.)", prefix.replace("%%", "")))
    if not codes & TIME_ESCAPES:
        raise BadInput(f"--prefix {prefix!r}: needs a time escape (%m, %t or %n)")
    if "p" not in codes:
        raise BadInput(f"--prefix {prefix!r}: needs the process id escape %p")
    prefix_to_pattern(prefix)


def _match_fraction(prefix: str, lines: list[str]) -> float:
    regex = re.compile(prefix_to_pattern(prefix) + SEVERITY_PATTERN)
    if not lines:
        return 0.0
    return sum(1 for line in lines if regex.match(line)) / len(lines)


_TIME_IN_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(\.\d+)? [A-Za-z0-9+:-]+")
_SEVERITY_IN_LINE = re.compile("(" + "|".join(SEVERITIES) + "):  ")


def infer_prefix(lines: list[str]) -> str | None:
    """Build a prefix from the lines themselves when no known one fits: the time becomes %m/%t,
    the first bare number after it %p, other text that varies between lines a lazy %u (any
    text), and text common to every line stays literal."""
    heads = []
    for line in lines:
        severity = _SEVERITY_IN_LINE.search(line)
        if severity:
            heads.append(line[: severity.start()])
    if not heads:
        return None
    tokenised = []
    for head in heads[:200]:
        time_match = _TIME_IN_LINE.search(head)
        if not time_match:
            return None
        escape = "%m" if time_match.group(1) else "%t"
        before, after = head[: time_match.start()], head[time_match.end():]
        pid_match = re.search(r"(?<![\d.-])\d+(?![\d.-])", after)
        if not pid_match:
            return None
        tokenised.append((before, escape, after[: pid_match.start()], after[pid_match.end():]))
    before, escape, middle, _ = tokenised[0]
    if any(t[:3] != (before, escape, middle) for t in tokenised):
        return None
    tail = _infer_tail([t[3] for t in tokenised])
    if tail is None:
        return None
    return before.replace("%", "%%") + escape + middle.replace("%", "%%") + "%p" + tail


_SEPARATORS = re.compile(r"([\s@,:\[\]()=<>/]+)")
_NAMED_FIELDS = {"user": "%u", "usr": "%u", "u": "%u", "db": "%d", "database": "%d", "d": "%d",
                 "app": "%a", "application": "%a", "a": "%a", "client": "%h", "host": "%h",
                 "remote": "%r", "session": "%c", "vxid": "%v", "xid": "%x", "txid": "%x"}


def _infer_tail(tails: list[str]) -> str | None:
    """The part after %p: words equal on every line stay literal; words that vary become the
    escape their label names (db=... -> %d), else %u (any text). When some lines (background
    processes) lack the session part, it becomes optional with %q."""
    split = [_SEPARATORS.split(tail) for tail in tails]
    longest = max(split, key=len)
    shortest = min(split, key=len)
    if any(len(parts) != len(longest) and parts[:-1] != longest[: len(parts) - 1] for parts in split):
        return None
    full = [parts for parts in split if len(parts) == len(longest)]
    pieces = []
    for position, token in enumerate(longest):
        if position % 2 == 1:  # separators must agree
            if any(parts[position] != token for parts in full):
                return None
            pieces.append(token.replace("%", "%%"))
            continue
        if all(parts[position] == token for parts in full):
            pieces.append(token.replace("%", "%%"))
            continue
        label = longest[position - 2].lower() if position >= 2 else ""
        pieces.append(_NAMED_FIELDS.get(label, "%u"))
    if len(shortest) < len(longest):
        cut = len(shortest) - 1  # keep the shorter lines' trailing separator before %q
        return "".join(pieces[:cut]) + "%q" + "".join(pieces[cut:])
    return "".join(pieces)


def detect_prefix(lines: list[str], minimum_fraction: float = 0.5) -> tuple[str, float]:
    """Pick the prefix matching the most lines (known prefixes first, then inference).

    `lines` are entry lines (continuation lines, which start with a tab, already removed).
    """
    best, best_fraction = None, 0.0
    for candidate in CANDIDATE_PREFIXES:
        fraction = _match_fraction(candidate, lines)
        if fraction > best_fraction + 1e-9:
            best, best_fraction = candidate, fraction
        if fraction >= 0.999:
            break
    if best_fraction < 0.999:
        inferred = infer_prefix(lines)
        if inferred:
            fraction = _match_fraction(inferred, lines)
            if fraction > best_fraction:
                best, best_fraction = inferred, fraction
    if best is None or best_fraction < minimum_fraction:
        example = next((line for line in lines if line.strip()), "")[:120]
        raise BadInput(
            "could not detect the log_line_prefix (no known or inferred prefix matches "
            f"{minimum_fraction:.0%} of the first lines, e.g. {redact_line(example)!r}); "
            "pass --prefix with your server's log_line_prefix (it needs %m or %t, and %p)"
        )
    return best, best_fraction


def redact_line(text: str) -> str:
    """Quoted strings, numbers and comments replaced (examples in errors must not leak literals)."""
    from probes.pglog.fingerprint import redact_literals

    return redact_literals(text)
