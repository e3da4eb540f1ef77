"""One self-contained HTML page per bundle: `guardian-agent report BUNDLE [--out FILE.html]`.

Jinja2 lays out the page (reports/templates/report.html.j2, autoescaped: a process name or a
query is text, never markup); sections come from reports/html_sections.py; charts are inline
SVG drawn by matplotlib (reports/html_charts.py). The page fetches nothing: no CDN, no font, no
script from elsewhere (its Content-Security-Policy forbids it), so it opens from disk on an
air-gapped trading host and can be mailed as one file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from core.atomic import write_text_atomic
from core.errors import BadInput
from reports.html_blocks import Note
from reports.html_data import ReportSource, open_source

REPORT_NAME = "report.html"
TEMPLATE_NAME = "report.html.j2"


@dataclass
class RenderedReport:
    path: Path
    size_bytes: int
    seconds: float
    sections: int


def render_html(source: ReportSource) -> str:
    from core import __version__
    from reports.html_sections import build_sections

    sections = build_sections(source)
    aggregated = [f"{section.title}" for section in sections
                  if any(isinstance(block, Note) and block.level == "aggregated" for block in section.blocks)]
    manifest = source.manifest
    return _template().render(
        kind=source.kind, run_id=manifest.get("run_id", source.path.name), host=manifest.get("host"),
        started_at=manifest.get("started_at", ""), duration_s=manifest.get("duration_s"),
        agent=manifest.get("agent", __version__), sections=sections, aggregated=", ".join(aggregated),
        rendered_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), source_path=str(source.path),
    )


def _template():
    # Jinja2 on first use (80 ms to import here): only rendering needs it (--no-html never does).
    import jinja2

    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("reports", "templates"),
        autoescape=True, trim_blocks=True, lstrip_blocks=True, undefined=jinja2.ChainableUndefined)
    return environment.get_template(TEMPLATE_NAME)


def default_report_path(bundle: Path) -> Path:
    bundle = Path(bundle)
    return (bundle.parent if bundle.is_file() else bundle) / REPORT_NAME


def validate_report_out(out: Path) -> Path:
    out = Path(out)
    if out.exists() and out.is_dir():
        raise BadInput(f"--out {out}: is a directory (give a file name, e.g. report.html)")
    if not out.parent.exists():
        raise BadInput(f"--out {out}: directory {out.parent} does not exist")
    return out


def write_report(bundle: Path, out: Path | None = None) -> RenderedReport:
    """Render BUNDLE (a bundle, a gate decision record or a decision file) to OUT atomically."""
    started = time.monotonic()
    source = open_source(Path(bundle))
    out = validate_report_out(out if out is not None else default_report_path(bundle))
    page = render_html(source)
    write_text_atomic(page, out)
    return RenderedReport(out, len(page.encode()), time.monotonic() - started, page.count("<section "))
