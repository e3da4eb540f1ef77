"""Charts for the HTML report: matplotlib drawn to inline SVG.

Why matplotlib SVG (see README "Reports"): it is the best-kept plotting library in the Python
ecosystem, needs no JavaScript (a page opens from disk on an air-gapped host and cannot raise
console errors from a charting runtime), and an SVG chart of aggregated data weighs 10-40 kB,
where Plotly inlines ~4.6 MB of JavaScript into every page. What it cannot do is hover and zoom;
every chart sits next to a table with the exact numbers, and the browser zooms SVG losslessly.
Charts are drawn from aggregates (buckets, per-second quantiles), never from raw rows, so a
million-row table costs the same as a thousand-row one.
"""

from __future__ import annotations

import io
import re
from typing import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on a server; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import LogFormatter  # noqa: E402

matplotlib.rcParams.update({
    "svg.fonttype": "none",  # text stays text: smaller, selectable, searchable with Ctrl-F
    "svg.hashsalt": "guardian-agent",  # stable element ids: the same bundle renders the same page
    "font.size": 9,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "figure.dpi": 100,
})

WIDTH_IN = 7.5
HEIGHT_IN = 2.8
PALETTE = ("#3b6fb6", "#d9822b", "#3a9a5b", "#c23b3b", "#7d5ba6", "#8c6d46", "#c75aa8", "#6f6f6f",
           "#b5b82c", "#2bb5c2")
_XML_HEADER = re.compile(r"^<\?xml[^>]*>\s*(<!DOCTYPE[^>]*>\s*)?", re.S)
_METADATA = re.compile(r"<metadata>.*?</metadata>\s*", re.S)


def _svg(figure) -> str:
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg", bbox_inches="tight", metadata={"Date": None})
    plt.close(figure)
    # The RDF metadata block (creator, date) is a kilobyte per chart that no reader sees.
    return _METADATA.sub("", _XML_HEADER.sub("", buffer.getvalue()), count=1)


class _PlainLogFormatter(LogFormatter):
    """Log-axis tick labels as plain text (1k, 10k, 1M) instead of matplotlib's default 10^n,
    which goes through mathtext: parsing and laying out those labels was ~40% of a log-scale
    chart's drawing time (matplotlib 3.11), and every audit and rollout report draws several.
    Which ticks get a label (decades, minor ticks on a short axis) is LogFormatter's, unchanged."""

    def _num_to_string(self, x, vmin, vmax):
        return compact_number(x)


def compact_number(value: float) -> str:
    """1, 250, 1k, 20k, 3.5M: a tick label a reader takes in at a glance."""
    for suffix, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:.3g}"


def _plain_log_labels(axis) -> None:
    """After set_xscale/set_yscale("log"): the same ticks, labelled without mathtext."""
    axis.set_major_formatter(_PlainLogFormatter())  # the same arguments as LogScale's defaults
    axis.set_minor_formatter(_PlainLogFormatter())


def _figure(height_in: float = HEIGHT_IN):
    return plt.subplots(figsize=(WIDTH_IN, height_in))


def format_ns(value_ns: float) -> str:
    """1.5 µs, 12 ms, 3.2 s: latency labels a reader does not have to count zeros in."""
    value_ns = float(value_ns)
    for unit, scale in (("s", 1e9), ("ms", 1e6), ("µs", 1e3)):
        if abs(value_ns) >= scale:
            return f"{value_ns / scale:.3g} {unit}"
    return f"{value_ns:.3g} ns"


def log2_histogram_svg(buckets: Sequence[tuple[int, int, int]], title: str) -> str:
    """Bars of a log2 latency histogram, one per bucket, labelled with the bucket's low edge."""
    figure, axes = _figure()
    labels = [format_ns(lo) for lo, _hi, _count in buckets]
    counts = [count for _lo, _hi, count in buckets]
    axes.bar(range(len(counts)), counts, color=PALETTE[0], width=0.85)
    axes.set_xticks(range(len(counts)), labels, rotation=45, ha="right")
    if counts and max(counts) > 1000 * max(1, min(counts)):
        axes.set_yscale("log")
        _plain_log_labels(axes.yaxis)
    axes.set_ylabel("count")
    axes.set_title(title, loc="left")
    return _svg(figure)


