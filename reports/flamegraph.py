"""Flame graphs from folded stacks: a searchable SVG, a speedscope profile, and a differential SVG.

Everything here is a pure function over folded stacks (``"root;child;leaf" -> samples``), so the
stacks probe (py-spy or perf), the `stacks diff` command and the tests all share one renderer.

Why hand-written: Brendan Gregg's flamegraph.pl is Perl and inferno is Rust; py-spy renders only
its own samples and cannot draw perf stacks or a two-profile difference. No maintained Python
package writes a self-contained, searchable SVG, so the ~200 lines below do, following the
flamegraph.pl conventions users know (root at the bottom, children sorted by name so identical
paths merge, click to zoom, Ctrl-F to search, full name and share in each frame's tooltip).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping
from xml.sax.saxutils import escape, quoteattr

__all__ = [
    "StackTree",
    "build_tree",
    "flamegraph_svg",
    "speedscope_profile",
    "frame_key",
    "normalize_stacks",
    "diff_frames",
    "differential_svg",
    "FrameChange",
]

IMAGE_WIDTH_PX = 1200
FRAME_HEIGHT_PX = 16
FONT_SIZE_PX = 12
# Verdana at 12 px averages ~0.59 em per character; used to decide how much of a name fits.
CHAR_WIDTH_PX = FONT_SIZE_PX * 0.59
PAD_TOP_PX = 48
PAD_BOTTOM_PX = 30
PAD_SIDE_PX = 10
# Frames narrower than this are not drawn (they still count in their parents' widths), which
# keeps a 100k-stack profile to a browser-friendly number of elements.
MIN_FRAME_WIDTH_PX = 0.3

_LINE_NUMBER = re.compile(r"(\([^()]*?):\d+\)$")


@dataclass
class StackTree:
    """One frame in the merged call tree; `value` is inclusive (the frame and everything above)."""

    name: str
    value: float = 0.0
    children: dict[str, "StackTree"] = field(default_factory=dict)
    # For differential trees: the frame's inclusive share of each profile (0..1).
    baseline_share: float = 0.0
    candidate_share: float = 0.0

    def child(self, name: str) -> "StackTree":
        node = self.children.get(name)
        if node is None:
            node = self.children[name] = StackTree(name)
        return node


def split_stack(stack: str) -> list[str]:
    return [frame for frame in stack.split(";") if frame]


def build_tree(folded: Mapping[str, float] | Iterable[tuple[str, float]]) -> StackTree:
    items = folded.items() if isinstance(folded, Mapping) else folded
    root = StackTree("all")
    for stack, samples in items:
        if samples <= 0:
            continue
        root.value += samples
        node = root
        for frame in split_stack(stack):
            node = node.child(frame)
            node.value += samples
    return root


def frame_key(frame: str) -> str:
    """A frame's identity across builds: `f (mod.py:12)` and `f (mod.py:40)` are the same function
    once code above it moved, so line numbers are dropped for comparisons."""
    return _LINE_NUMBER.sub(r"\1)", frame)


def normalize_stacks(folded: Mapping[str, float] | Iterable[tuple[str, float]]) -> dict[str, float]:
    """Merge stacks that differ only in line numbers (input to the differential graph)."""
    items = folded.items() if isinstance(folded, Mapping) else folded
    merged: dict[str, float] = {}
    for stack, samples in items:
        key = ";".join(frame_key(frame) for frame in split_stack(stack))
        merged[key] = merged.get(key, 0) + samples
    return merged


# ---------------------------------------------------------------------------------------------
# Layout and SVG


@dataclass
class _Box:
    node: StackTree
    depth: int
    x_px: float
    width_px: float


def _layout(root: StackTree, width_of) -> tuple[list[_Box], int]:
    """Place every frame: x from the cumulative width of its left siblings, y from its depth."""
    total = width_of(root)
    if total <= 0:
        return [], 0
    scale = (IMAGE_WIDTH_PX - 2 * PAD_SIDE_PX) / total
    boxes: list[_Box] = []
    max_depth = 0
    pending = [(root, 0, float(PAD_SIDE_PX))]
    while pending:
        node, depth, x_px = pending.pop()
        width_px = width_of(node) * scale
        if width_px < MIN_FRAME_WIDTH_PX:
            continue
        boxes.append(_Box(node, depth, x_px, width_px))
        max_depth = max(max_depth, depth)
        child_x = x_px
        for name in sorted(node.children):
            child = node.children[name]
            pending.append((child, depth + 1, child_x))
            child_x += width_of(child) * scale
    boxes.sort(key=lambda box: (box.depth, box.x_px))
    return boxes, max_depth


def _fitted_text(name: str, width_px: float) -> str:
    fits = int((width_px - 6) / CHAR_WIDTH_PX)
    if fits < 3:
        return ""
    return name if len(name) <= fits else name[: fits - 2] + ".."


def _name_hash(name: str) -> float:
    digest = hashlib.blake2b(frame_key(name).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") / 0xFFFFFFFF


def frame_colour(name: str) -> str:
    """Deterministic colours, so one function keeps its colour across graphs. Python frames
    (`func (file.py:N)`) are yellow, kernel frames (`[k]`) orange, other native frames red."""
    vary = _name_hash(name)
    if name.endswith("[k]"):
        red, green, blue = 230, int(120 + 50 * vary), 30
    elif ".py" in name or name.endswith(")") and "(<" in name:
        red, green, blue = int(205 + 50 * vary), int(175 + 50 * vary), int(40 + 30 * vary)
    elif name == "all":
        red, green, blue = 200, 200, 200
    else:
        red, green, blue = int(200 + 55 * vary), int(80 + 60 * vary), int(50 + 40 * vary)
    return f"rgb({red},{green},{blue})"


def _svg_document(boxes: list[_Box], max_depth: int, title: str, subtitle: str,
                  fill_of, tooltip_of) -> str:
    height_px = PAD_TOP_PX + PAD_BOTTOM_PX + (max_depth + 1) * FRAME_HEIGHT_PX
    bottom_px = height_px - PAD_BOTTOM_PX
    parts = [
        '<?xml version="1.0" standalone="no"?>',
        f'<svg version="1.1" xmlns="http://www.w3.org/2000/svg" width="{IMAGE_WIDTH_PX}" '
        f'height="{height_px}" viewBox="0 0 {IMAGE_WIDTH_PX} {height_px}" onload="init(evt)">',
        "<style>text { font-family: Verdana, sans-serif; font-size: %dpx; fill: #000; } "
        "#frames g:hover rect { stroke: #000; stroke-width: 0.5; } #frames g { cursor: pointer; } "
        ".ui { cursor: pointer; }</style>" % FONT_SIZE_PX,
        f"<script><![CDATA[{_SCRIPT}]]></script>",
        f'<rect x="0" y="0" width="{IMAGE_WIDTH_PX}" height="{height_px}" fill="#f8f8f4"/>',
        f'<text x="{IMAGE_WIDTH_PX / 2}" y="20" text-anchor="middle" style="font-size:16px">'
        f"{escape(title)}</text>",
        f'<text x="{IMAGE_WIDTH_PX / 2}" y="38" text-anchor="middle" fill="#555">{escape(subtitle)}</text>',
        f'<text id="reset" class="ui" x="{PAD_SIDE_PX}" y="20" visibility="hidden">Reset zoom</text>',
        f'<text id="search" class="ui" x="{IMAGE_WIDTH_PX - PAD_SIDE_PX}" y="20" text-anchor="end">Search (Ctrl-F)</text>',
        f'<text id="matched" x="{IMAGE_WIDTH_PX - PAD_SIDE_PX}" y="{height_px - 10}" text-anchor="end"> </text>',
        f'<text id="details" x="{PAD_SIDE_PX}" y="{height_px - 10}"> </text>',
        '<g id="frames">',
    ]
    for box in boxes:
        y_px = bottom_px - (box.depth + 1) * FRAME_HEIGHT_PX
        name = box.node.name
        parts.append(
            f"<g data-name={quoteattr(name)} data-depth=\"{box.depth}\">"
            f"<title>{escape(tooltip_of(box.node))}</title>"
            f'<rect x="{box.x_px:.2f}" y="{y_px}" width="{box.width_px:.2f}" height="{FRAME_HEIGHT_PX - 1}" '
            f'fill="{fill_of(box.node)}" rx="2" ry="2"/>'
            f'<text x="{box.x_px + 3:.2f}" y="{y_px + FRAME_HEIGHT_PX - 4}">'
            f"{escape(_fitted_text(name, box.width_px))}</text></g>"
        )
    parts.append("</g></svg>")
    return "\n".join(parts)


def flamegraph_svg(folded: Mapping[str, float] | Iterable[tuple[str, float]], title: str = "Flame graph",
                   subtitle: str = "") -> str:
    """A self-contained SVG flame graph (open it in a browser: click to zoom, Ctrl-F to search)."""
    root = build_tree(folded)
    total = root.value
    boxes, max_depth = _layout(root, lambda node: node.value)

    def tooltip(node: StackTree) -> str:
        share = 100.0 * node.value / total if total else 0.0
        return f"{node.name} ({node.value:,.0f} samples, {share:.2f}%)"

    subtitle = subtitle or f"{total:,.0f} samples"
    return _svg_document(boxes, max_depth, title, subtitle, lambda node: frame_colour(node.name), tooltip)


# ---------------------------------------------------------------------------------------------
# Differential


@dataclass(frozen=True)
class FrameChange:
    """A function's share of samples in both runs, in percent: self (on top of the stack, running
    its own code) and inclusive (anywhere on the stack)."""

    frame: str
    baseline_pct: float
    candidate_pct: float
    baseline_inclusive_pct: float = 0.0
    candidate_inclusive_pct: float = 0.0

    @property
    def change_pts(self) -> float:
        return self.candidate_pct - self.baseline_pct

    @property
    def inclusive_change_pts(self) -> float:
        return self.candidate_inclusive_pct - self.baseline_inclusive_pct


def _shares(folded: Mapping[str, float]) -> tuple[dict[str, float], dict[str, float]]:
    """Inclusive and self share (0..1) of each function (frame key); recursion counts once."""
    total = sum(value for value in folded.values() if value > 0)
    inclusive: dict[str, float] = {}
    self_share: dict[str, float] = {}
    if total <= 0:
        return inclusive, self_share
    for stack, samples in folded.items():
        if samples <= 0:
            continue
        frames = [frame_key(frame) for frame in split_stack(stack)]
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0.0) + samples / total
        if frames:
            self_share[frames[-1]] = self_share.get(frames[-1], 0.0) + samples / total
    return inclusive, self_share


def diff_frames(baseline: Mapping[str, float], candidate: Mapping[str, float],
                limit: int = 10, grew: bool = True) -> list[FrameChange]:
    """Functions whose self share of samples changed most (grew, or shrank with grew=False).

    Self share ranks where the CPU time went: the callers of a grown function also grow
    inclusively, and a renamed entry point grows 100 points inclusively without costing anything.
    Shares, not sample counts, are compared: the two runs may differ in length or rate."""
    base_inclusive, base_self = _shares(baseline)
    cand_inclusive, cand_self = _shares(candidate)
    changes = [
        FrameChange(frame, 100.0 * base_self.get(frame, 0.0), 100.0 * cand_self.get(frame, 0.0),
                    100.0 * base_inclusive.get(frame, 0.0), 100.0 * cand_inclusive.get(frame, 0.0))
        for frame in set(base_self) | set(cand_self)
    ]
    if grew:
        changes = [c for c in changes if c.change_pts > 1e-9]
        changes.sort(key=lambda c: (-c.change_pts, c.frame))
    else:
        changes = [c for c in changes if c.change_pts < -1e-9]
        changes.sort(key=lambda c: (c.change_pts, c.frame))
    return changes[:limit]


def build_differential_tree(baseline: Mapping[str, float], candidate: Mapping[str, float]) -> StackTree:
    """A merged tree of both profiles. Each frame is as wide as the mean of its two shares, so a
    function present in only one run still shows (a hot path that vanished is half its old width)."""
    baseline = normalize_stacks(baseline)
    candidate = normalize_stacks(candidate)
    base_total = sum(v for v in baseline.values() if v > 0) or 1.0
    cand_total = sum(v for v in candidate.values() if v > 0) or 1.0
    root = StackTree("all")
    for folded, total, attribute in ((baseline, base_total, "baseline_share"),
                                     (candidate, cand_total, "candidate_share")):
        for stack, samples in folded.items():
            if samples <= 0:
                continue
            share = samples / total
            node = root
            setattr(node, attribute, getattr(node, attribute) + share)
            for frame in split_stack(stack):
                node = node.child(frame)
                setattr(node, attribute, getattr(node, attribute) + share)
    pending = [root]
    while pending:
        node = pending.pop()
        node.value = (node.baseline_share + node.candidate_share) / 2
        pending.extend(node.children.values())
    return root


def self_shares(node: StackTree) -> tuple[float, float]:
    """The frame's own (self) share of each profile: samples where it was the leaf, i.e. its
    inclusive share minus its children's."""
    children_base = sum(child.baseline_share for child in node.children.values())
    children_cand = sum(child.candidate_share for child in node.children.values())
    return max(0.0, node.baseline_share - children_base), max(0.0, node.candidate_share - children_cand)


