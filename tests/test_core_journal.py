"""core/journal.py: whole records survive torn tails, empty files and a really full disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from core.errors import WorkFailed
from core.journal import JournalWriteFailed, JournalWriter, append_record, read_journal_records


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().split(b"\n")


def test_records_round_trip_and_are_whole_lines(tmp_path):
    path = tmp_path / "j.jsonl"
    with JournalWriter(path) as writer:
        for seq in range(5):
            writer.append({"op": "intent", "seq": seq, "raw": "x" * seq})
    contents = read_journal_records(path)
    assert [r["seq"] for r in contents.records] == [0, 1, 2, 3, 4]
    assert contents.describe_damage() == "" and path.read_bytes().endswith(b"\n")
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_torn_tail_is_reported_and_cut_before_the_next_append(tmp_path):
    path = tmp_path / "j.jsonl"
    append_record(path, {"op": "begin"})
    append_record(path, {"op": "intent", "seq": 1})
    with open(path, "ab") as handle:
        handle.write(b'{"op":"und')  # a write cut short by a crash
    torn = read_journal_records(path)
    assert [r["op"] for r in torn.records] == ["begin", "intent"]
    assert torn.torn_tail_bytes == len(b'{"op":"und') and "torn" in torn.describe_damage()
    append_record(path, {"op": "undone", "seq": 1})
    repaired = read_journal_records(path)
    assert [r["op"] for r in repaired.records] == ["begin", "intent", "undone"]
    assert repaired.describe_damage() == ""
    assert b"und{" not in path.read_bytes()


def test_a_whole_record_missing_only_its_newline_is_kept_and_completed(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"op":"begin"}\n{"op":"intent","seq":1}')
    assert [r["op"] for r in read_journal_records(path).records] == ["begin", "intent"]
    append_record(path, {"op": "done", "seq": 1})
    assert lines_of(path) == [b'{"op":"begin"}', b'{"op":"intent","seq":1}', b'{"op":"done","seq":1}', b""]


def test_record_glued_onto_a_torn_one_by_an_older_agent_is_recovered(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_bytes(b'{"op":"begin"}\n{"op":"und{"op":"undone","seq":2}\n{"op":"end"}\n')
    contents = read_journal_records(path)
    assert [r["op"] for r in contents.records] == ["begin", "undone", "end"]
    assert contents.repaired_lines == [2] and not contents.corrupt_lines


def test_empty_and_binary_journals_read_as_what_they_are(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    assert read_journal_records(empty).empty
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01\n")
    contents = read_journal_records(binary)
    assert contents.empty and contents.corrupt_lines and contents.torn_tail_bytes == 0
    with pytest.raises(WorkFailed, match="is a directory"):
        read_journal_records(tmp_path)


@pytest.mark.live
def test_disk_full_is_a_typed_error_and_leaves_only_whole_records(tiny_tmpfs):
    path = tiny_tmpfs / "j.jsonl"
    writer = JournalWriter(path)
    appended = 0
    with pytest.raises(JournalWriteFailed, match="disk full"):
        for seq in range(100_000):
            writer.append({"op": "intent", "seq": seq, "pad": "p" * 1000})
            appended += 1
    writer.close()
    assert appended > 10
    assert path.read_bytes().endswith(b"\n"), "the partial record was cut back off"
    contents = read_journal_records(path)
    assert [r["seq"] for r in contents.records] == list(range(appended))
    assert contents.describe_damage() == ""
    # Space comes back (the admin cleans up): appending works again, nothing glued.
    filler = sorted(tiny_tmpfs.iterdir())
    assert filler == [path]
    with open(path, "r+b") as handle:  # make room by dropping the last half of the records
        keep = len(b"".join(line + b"\n" for line in lines_of(path)[: appended // 2]))
        handle.truncate(keep)
    append_record(path, {"op": "end"})
    assert read_journal_records(path).records[-1] == {"op": "end"}
    assert all(json.loads(line) for line in lines_of(path) if line)
