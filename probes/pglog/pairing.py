"""`log_statement = all` + `log_duration = on`: the statement and its duration are two entries.

    LOG:  statement: SELECT ...           (simple protocol)
    LOG:  duration: 0.123 ms
    LOG:  execute <unnamed>: SELECT ...   (extended protocol; parse and bind durations come
    DETAIL:  parameters: $1 = '...'        before it, bare, and stay unattributed)
    LOG:  duration: 0.050 ms

A bare duration is the statement's when the entry just before it from the same backend (pid),
skipping DETAIL-like entries, is that statement's log line. The pairing is vectorised (a stable
sort by pid, then a look at the previous row) and carries each pid's last unanswered statement
into the next block.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# Entries that belong to the one before them and never end a statement/duration pair.
ATTACHED_SEVERITIES = ("DETAIL", "HINT", "CONTEXT", "STATEMENT", "QUERY", "LOCATION")
STATEMENT_LOG = r"^(?:statement: |execute [^:\n]*: )"


class DurationPairer:
    def __init__(self) -> None:
        self.pending: dict[int, tuple[str, str]] = {}  # pid -> (kind, statement)
        self.paired = 0

    def pair(self, entries: pa.Table) -> pa.Table:
        """Entries with each pairable bare duration turned into a statement/execute duration."""
        if entries.num_rows == 0 or "pid" not in entries.column_names:
            return entries
        ms = entries.column("ms").combine_chunks()
        kind = entries.column("kind").combine_chunks()
        text = entries.column("text").combine_chunks()
        no_duration = pc.equal(ms, "").to_numpy(zero_copy_only=False)
        statement_log = np.zeros(entries.num_rows, dtype=bool)
        candidates = np.flatnonzero(no_duration)
        if len(candidates):
            statement_log[candidates] = pc.match_substring_regex(
                text.take(pa.array(candidates)), STATEMENT_LOG).to_numpy(zero_copy_only=False)
        bare = (~no_duration) & pc.equal(kind, "").to_numpy(zero_copy_only=False)
        if not statement_log.any() and not (bare.any() and self.pending):
            return entries
        severity = entries.column("severity").combine_chunks() if "severity" in entries.column_names else None
        relevant = np.ones(entries.num_rows, dtype=bool) if severity is None else \
            ~pc.is_in(severity, pa.array(ATTACHED_SEVERITIES)).to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(relevant)
        pid_values = entries.column("pid").combine_chunks().take(pa.array(rows))
        if pa.types.is_string(pid_values.type):
            # %p after %q is absent on background-process lines: pid 0 never pairs with a client.
            pid_values = pc.if_else(pc.equal(pid_values, ""), "0", pid_values)
        pids = pc.cast(pid_values, pa.int64()).to_numpy(zero_copy_only=False)
        # Pending statements from the previous block go first, as row -1.
        pending_pids = np.array(list(self.pending), dtype=np.int64)
        all_pids = np.concatenate([pending_pids, pids])
        all_rows = np.concatenate([np.full(len(pending_pids), -1, dtype=np.int64), rows])
        all_statement = np.concatenate([np.ones(len(pending_pids), dtype=bool), statement_log[rows]])
        all_bare = np.concatenate([np.zeros(len(pending_pids), dtype=bool), bare[rows]])
        pending_index = np.concatenate([np.arange(len(pending_pids)), np.full(len(rows), -1)])
        order = np.argsort(all_pids, kind="stable")
        sorted_pids = all_pids[order]
        same_pid = np.zeros(len(order), dtype=bool)
        same_pid[1:] = sorted_pids[1:] == sorted_pids[:-1]
        previous_is_statement = np.zeros(len(order), dtype=bool)
        previous_is_statement[1:] = all_statement[order][:-1]
        matches = np.flatnonzero(all_bare[order] & same_pid & previous_is_statement)
        duration_rows = all_rows[order][matches]
        source_rows = all_rows[order][matches - 1]
        source_pending = pending_index[order][matches - 1]

        pending_texts = list(self.pending.values())
        statements: list[str] = []
        kinds: list[str] = []
        from_block = [int(r) for r in source_rows if r >= 0]
        block_texts = dict(zip(from_block, text.take(pa.array(from_block, pa.int64())).to_pylist())) \
            if from_block else {}
        for source, pending_position in zip(source_rows.tolist(), source_pending.tolist()):
            if source >= 0:
                statement_kind, statement = _split_statement_log(block_texts[source])
            else:
                statement_kind, statement = pending_texts[pending_position]
            kinds.append(statement_kind)
            statements.append(statement)

        # Each pid's last relevant entry, when it is a statement log, waits for the next block.
        last_of_pid = np.ones(len(order), dtype=bool)
        last_of_pid[:-1] = sorted_pids[1:] != sorted_pids[:-1]
        waiting = np.flatnonzero(last_of_pid & all_statement[order])
        new_pending: dict[int, tuple[str, str]] = {}
        waiting_block_rows = [int(all_rows[order][w]) for w in waiting if all_rows[order][w] >= 0]
        waiting_texts = dict(zip(waiting_block_rows, text.take(pa.array(waiting_block_rows, pa.int64())).to_pylist())) \
            if waiting_block_rows else {}
        for position in waiting:
            pid = int(sorted_pids[position])
            row = int(all_rows[order][position])
            new_pending[pid] = _split_statement_log(waiting_texts[row]) if row >= 0 \
                else pending_texts[int(pending_index[order][position])]
        self.pending = new_pending

        if len(duration_rows) == 0:
            return entries
        self.paired += len(duration_rows)
        mask = np.zeros(entries.num_rows, dtype=bool)
        mask[duration_rows] = True
        # replace_with_mask takes replacements in row order.
        in_row_order = np.argsort(duration_rows)
        kinds_sorted = [kinds[i] for i in in_row_order]
        statements_sorted = [statements[i] for i in in_row_order]
        new_kind = pc.replace_with_mask(kind, pa.array(mask), pa.array(kinds_sorted, pa.string()))
        new_text = pc.replace_with_mask(text, pa.array(mask), pa.array(statements_sorted, pa.string()))
        entries = entries.set_column(entries.schema.get_field_index("kind"), "kind", new_kind)
        return entries.set_column(entries.schema.get_field_index("text"), "text", new_text)


def _split_statement_log(text: str) -> tuple[str, str]:
    """("statement"|"execute", the SQL) from 'statement: SQL' or 'execute <name>: SQL'."""
    if text.startswith("statement: "):
        return "statement", text[len("statement: "):]
    head, _, statement = text.partition(": ")
    return "execute", statement
