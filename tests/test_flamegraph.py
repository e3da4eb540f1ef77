"""Flame graph, differential graph and speedscope writers (pure functions over folded stacks)."""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET

import pytest

from reports.flamegraph import (
    build_differential_tree,
    build_tree,
    diff_frames,
    differential_svg,
    flamegraph_svg,
    frame_key,
    normalize_stacks,
    speedscope_profile,
)

SVG = "{http://www.w3.org/2000/svg}"

FOLDED = {
    "main (app.py:1);run (app.py:10);parse_order (orders.py:5)": 60,
    "main (app.py:1);run (app.py:10);send (net.py:3);tcp_sendmsg [k]": 25,
    "main (app.py:1);wait (threading.py:300)": 15,
}


def frames_of(svg_text: str) -> dict[str, dict]:
    """name -> {width, fill, title} for every drawn frame."""
    root = ET.fromstring(svg_text)
    found = {}
    for group in root.iter(f"{SVG}g"):
        name = group.get("data-name")
        if name is None:
            continue
        rect = group.find(f"{SVG}rect")
        found[name] = {"width": float(rect.get("width")), "fill": rect.get("fill"),
                       "title": group.find(f"{SVG}title").text, "x": float(rect.get("x"))}
    return found


def test_tree_values_are_inclusive():
    root = build_tree(FOLDED)
    assert root.value == 100
    main = root.children["main (app.py:1)"]
    assert main.value == 100
    assert main.children["run (app.py:10)"].value == 85
    assert main.children["run (app.py:10)"].children["parse_order (orders.py:5)"].value == 60


def test_svg_parses_and_widths_follow_samples():
    svg = flamegraph_svg(FOLDED, title="orders")
    frames = frames_of(svg)
    assert {"all", "main (app.py:1)", "parse_order (orders.py:5)", "tcp_sendmsg [k]"} <= set(frames)
    full = frames["all"]["width"]
    assert frames["parse_order (orders.py:5)"]["width"] == pytest.approx(0.60 * full, rel=1e-3)
    assert frames["wait (threading.py:300)"]["width"] == pytest.approx(0.15 * full, rel=1e-3)
    assert "60.00%" in frames["parse_order (orders.py:5)"]["title"]
    # Searchable: the search and zoom script is embedded, and every frame carries its full name.
    assert "function search()" in svg and "function zoom(" in svg
    # Kernel frames are coloured apart from Python frames.
    assert frames["tcp_sendmsg [k]"]["fill"] != frames["parse_order (orders.py:5)"]["fill"]


def test_svg_escapes_hostile_names():
    folded = {'<module> (a&b.py:1);f"<script>alert(1)</script>" (x.py:2)': 3}
    svg = flamegraph_svg(folded, title="t <&>")
    frames = frames_of(svg)  # would raise on broken XML
    assert 'f"<script>alert(1)</script>" (x.py:2)' in frames
    assert "<script>alert" not in svg


def test_long_names_are_truncated_to_fit_but_kept_in_tooltip():
    long_name = "a_very_long_function_name_" * 10 + " (module.py:1)"
    svg = flamegraph_svg({f"main;{long_name}": 1, "main;other": 99})
    root = ET.fromstring(svg)
    for group in root.iter(f"{SVG}g"):
        if group.get("data-name") == long_name:
            text = group.find(f"{SVG}text").text or ""
            assert len(text) < len(long_name)
            assert long_name in group.find(f"{SVG}title").text
            break
    else:
        pytest.fail("long frame not drawn")


def test_empty_profile_still_renders_valid_svg():
    ET.fromstring(flamegraph_svg({}))


def test_frame_key_drops_line_numbers_only():
    assert frame_key("handle (orders.py:42)") == "handle (orders.py)"
    assert frame_key("tcp_sendmsg [k]") == "tcp_sendmsg [k]"
    assert frame_key("<lambda> (<string>:1)") == "<lambda> (<string>)"
    assert normalize_stacks({"a (x.py:1);b (x.py:2)": 1, "a (x.py:9);b (x.py:8)": 2}) == {"a (x.py);b (x.py)": 3}


BASELINE = {"main (app.py:1);hot_alpha (x.py:3)": 80, "main (app.py:1);other (x.py:9)": 20}
CANDIDATE = {"main (app.py:2);hot_beta (x.py:7)": 140, "main (app.py:2);other (x.py:12)": 60}


def test_diff_frames_compares_shares_not_counts():
    grew = diff_frames(BASELINE, CANDIDATE)
    assert [c.frame for c in grew] == ["hot_beta (x.py)", "other (x.py)"]
    assert grew[0].baseline_pct == 0 and grew[0].candidate_pct == pytest.approx(70.0)
    assert grew[1].change_pts == pytest.approx(10.0)
    shrank = diff_frames(BASELINE, CANDIDATE, grew=False)
    assert [c.frame for c in shrank] == ["hot_alpha (x.py)"]
    assert shrank[0].change_pts == pytest.approx(-80.0)
    # main is 100% in both runs (once its moved line number is ignored): not a change.
    assert all(c.frame != "main (app.py)" for c in grew + shrank)


