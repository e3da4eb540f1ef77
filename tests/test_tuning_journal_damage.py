"""A tuning journal damaged in the middle (edited by hand, bit rot, a binary file put in its place)
is bad input: exit 2 and one line naming the file and the line, the journal kept as it is; a
torn *tail* (a write cut short) still rolls back everything before it. Journals are written by
a real `tune apply` on the fake /proc + /sys tree, then damaged here."""

from __future__ import annotations

import shutil

import pytest

from tests.test_tuning_fake_tree import FAKE, snapshot
from tests.test_tuning_lose_nothing import PROFILE, tune


@pytest.fixture
def applied(tmp_path):
    root = tmp_path / "root"
    shutil.copytree(FAKE, root, symlinks=True)
    state = tmp_path / "state"
    before = snapshot(root)
    result = tune(root, state, "apply", "--profile", PROFILE, "--yes")
    assert result.returncode == 0, result.stderr
    assert snapshot(root) != before
    return root, state, before


# Each class of damage in the middle: text that is not JSON, JSON that is not an object, bytes
# that are not UTF-8.
@pytest.mark.parametrize("garbage", [b"this line was edited by hand", b"[1, 2, 3]", b"\xff\xfe\x00\x89PNG"])
def test_damage_in_the_middle_is_exit_2_naming_file_and_line(applied, garbage):
    root, state, _ = applied
    journal = state / "journal.jsonl"
    lines = journal.read_bytes().split(b"\n")
    lines[2] = garbage
    journal.write_bytes(b"\n".join(lines))
    damaged = journal.read_bytes()
    for verb in ("rollback", "status"):
        result = tune(root, state, verb)
        assert result.returncode == 2, (verb, result.stdout, result.stderr)
        error_lines = result.stderr.strip().splitlines()
        assert len(error_lines) == 1 and f"{journal}:3:" in error_lines[0], result.stderr
        assert "Traceback" not in result.stderr
    assert journal.read_bytes() == damaged


def test_a_wholly_binary_journal_is_kept_and_refused(applied):
    root, state, _ = applied
    journal = state / "journal.jsonl"
    journal.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00\x01\n")
    result = tune(root, state, "rollback")
    assert result.returncode == 2 and f"{journal}:1:" in result.stderr, result.stderr
    assert journal.exists()


def test_torn_tail_still_rolls_back_every_record_before_it(applied):
    root, state, before = applied
    journal = state / "journal.jsonl"
    data = journal.read_bytes()
    journal.write_bytes(data + b'{"op":"undone","se')
    result = tune(root, state, "rollback")
    assert result.returncode == 0, result.stderr
    assert snapshot(root) == before
