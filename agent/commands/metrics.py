"""The Prometheus options `daemon` and `collect` share (the exporter is reports/metrics.py)."""

from __future__ import annotations

from pathlib import Path

import click


def metrics_options(command, listen: bool = True):
    """--textfile DIR, --gate-record DIR and (daemon) --listen HOST:PORT."""
    command = click.option("--gate-record", "gate_record", type=click.Path(path_type=Path),
                           help="Gate decision record whose last verdict the metrics report.")(command)
    if listen:
        command = click.option("--listen", "listen", metavar="HOST:PORT",
                               help="Also serve the metrics on http://HOST:PORT/metrics (e.g. 127.0.0.1:9817).")(command)
    command = click.option("--textfile", "textfile_dir", type=click.Path(path_type=Path),
                           help="node_exporter textfile-collector directory: write guardian_*.prom there "
                                "after every window (atomically).")(command)
    return command


def one_shot_metrics_options(command):
    """`collect` runs one window: a textfile, no server."""
    return metrics_options(command, listen=False)


def make_exporter(textfile_dir: Path | None, listen: str | None, gate_record: Path | None):
    """The exporter, or None when no metrics option was given (validated before any window)."""
    if textfile_dir is None and listen is None:
        return None
    from reports.metrics import TextfileExporter, parse_listen, validate_textfile_dir

    return TextfileExporter(validate_textfile_dir(textfile_dir), parse_listen(listen), gate_record)
