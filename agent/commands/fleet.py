"""Fleet commands: `collect` (one window into the dataset), `daemon`, `query`."""

from __future__ import annotations

import signal
from pathlib import Path

import click

from agent.commands.metrics import make_exporter, metrics_options, one_shot_metrics_options
from agent.option_types import WINDOW_SECONDS
from core.errors import BadInput


def _load(config_path: Path | None, dataset_root: str | None, spool_dir: Path | None,
          catalog_uri: str | None = None):
    from agent.config import check_dataset_root, load_config

    config = load_config(config_path)
    if catalog_uri:
        from agent.fleet.iceberg import check_catalog_uri

        def fail_catalog(message):
            raise BadInput(f"--catalog: {message}")

        check_catalog_uri(catalog_uri, fail_catalog)
        config.dataset.iceberg_catalog = catalog_uri
    if dataset_root:
        def fail(message):
            raise BadInput(f"--dataset: {message}")

        check_dataset_root(dataset_root, fail)
        config.dataset.root = dataset_root
    if spool_dir:
        config.dataset.spool_dir = spool_dir
    return config


def _say(message: str) -> None:
    click.echo(f"guardian-agent: {message}", err=True)


def _drain_line(report) -> str:
    if report is None:
        return ""
    if report.busy:
        return f"another process is uploading; {report.pending_runs} run(s) wait in the spool"
    line = f"uploaded {len(report.published_runs)} run(s) ({report.uploaded_objects} objects)"
    if report.already_there:
        line += f", {report.already_there} object(s) already in the store"
    if report.error:
        line += (f"; store unavailable, {report.pending_runs} run(s) "
                 f"({report.pending_bytes / 2**20:.1f} MB) wait in the spool: {report.error}")
    return line


config_option = click.option("--config", "config_path", type=click.Path(path_type=Path),
                             help="Config file (default /etc/guardian-agent/config.toml when present).")
dataset_option = click.option("--dataset", "dataset_root", metavar="ROOT",
                              help="Dataset root: a directory or s3://bucket/prefix (overrides the config).")
catalog_option = click.option("--catalog", "catalog_uri", metavar="URI",
                              help="Iceberg SQL catalog (sqlite:////path/catalog.db or postgresql://...; "
                                   "overrides dataset.iceberg_catalog).")
spool_option = click.option("--spool", "spool_dir", type=click.Path(path_type=Path),
                            help="Spool directory (overrides the config).")


@click.command()
@config_option
@click.option("--duration", "duration_s", type=WINDOW_SECONDS, help="Window length in seconds (default: config, 30).")
@dataset_option
@spool_option
@click.option("--upload-only", is_flag=True, help="Do not audit: only publish the runs waiting in the spool.")
@click.option("--check", "check_only", is_flag=True, help="Only validate the config (exit 2 naming the bad key).")
@one_shot_metrics_options
@click.pass_obj
def collect(obj, config_path, duration_s, dataset_root, spool_dir, upload_only, check_only,
            textfile_dir=None, listen=None, gate_record=None):
    """Run one audit window with the configured probes into the fleet dataset.

    \b
    Writes ROOT/table=<table>/date=YYYY-MM-DD/host=<hostname>/<run_id>.parquet and
    ROOT/manifests/...; a remote ROOT is reached through a local spool with retries.
    Exit 0 when the run is in the dataset or safely in the spool (store down).
    """
    from agent.cli import progress_printer, stderr_is_tty
    from agent.fleet.collect import collect_once, upload_only as drain_spool
    from probes import REGISTRY

    config = _load(config_path, dataset_root, spool_dir)
    if check_only:
        click.echo(f"config ok: dataset {config.dataset.root}, spool {config.spool_dir()}")
        return 0
    if upload_only:
        report = drain_spool(config)
        click.echo(_drain_line(report))
        return 0
    verbose = bool(obj and obj.verbose)
    exporter = make_exporter(textfile_dir, listen, gate_record)
    outcome = collect_once(config, REGISTRY, duration_s, progress=progress_printer(stderr_is_tty() or verbose),
                           before_stage=exporter.window_done if exporter else None)
    statuses = ", ".join(f"{o.name} {o.status}" for o in outcome.result.outcomes)
    click.echo(f"run {outcome.run_id}: {statuses}")
    for dropped in outcome.dropped_runs:
        _say(f"spool over its cap: dropped run {dropped} (policy drop-oldest)")
    click.echo(_drain_line(outcome.drain))
    return 0


