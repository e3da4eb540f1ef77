"""Statement fingerprints with libpg_query (pglast), cached on a cheap pre-normalised key.

libpg_query's fingerprint ignores literal values, parameter numbers, IN-list lengths, comments
and whitespace, so `WHERE aid = 7` (log), `WHERE aid = $1` (prepared) and pg_stat_statements'
normalised text all give one fingerprint: that is what joins a log to pg_stat_statements.

Parsing every line would cost ~20 us each; instead the statements of a block are reduced to a
key with their literals removed by one vectorised RE2 pass, and the parser runs once per
distinct key (a handful for pgbench, a few thousand for a real application).
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# The pre-normalised key: literals are dropped, everything else is kept verbatim (group 1), so
# two statements share a key only when libpg_query would fingerprint them alike. Kept whole:
# double-quoted identifiers ("t1" and "t2" stay apart), comments and $$-quoted bodies (a quote
# inside them would otherwise open a "string" that swallows real SQL up to the next quote).
# E'' strings are read with their backslash escapes. Whitespace is left alone: differing
# whitespace only costs an extra parser call, never a wrong merge.
PREKEY_PATTERN = (r"(\"(?:[^\"]|\"\")*\"|--[^\n]*|/\*(?s:.*?)\*/|\$\$(?s:.*?)\$\$)"
                  r"|[eE]'(?:[^'\\]|\\.|'')*'|'(?:[^']|'')*'|\b[0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?")

# The same pre-normalisation in Python's re, for single representatives (RE2 and re agree on
# this pattern: no look-arounds, no backreferences).
_PREKEY = re.compile(PREKEY_PATTERN)
_DIGIT = re.compile(r"[0-9]")
# Literals are dropped from the key only for statements whose literals libpg_query (pglast 6)
# reads as constants and so leaves out of the fingerprint. Utility statements keep some numbers
# and strings in the tree (`FETCH 1` / `FETCH 2`, `MOVE`, `COPY t FROM 'file'`, `ALTER SEQUENCE
# ... RESTART WITH 9` fingerprint apart), so any other statement is its own key: an extra parser
# call per distinct text, never a merge.
LITERAL_FREE_KEY_PATTERN = r"^[\s(]*(?i:select|insert|update|delete|with|values|execute|declare|prepare|set)\b"
_LITERAL_FREE_KEY = re.compile(LITERAL_FREE_KEY_PATTERN)
# A digit key whose statements may differ in more than literals (digits in identifiers: t1/t2).
AMBIGUOUS = -1
# The key -> id maps are only a cache (ids live in _id_by_fingerprint): past this many keys they
# are emptied, so keys that never repeat (IN lists of every length, generated SQL) cost parser
# calls, not memory that grows with the log. ~250 B a key: ~60 MB at most.
MAX_CACHED_KEYS = 250_000

# One tokenizer for the text that reaches a report. Alternatives are tried left to right at each
# position, so a quote inside a comment, or `--` inside a string, is read as what it is.
# libpg_query's normalize (pglast 6 / libpg_query 15) leaves constants of utility statements
# in place (`EXECUTE foo(123)`, `FETCH 1`, `SET x = 'a'` in some forms, `ALTER SEQUENCE ...
# RESTART WITH 9`), so its output goes through this too.
_QUERY_TOKENS = re.compile(
    r"""(?P<ident>"(?:[^"]|"")*")"""
    r"""|(?P<param>\$\d+)"""
    r"""|(?P<dollar>\$(?P<tag>[A-Za-z_][A-Za-z_0-9]*)?\$.*?\$(?P=tag)\$)"""
    r"""|(?P<estring>[eE]'(?:[^'\\]|\\.|'')*')"""
    r"""|(?P<string>'(?:[^']|'')*'?)"""
    r"""|(?P<line_comment>--[^\n]*)"""
    r"""|(?P<block_comment>/\*.*?(?:\*/|\Z))"""
    r"""|(?P<number>(?<![A-Za-z_0-9$])(?:0[xXoObB][0-9A-Fa-f_]+|[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)?|\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?))""",
    re.DOTALL,
)


def _scrub_token(match: re.Match) -> str:
    kind = match.lastgroup
    if kind in ("ident", "param"):
        return match.group(0)
    if kind in ("line_comment", "block_comment"):
        # Comments can hold anything (ids, user names); a `--` comment kept in a statement
        # collapsed onto one line would also swallow the rest of it.
        return " "
    if kind == "number":
        return "?"
    return "'?'"


def redact_literals(text: str) -> str:
    """Text with every literal (strings, dollar-quoted strings, numbers) replaced and comments
    removed; quoted identifiers and $n parameters kept. Whitespace collapsed to single spaces."""
    return " ".join(_QUERY_TOKENS.sub(_scrub_token, text).split())


def prekeys(statements: pa.Array) -> pa.Array:
    dropped = pc.replace_substring_regex(statements, PREKEY_PATTERN, r"\1")
    return pc.if_else(pc.match_substring_regex(statements, LITERAL_FREE_KEY_PATTERN), dropped, statements)


def prekey(statement: str) -> str:
    """The key of one statement, exactly as prekeys() makes it for an array."""
    if not _LITERAL_FREE_KEY.match(statement):
        return statement
    return _PREKEY.sub(lambda m: m.group(1) or "", statement)