def differential_svg(baseline: Mapping[str, float], candidate: Mapping[str, float],
                     title: str = "Differential flame graph", subtitle: str = "") -> str:
    """Red frames grew their own (self) share of samples from baseline to candidate, blue ones
    shrank; the deeper the colour, the larger the change (full colour = the largest self change
    in the graph). As in flamegraph.pl's --diff (difffolded.pl), a frame is coloured by the
    change in the samples where it is on top of the stack: a grown leaf paints itself, not every
    caller below it (which would paint `main` the deepest red in every graph)."""
    root = build_differential_tree(baseline, candidate)
    boxes, max_depth = _layout(root, lambda node: node.value)
    changes = {id(box.node): self_shares(box.node) for box in boxes}
    largest = max((abs(cand - base) for base, cand in changes.values()), default=0.0)
    # Below 2 percentage points a change is within sampling noise for typical runs; do not let a
    # graph with no real change paint its noise in full colour.
    scale = max(largest, 0.02)

    def fill(node: StackTree) -> str:
        base, cand = changes[id(node)]
        delta = (cand - base) / scale
        if abs(delta) < 1e-9:  # float noise from normalising, not a change
            delta = 0.0
        strength = min(1.0, abs(delta))
        fade = int(235 - 155 * strength)
        if delta > 0:
            return f"rgb(240,{fade},{fade})"
        if delta < 0:
            return f"rgb({fade},{fade},240)"
        return "rgb(235,235,235)"

    def tooltip(node: StackTree) -> str:
        base_self, cand_self = (100 * share for share in changes[id(node)])
        base, cand = 100 * node.baseline_share, 100 * node.candidate_share
        return (f"{node.name} (self {base_self:.2f}% -> {cand_self:.2f}%, {cand_self - base_self:+.2f} pts; "
                f"total {base:.2f}% -> {cand:.2f}%, {cand - base:+.2f} pts)")

    subtitle = subtitle or ("red: own (self) share of samples grew, blue: shrank "
                            "(width: mean total share of both runs)")
    return _svg_document(boxes, max_depth, title, subtitle, fill, tooltip)


