"""The pieces a report section is made of: tables, charts, notes, embedded documents.

Sections (reports/html_sections.py) build these from bundle tables; the Jinja2 template
(reports/templates/report.html.j2) lays them out. Every number a table shows is formatted here,
and a cell can carry a `key` (rendered as data-key) so tests find it and compare it with Parquet.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

# A table longer than this shows its first rows and says how many it has.
MAX_TABLE_ROWS = 50


@dataclass
class Cell:
    text: str
    key: str | None = None
    style: str = ""
    title: str = ""
    numeric: bool = False


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Cell]]
    note: str = ""
    caption: str = ""
    sortable: bool = True


@dataclass
class Chart:
    svg: str
    caption: str = ""


@dataclass
class Note:
    text: str
    level: str = "info"  # info | warning | aggregated


@dataclass
class Embed:
    """A self-contained document (flame graph SVG) shown in an iframe from a data: URL, so its own
    script (click to zoom, Ctrl-F search) runs in its own document, as it does opened alone."""

    data_url: str
    height_px: int
    caption: str = ""
    name: str = ""


@dataclass
class Section:
    anchor: str
    title: str
    blocks: list[Any] = field(default_factory=list)
    summary: str = ""


def format_value(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return "–"
        if value != 0 and abs(value) < 0.001:
            return f"{value:.3g}"
        if abs(value) >= 1e6:
            return f"{value:,.0f}"
        return f"{value:,.3f}".rstrip("0").rstrip(".")
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(item) for item in value)
    if hasattr(value, "isoformat"):
        return value.isoformat(sep=" ", timespec="seconds") if hasattr(value, "hour") else value.isoformat()
    return str(value)


def cell(value: Any, key: str | None = None, style: str = "", title: str = "") -> Cell:
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return Cell(format_value(value), key=key, style=style, title=title, numeric=numeric)


def table_from_rows(rows: list[dict], columns: list[str], key_prefix: str | None = None,
                    key_column: str | None = None, key_columns: tuple[str, ...] = (),
                    limit: int = MAX_TABLE_ROWS, total_rows: int | None = None, caption: str = "") -> Table:
    """A table of dict rows; cells of `key_columns` get data-key "<prefix>:<row key>:<column>"."""
    shown = rows[:limit]
    body = []
    for row in shown:
        row_key = str(row.get(key_column)) if key_column else None
        body.append([cell(row.get(column),
                          key=f"{key_prefix}:{row_key}:{column}" if key_prefix and row_key and column in key_columns
                          else None)
                     for column in columns])
    total = len(rows) if total_rows is None else total_rows
    note = f"first {len(shown):,} of {total:,} rows" if total > len(shown) else ""
    return Table(columns, body, note=note, caption=caption)


def heat_style(value: float, largest: float) -> str:
    """Background from white to deep orange by share of the largest value (log scale: latency
    totals span decades)."""
    if not value or largest <= 0:
        return ""
    strength = math.log1p(value) / math.log1p(largest)
    red, green, blue = 255, int(245 - 150 * strength), int(235 - 200 * strength)
    return f"background: rgb({red},{green},{blue})"
