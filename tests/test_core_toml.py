"""core/toml_config.py: one loader, one wording, key paths in every message."""

from __future__ import annotations

import pytest

from core.errors import BadInput
from core.toml_config import TomlDocument, TomlTable, load_toml, parse_toml_text, render_key_path


def root(text: str, known=None) -> TomlTable:
    return TomlTable.root(parse_toml_text(text, "plan.toml"), "plan.toml", known)


def test_key_paths_render_like_the_user_writes_them():
    assert render_key_path(("stage", 2, "weight_pct")) == "stage[2].weight_pct"
    assert render_key_path(("metrics", "turns.latency_ns", "critical")) == 'metrics."turns.latency_ns".critical'
    assert render_key_path(()) == ""


@pytest.mark.parametrize("text, call, message", [
    ("[[stage]]\nweight_pct = 10\n[[stage]]\nweight_pct = 'x'\n",
     lambda t: [s.number("weight_pct") for s in t.table_list("stage")],
     "plan.toml: stage[1].weight_pct: expected a number, got 'x'"),
    ("[[stage]]\nwieght_pct = 10\n", lambda t: t.table_list("stage", known=("weight_pct",)),
     "plan.toml: stage[0].wieght_pct: unknown key (known: weight_pct)"),
    ('[metrics."turns.latency_ns"]\ncritical = 1\n',
     lambda t: [m.boolean("critical") for _, m in t.named_tables("metrics")],
     'plan.toml: metrics."turns.latency_ns".critical: expected true or false, got 1'),
    ("[daemon]\n", lambda t: t.table("daemon").number("window_s"),
     "plan.toml: daemon.window_s: missing required key"),
    ("[daemon]\nwindow_s = 0\n", lambda t: t.table("daemon").number("window_s", positive=True),
     "plan.toml: daemon.window_s: expected a positive number, got 0"),
    ("[daemon]\nwindow_s = nan\n", lambda t: t.table("daemon").number("window_s"),
     "plan.toml: daemon.window_s: expected a number, got nan"),
    ("x = 101\n", lambda t: t.number("x", low=0, high=100), "plan.toml: x: expected a number in 0..100, got 101"),
    ("x = 1.5\n", lambda t: t.number("x", integer=True), "plan.toml: x: expected an integer, got 1.5"),
    ("x = 'maybe'\n", lambda t: t.choice("x", ("skip", "fail")), "plan.toml: x: expected one of skip, fail, got 'maybe'"),
    ("x = [1, 'a']\n", lambda t: t.integer_list("x"), "plan.toml: x: expected a list of integers"),
    ("x = true\n", lambda t: t.typed("x", (int, float)), "plan.toml: x: expected a number, got True"),
    ("daemon = 3\n", lambda t: t.table("daemon"), "plan.toml: daemon: expected a table, got 3"),
    ("surprise = 1\n", lambda t: t.check_keys(("daemon",)), "plan.toml: surprise: unknown key (known: daemon)"),
])
def test_every_error_names_the_key_path_in_one_wording(text, call, message):
    with pytest.raises(BadInput) as caught:
        call(root(text))
    assert str(caught.value) == message or str(caught.value).startswith(message)


def test_defaults_and_good_values_pass_through():
    table = root("[gate]\nconfidence = 0.9\nname = 'x'\nids = [1, 2]\n")
    gate = table.table("gate", known=("confidence", "name", "ids"))
    assert gate.number("confidence", low=0.5, high=0.9999) == 0.9
    assert gate.number("missing", 3) == 3.0 and gate.string("name") == "x"
    assert gate.integer_list("ids", positive=True) == (1, 2) and gate.boolean("flag", False) is False
    assert gate.string("optional", None) is None


@pytest.mark.parametrize("payload, message", [
    (b"\x00\x01\x02binary", "a binary file, not TOML text"),
    (b"name = '\xff\xfe'\n", "not UTF-8 text"),
    (b"[daemon\n", "not valid TOML"),
])
def test_unusable_files_are_bad_input_not_internal_errors(tmp_path, payload, message):
    path = tmp_path / "c.toml"
    path.write_bytes(payload)
    with pytest.raises(BadInput, match=message) as caught:
        load_toml(path, f"--config {path}")
    assert str(caught.value).startswith(f"--config {path}: ") and "\n" not in str(caught.value)


def test_missing_file_and_directory_are_bad_input(tmp_path):
    with pytest.raises(BadInput, match="no such file"):
        load_toml(tmp_path / "nope.toml")
    with pytest.raises(BadInput, match="is a directory"):
        load_toml(tmp_path)


def test_locate_adds_a_line_number():
    document = parse_toml_text("[a]\nb = 'x'\n", "p.toml")
    table = TomlTable.root(document, "p.toml", locate=lambda parts: 2 if parts == ("a", "b") else 1)
    with pytest.raises(BadInput, match=r"^p.toml:2: a.b: expected an integer"):
        table.table("a").number("b", integer=True)


def test_a_table_handed_on_as_a_dict_continues_its_key_path():
    """A chaos fault's spec is validated after the experiment hands it on as a dict: its keys
    continue the path (`x.toml: fault[0].delay_ms`), in the same wording."""
    table = TomlTable({"delay_ms": -1, "dealy": 2}, TomlDocument("x.toml: fault[0]", key_separator="."))
    with pytest.raises(BadInput, match=r"^x.toml: fault\[0\]\.delay_ms: expected a number in 0..10, got -1$"):
        table.number("delay_ms", low=0, high=10)
    with pytest.raises(BadInput, match=r"^x.toml: fault\[0\]\.dealy: unknown key \(known: delay_ms\)$"):
        table.check_keys(["delay_ms"])
