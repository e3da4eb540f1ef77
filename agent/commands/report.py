"""`guardian-agent report BUNDLE [--out FILE.html]`, and the `--no-html` hook the bundle-writing
commands (audit, pcap, pg-log, rollout, chaos) share: each writes BUNDLE/report.html by default."""

from __future__ import annotations

from pathlib import Path

import click

NO_HTML_OPTION = click.option("--no-html", "no_html", is_flag=True,
                              help="Do not write report.html into the bundle.")


def emit_html_report(bundle_dir: Path | None, no_html: bool) -> Path | None:
    """Write BUNDLE/report.html and print its path (the bundle's commands call this last)."""
    if no_html or bundle_dir is None:
        return None
    from reports.html import write_report

    rendered = write_report(Path(bundle_dir))
    click.echo(f"report: {rendered.path} ({rendered.size_bytes / 1e6:.2f} MB)")
    return rendered.path


@click.command(name="report")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--out", "out_path", type=click.Path(path_type=Path),
              help="HTML file to write (default: BUNDLE/report.html).")
def report(bundle: Path, out_path: Path | None) -> None:
    """Render a bundle into one self-contained HTML page (no network needed to open it).

    \b
    BUNDLE: an audit, pcap, pg-log, rollout or chaos bundle, a gate decision record
    directory (gate --record) or one decision .parquet file. Exit 0 written, 2 bad input.
    """
    from reports.html import write_report

    rendered = write_report(bundle, out_path)
    click.echo(f"{rendered.path} ({rendered.size_bytes / 1e6:.2f} MB, {rendered.sections} sections, "
               f"{rendered.seconds:.2f} s)")


commands = [report]