@click.command()
@config_option
@dataset_option
@spool_option
@click.option("--window", "window_s", type=WINDOW_SECONDS, help="Window length in seconds (default: config, 300).")
@click.option("--max-windows", type=int, hidden=True, help="Stop after N windows (tests, benchmarks).")
@metrics_options
def daemon(config_path, dataset_root, spool_dir, window_s, max_windows, textfile_dir=None, listen=None,
           gate_record=None):
    """Keep the cheap probes (host, syscalls, tcp) running in rolling windows.

    Enforces its CPU budget on itself (config daemon.cpu_budget_pct, default 0.5% of one core)
    and exits 1 past daemon.rss_limit_mb so systemd restarts it. SIGTERM ends the current
    window, publishes it and exits 0. State: SPOOL/daemon-state.json.
    """
    from agent.daemon import Daemon
    from probes import REGISTRY

    config = _load(config_path, dataset_root, spool_dir)
    if window_s is not None:
        if window_s <= 0:
            raise BadInput(f"--window must be positive, not {window_s:g}")
        config.daemon.window_s = window_s
    if max_windows is not None and max_windows <= 0:
        raise BadInput("--max-windows must be positive")
    service = Daemon(config, REGISTRY, log=_say, max_windows=max_windows,
                     metrics=make_exporter(textfile_dir, listen, gate_record))
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM):
        previous[signum] = signal.signal(signum, lambda s, f: service.stop())
    try:
        return service.run()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@click.command()
@config_option
@dataset_option
@click.option("--format", "output_format", type=click.Choice(["table", "csv", "json"]), default="table",
              show_default=True)
@catalog_option
@click.argument("sql")
def query(config_path, dataset_root, output_format, sql, catalog_uri):
    """Run SQL over the dataset with embedded DuckDB: one view per table (host, syscalls, tcp,
    runs ...), with the partition columns `date` and `host`.

    \b
    Example:
      guardian-agent query --dataset /srv/fleet \\
        "SELECT host, syscall, sum(count) AS calls FROM syscalls GROUP BY ALL ORDER BY calls DESC LIMIT 10"
    """
    from agent.fleet.query import format_rows, run_query

    if not sql.strip():
        raise BadInput("query: give an SQL statement")
    config = _load(config_path, dataset_root, None, catalog_uri)
    columns, rows = run_query(config.dataset.root, sql, config.dataset.s3_endpoint_url, config.dataset.s3_region,
                              config.dataset.iceberg_catalog)
    if columns:
        click.echo(format_rows(columns, rows, output_format))
    return 0


@click.command()
@config_option
@dataset_option
@click.option("--older-than", "older_than_days", type=click.FloatRange(min=0, max=3650), default=1.0,
              show_default=True, help="Only partitions whose date is at least this many days old.")
@catalog_option
def compact(config_path, dataset_root, older_than_days, catalog_uri):
    """Rewrite each table × date × host partition's run files into one sorted zstd Parquet file.

    Atomic for readers (no rows missing or doubled at any moment) and crash-safe: a compaction
    killed mid-way is finished or undone by the next `compact`. Without a catalog: local
    datasets, in place. With --catalog (or dataset.iceberg_catalog): into Apache Iceberg tables
    under ROOT/_iceberg, on S3 or locally, one catalog commit per batch of partitions.
    """
    from agent.fleet.compact import compact as compact_dataset

    config = _load(config_path, dataset_root, None, catalog_uri)
    report = compact_dataset(config.dataset.root, older_than_days, catalog_uri=config.dataset.iceberg_catalog,
                             endpoint_url=config.dataset.s3_endpoint_url, region=config.dataset.s3_region)
    if report.recovered:
        _say(f"finished {report.recovered} step(s) an earlier compaction left half done")
    click.echo(f"compacted {report.partitions} partition(s): {report.files_before} files -> "
               f"{report.files_after}, {report.rows:,} rows")


commands = [collect, daemon, query, compact]