def test_differential_svg_shows_both_hot_functions_red_and_blue():
    svg = differential_svg(BASELINE, CANDIDATE)
    frames = frames_of(svg)
    alpha, beta = frames["hot_alpha (x.py)"], frames["hot_beta (x.py)"]
    red = re.fullmatch(r"rgb\((\d+),(\d+),(\d+)\)", beta["fill"]).groups()
    blue = re.fullmatch(r"rgb\((\d+),(\d+),(\d+)\)", alpha["fill"]).groups()
    assert int(red[0]) > int(red[2]), "grown frame must be red"
    assert int(blue[2]) > int(blue[0]), "shrunk frame must be blue"
    # Width is the mean share of both runs: alpha 40%, beta 35%.
    full = frames["all"]["width"]
    assert alpha["width"] == pytest.approx(0.40 * full, rel=1e-3)
    assert beta["width"] == pytest.approx(0.35 * full, rel=1e-3)
    assert "+70.00 pts" in beta["title"] and "-80.00 pts" in alpha["title"]


def test_differential_tree_of_identical_runs_has_no_change():
    root = build_differential_tree(BASELINE, BASELINE)
    pending = [root]
    while pending:
        node = pending.pop()
        assert node.baseline_share == pytest.approx(node.candidate_share)
        pending.extend(node.children.values())
    frames = frames_of(differential_svg(BASELINE, {k: 3 * v for k, v in BASELINE.items()}))
    assert {f["fill"] for f in frames.values()} == {"rgb(235,235,235)"}


def test_speedscope_document_is_consistent():
    document = speedscope_profile({"thread A": FOLDED, "thread B": {"main (app.py:1)": 5}})
    text = json.dumps(document)
    loaded = json.loads(text)
    assert loaded["$schema"] == "https://www.speedscope.app/file-format-schema.json"
    frames = loaded["shared"]["frames"]
    assert len(loaded["profiles"]) == 2
    first = loaded["profiles"][0]
    assert first["type"] == "sampled" and first["endValue"] == sum(first["weights"]) == 100
    for profile in loaded["profiles"]:
        assert len(profile["samples"]) == len(profile["weights"])
        for sample in profile["samples"]:
            assert all(0 <= index < len(frames) for index in sample)
    names = {frame["name"] for frame in frames}
    assert {"parse_order", "tcp_sendmsg [k]", "main"} <= names
    parse = next(frame for frame in frames if frame["name"] == "parse_order")
    assert parse["file"] == "orders.py" and parse["line"] == 5
    # Each frame appears once in the shared table even when used by both profiles.
    assert len(names) == len(frames)


def test_differential_colours_frames_by_their_own_change_not_their_callers():
    """flamegraph.pl --diff convention: the grown leaf is red; `main` and `run`, which only call
    it (no self samples in either run), stay neutral although their inclusive share grew."""
    baseline = {"main;run;work": 50, "main;idle": 50}
    candidate = {"main;run;work": 90, "main;idle": 10}
    frames = frames_of(differential_svg(baseline, candidate))
    assert frames["main"]["fill"] == frames["run"]["fill"] == "rgb(235,235,235)"
    assert frames["work"]["fill"] == "rgb(240,80,80)"  # the largest self change: full red
    assert frames["idle"]["fill"] == "rgb(80,80,240)"
    assert "self 0.00% -> 0.00%" in frames["run"]["title"] and "total 50.00% -> 90.00%" in frames["run"]["title"]


def test_speedscope_file_keeps_py_spy_samples_in_time_order():
    """Recorded py-spy output: the speedscope file written from it replays, per thread, the same
    stacks in the same order with the same total weight (speedscope's Time Order view)."""
    from pathlib import Path

    from probes.stacks import pyspy_speedscope_rows, pyspy_timeline_rows, speedscope_profiles

    document = json.loads((Path(__file__).parent / "fixtures" / "stacks" / "pyspy_subprocesses.speedscope.json")
                          .read_text())
    frames = document["shared"]["frames"]
    expected = []  # py-spy's own order, pseudo-frames (process, thread: no file) dropped
    for profile in document["profiles"]:
        for sample in profile["samples"]:
            stack = ";".join(frames[i]["name"] for i in sample if frames[i].get("file"))  # function names
            if stack:
                expected.append(stack)
    timeline = pyspy_timeline_rows(document, default_pid=1)
    written = speedscope_profile(speedscope_profiles(timeline), units={})
    # py-spy at a fixed rate weighs every sample the same (1 / rate seconds).
    sample_s = document["profiles"][0]["weights"][0]
    assert {w for p in document["profiles"] for w in p["weights"]} == {sample_s}
    replayed = []
    names = written["shared"]["frames"]
    for profile in written["profiles"]:
        for sample, weight in zip(profile["samples"], profile["weights"]):
            stack = ";".join(names[i]["name"] for i in sample)
            replayed += [stack] * round(weight / sample_s)
    assert replayed == expected
    # Merging runs of one stack loses no sample; the aggregated table still counts the same.
    assert sum(row["samples"] for row in pyspy_speedscope_rows(document, 1)) == len(expected)
    assert len(timeline) < len(expected)