# ---------------------------------------------------------------------------------------------
# speedscope


def speedscope_profile(profiles: Mapping[str, Mapping[str, float] | Iterable[tuple[str, float]]],
                       name: str = "guardian-agent stacks", unit: str = "none",
                       units: Mapping[str, str] | None = None) -> dict:
    """A speedscope document (https://www.speedscope.app/file-format-schema.json) with one
    "sampled" profile per key (thread or process). A mapping is one weighted sample per distinct
    stack; a sequence of (stack, weight) keeps its order, which speedscope's Time Order view
    shows as time. `units` overrides `unit` per profile (py-spy weights are seconds)."""
    frames: list[dict] = []
    index_of: dict[str, int] = {}
    documents = []
    for profile_name, folded in profiles.items():
        items = folded.items() if isinstance(folded, Mapping) else folded
        samples, weights = [], []
        for stack, count in items:
            if count <= 0:
                continue
            indexes = []
            for frame in split_stack(stack):
                if frame not in index_of:
                    index_of[frame] = len(frames)
                    frames.append(_speedscope_frame(frame))
                indexes.append(index_of[frame])
            samples.append(indexes)
            weights.append(count)
        documents.append({
            "type": "sampled", "name": profile_name, "unit": (units or {}).get(profile_name, unit),
            "startValue": 0, "endValue": sum(weights), "samples": samples, "weights": weights,
        })
    return {
        "$schema": "https://www.speedscope.app/file-format-schema.json",
        "exporter": "guardian-agent",
        "name": name,
        "activeProfileIndex": 0,
        "shared": {"frames": frames},
        "profiles": documents,
    }