def clean_statement(text: str) -> str:
    """Undo the stderr log's tab after each newline and trim; used only on representatives."""
    return text.replace("\n\t", "\n").strip()


def fingerprint_statement(text: str) -> tuple[str, str, bool]:
    """(fingerprint, normalised query without literals, parsed by libpg_query?)."""
    # pglast on first use (70 ms to import here): only fingerprinting needs it.
    from pglast import parser

    text = clean_statement(text)
    try:
        fingerprint = parser.fingerprint(text)
        try:
            normalised = parser.normalize(text)
        except Exception:  # normalise can fail where fingerprint succeeds (rare); never leak
            normalised = text
        return fingerprint, redact_literals(normalised), True
    except Exception:
        # Truncated or non-SQL text (e.g. a statement cut by log_parameter_max_length): a stable
        # fingerprint of its literal-free shape, marked so it is never mistaken for libpg_query's.
        shape = redact_literals(text)
        return "x" + hashlib.sha1(shape.encode()).hexdigest()[:15], shape, False


class FingerprintCache:
    """Maps pre-normalised keys to small integer ids of distinct fingerprints."""

    def __init__(self, keep_literals: bool = False):
        self.keep_literals = keep_literals
        self.by_prekey: dict[str, int] = {}
        self.by_digit_key: dict[str, int] = {}
        self.fingerprints: list[str] = []
        self.queries: list[str] = []
        self.examples: list[str] = []
        self.parsed: list[bool] = []
        self._id_by_fingerprint: dict[str, int] = {}
        self.parser_calls = 0
        self.key_evictions = 0

    def _id_for(self, statement: str) -> int:
        fingerprint, normalised, parsed = fingerprint_statement(statement)
        self.parser_calls += 1
        found = self._id_by_fingerprint.get(fingerprint)
        if found is not None:
            return found
        identifier = len(self.fingerprints)
        self._id_by_fingerprint[fingerprint] = identifier
        self.fingerprints.append(fingerprint)
        self.queries.append(normalised)
        self.examples.append(clean_statement(statement) if self.keep_literals else "")
        self.parsed.append(parsed)
        return identifier

    def ids(self, statements: pa.Array, digit_keys: pa.Array | None = None) -> pa.Array:
        """Fingerprint id (int32) for each statement, calling the parser once per new key.

        `digit_keys` (the statements with every digit turned into '0', from one bytes.translate
        over the block) is a cheaper key than the RE2 pre-normalisation; it is used while it
        stays selective, i.e. while the statements differ mostly in numbers. When many keys are
        new (string literals that vary), the block falls back to the RE2 key. A digit key is
        only trusted when every digit of its statement sat in a literal: `FROM t1` and `FROM t2`
        share the digit key `FROM t0` but not a fingerprint, so such keys are marked ambiguous
        and their statements go through the RE2 key instead.
        """
        if len(statements) == 0:
            return pa.array([], pa.int32())
        if len(self.by_prekey) + len(self.by_digit_key) > MAX_CACHED_KEYS:
            self.by_prekey.clear()
            self.by_digit_key.clear()
            self.key_evictions += 1
        if digit_keys is not None:
            encoded = pc.dictionary_encode(digit_keys)
            keys = encoded.dictionary.to_pylist()
            new = sum(1 for key in keys if key not in self.by_digit_key)
            if new <= max(256, len(statements) // 50):
                ids = self._map(encoded, keys, statements, self.by_digit_key, digit_keys=True)
                ambiguous = np.flatnonzero(ids == AMBIGUOUS)
                if len(ambiguous) == 0:
                    return pa.array(ids, pa.int32())
                ids[ambiguous] = self._by_prekey(statements.take(pa.array(ambiguous)))
                return pa.array(ids, pa.int32())
        return pa.array(self._by_prekey(statements), pa.int32())

    def _by_prekey(self, statements: pa.Array) -> np.ndarray:
        encoded = pc.dictionary_encode(prekeys(statements))
        return self._map(encoded, encoded.dictionary.to_pylist(), statements, self.by_prekey)

    def _map(self, encoded, keys: list[str], statements: pa.Array, known: dict[str, int],
             digit_keys: bool = False) -> np.ndarray:
        first_index = None
        mapping = []
        for position, key in enumerate(keys):
            identifier = known.get(key)
            if identifier is None:
                if first_index is None:
                    # Position of each key's first occurrence: one vectorised pass, only when
                    # some key is new.
                    uniques, first = np.unique(encoded.indices.to_numpy(zero_copy_only=False), return_index=True)
                    first_index = dict(zip(uniques.tolist(), first.tolist()))
                statement = statements[first_index[position]].as_py()
                shape = prekey(statement)
                if digit_keys and _DIGIT.search(shape):
                    identifier = AMBIGUOUS
                else:
                    # Another digit key may already have met this statement's shape.
                    identifier = self.by_prekey.get(shape)
                    if identifier is None:
                        identifier = self._id_for(statement)
                        self.by_prekey[shape] = identifier
                known[key] = identifier
            mapping.append(identifier)
        return np.asarray(mapping, dtype=np.int32)[encoded.indices.to_numpy(zero_copy_only=False)]