def cdf_svg(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str) -> str:
    """Empirical CDFs: name -> (x values ascending, cumulative fraction), log x axis."""
    figure, axes = _figure()
    for index, (name, (xs, fractions)) in enumerate(series.items()):
        axes.step(xs, fractions, where="post", label=name, color=PALETTE[index % len(PALETTE)])
    axes.set_xscale("log")
    _plain_log_labels(axes.xaxis)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("fraction ≤ x")
    axes.set_ylim(0, 1.01)
    axes.set_title(title, loc="left")
    if len(series) > 1:
        axes.legend(fontsize=7, loc="lower right")
    return _svg(figure)


def stacked_bars_svg(categories: Sequence[str], stacks: dict[str, Sequence[float]], title: str,
                     ylabel: str) -> str:
    figure, axes = _figure()
    bottom = [0.0] * len(categories)
    for index, (name, values) in enumerate(stacks.items()):
        axes.bar(categories, values, bottom=bottom, label=name, color=PALETTE[index % len(PALETTE)], width=0.8)
        bottom = [b + (v or 0.0) for b, v in zip(bottom, values)]
    axes.set_ylabel(ylabel)
    axes.set_title(title, loc="left")
    axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))  # beside, never over the bars
    if len(categories) > 16:
        axes.tick_params(axis="x", labelrotation=90)
    return _svg(figure)


def grouped_bars_svg(categories: Sequence[str], groups: dict[str, Sequence[float]], title: str,
                     ylabel: str, log_y: bool = False) -> str:
    figure, axes = _figure()
    width = 0.8 / max(1, len(groups))
    for index, (name, values) in enumerate(groups.items()):
        positions = [i + index * width for i in range(len(categories))]
        axes.bar(positions, [v or 0.0 for v in values], width=width, label=name,
                 color=PALETTE[index % len(PALETTE)])
    axes.set_xticks([i + 0.4 - width / 2 for i in range(len(categories))], categories,
                    rotation=45 if len(categories) > 6 else 0, ha="right" if len(categories) > 6 else "center")
    if log_y:
        axes.set_yscale("log")
        _plain_log_labels(axes.yaxis)
    axes.set_ylabel(ylabel)
    axes.set_title(title, loc="left")
    if len(groups) > 1:
        axes.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _svg(figure)


def lines_svg(series: dict[str, tuple[Sequence[float], Sequence[float]]], title: str, xlabel: str,
              ylabel: str, markers: Sequence[tuple[float, str]] = (), log_y: bool = False,
              step: bool = False) -> str:
    """Lines over time (x in seconds from the start); `markers` are vertical decision lines."""
    figure, axes = _figure()
    for index, (name, (xs, ys)) in enumerate(series.items()):
        colour = PALETTE[index % len(PALETTE)]
        if step:
            axes.step(xs, ys, where="post", label=name, color=colour)
        else:
            axes.plot(xs, ys, label=name, color=colour, linewidth=1.2)
    for x, label in markers:
        axes.axvline(x, color="#555", linestyle="--", linewidth=0.8)
        axes.annotate(label, (x, 1.0), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                      va="top", ha="right")
    if log_y:
        axes.set_yscale("log")
        _plain_log_labels(axes.yaxis)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title, loc="left")
    if len(series) > 1:
        axes.legend(fontsize=7, ncol=min(4, len(series)))
    return _svg(figure)


def intervals_svg(names: Sequence[str], estimates: Sequence[float], lows: Sequence[float],
                  highs: Sequence[float], thresholds: Sequence[float | None], colours: Sequence[str],
                  title: str) -> str:
    """Each metric's effect with its interval (horizontal error bar) against its threshold."""
    height = max(1.6, 0.35 * len(names) + 0.8)
    figure, axes = _figure(height)
    positions = list(range(len(names)))[::-1]
    for y, estimate, low, high, threshold, colour in zip(positions, estimates, lows, highs, thresholds, colours):
        if low is not None and high is not None:
            axes.plot([low, high], [y, y], color=colour, linewidth=2.5, solid_capstyle="butt")
        if estimate is not None:
            axes.plot([estimate], [y], "o", color=colour)
        if threshold is not None:
            axes.plot([threshold, threshold], [y - 0.35, y + 0.35], color="#c23b3b", linewidth=1.2)
            axes.plot([-threshold, -threshold], [y - 0.35, y + 0.35], color="#c23b3b", linewidth=0.6,
                      linestyle=":")
    axes.axvline(0, color="#333", linewidth=0.8)
    axes.set_yticks(positions, names)
    axes.set_xlabel("effect, candidate vs baseline (% or pp); red ticks: threshold")
    axes.set_title(title, loc="left")
    return _svg(figure)