_PYTHON_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _speedscope_frame(frame: str) -> dict:
    match = _PYTHON_FRAME.match(frame)
    if match and match.group("line"):
        return {"name": match.group("name"), "file": match.group("file"), "line": int(match.group("line"))}
    return {"name": frame}


def speedscope_json(profiles, name: str = "guardian-agent stacks") -> str:
    return json.dumps(speedscope_profile(profiles, name), separators=(",", ":"))


# Click to zoom, Ctrl-F / "Search" to highlight frames matching a regular expression and show the
# share of samples they cover (overlapping matches counted once), "Reset zoom" to go back.
_SCRIPT = r"""
var svg, frames, details, matchedText, resetButton, sidePad = %SIDE%, fullWidth = %WIDTH%;
function init(evt) {
  svg = document.documentElement;
  frames = Array.prototype.slice.call(document.querySelectorAll('#frames > g'));
  details = document.getElementById('details');
  matchedText = document.getElementById('matched');
  resetButton = document.getElementById('reset');
  frames.forEach(function (g) {
    var r = g.querySelector('rect');
    g.dataset.x = r.getAttribute('x'); g.dataset.w = r.getAttribute('width');
    g.addEventListener('click', function () { zoom(g); });
    g.addEventListener('mouseover', function () { details.textContent = g.querySelector('title').textContent; });
    g.addEventListener('mouseout', function () { details.textContent = ' '; });
  });
  resetButton.addEventListener('click', function () { unzoom(); });
  document.getElementById('search').addEventListener('click', function () { search(); });
  window.addEventListener('keydown', function (e) {
    if ((e.ctrlKey || e.metaKey) && e.key === 'f') { e.preventDefault(); search(); }
  });
}
function fit(g, x, w) {
  var r = g.querySelector('rect'), t = g.querySelector('text'), name = g.dataset.name;
  r.setAttribute('x', x); r.setAttribute('width', w); t.setAttribute('x', x + 3);
  var n = Math.floor((w - 6) / %CHAR%);
  t.textContent = n < 3 ? '' : (name.length <= n ? name : name.substring(0, n - 2) + '..');
}
function zoom(target) {
  var zx = parseFloat(target.dataset.x), zw = parseFloat(target.dataset.w);
  var depth = parseInt(target.dataset.depth), scale = (fullWidth - 2 * sidePad) / zw;
  frames.forEach(function (g) {
    var x = parseFloat(g.dataset.x), w = parseFloat(g.dataset.w), d = parseInt(g.dataset.depth);
    var inside = x >= zx - 0.01 && x + w <= zx + zw + 0.01;
    if (d < depth && x <= zx + 0.01 && x + w >= zx + zw - 0.01) {
      g.style.display = ''; g.style.opacity = 0.6; fit(g, sidePad, fullWidth - 2 * sidePad);
    } else if (d >= depth && inside) {
      g.style.display = ''; g.style.opacity = 1; fit(g, sidePad + (x - zx) * scale, w * scale);
    } else { g.style.display = 'none'; }
  });
  resetButton.setAttribute('visibility', 'visible');
}
function unzoom() {
  frames.forEach(function (g) {
    g.style.display = ''; g.style.opacity = 1;
    fit(g, parseFloat(g.dataset.x), parseFloat(g.dataset.w));
  });
  resetButton.setAttribute('visibility', 'hidden');
}
function search() {
  var term = prompt('Search frames (regular expression); empty clears', '');
  if (term === null) return;
  var re = null, covered = [], rootWidth = 0;
  try { re = term ? new RegExp(term) : null; } catch (err) { alert('Bad expression: ' + err); return; }
  frames.forEach(function (g) {
    var r = g.querySelector('rect');
    if (!g.dataset.fill) g.dataset.fill = r.getAttribute('fill');
    if (g.dataset.depth === '0') rootWidth = parseFloat(g.dataset.w);
    if (re && re.test(g.dataset.name)) {
      r.setAttribute('fill', 'rgb(230,0,230)');
      covered.push([parseFloat(g.dataset.x), parseFloat(g.dataset.x) + parseFloat(g.dataset.w)]);
    } else { r.setAttribute('fill', g.dataset.fill); }
  });
  covered.sort(function (a, b) { return a[0] - b[0]; });
  var total = 0, end = -1;
  covered.forEach(function (c) {
    if (c[0] >= end) { total += c[1] - c[0]; end = c[1]; }
    else if (c[1] > end) { total += c[1] - end; end = c[1]; }
  });
  matchedText.textContent = re ? 'Matched: ' + (rootWidth ? (100 * total / rootWidth).toFixed(1) : '0') + '%' : ' ';
}
""".replace("%SIDE%", str(PAD_SIDE_PX)).replace("%WIDTH%", str(IMAGE_WIDTH_PX)).replace(
    "%CHAR%", f"{CHAR_WIDTH_PX:.3f}")
