"""/etc/guardian-agent/config.toml: loading and validation.

Everything is validated before anything runs (an unknown key is an error, not a silent no-op:
a typo like `windows_s` must not quietly fall back to the default on a fleet of hosts). Each
error names the key, e.g. "config.toml: daemon.window_s: expected a positive number, got 'x'".

The Postgres DSN is never stored in the file itself: it comes from a 0600 file (`dsn_file`) or
an environment variable (`dsn_env`), and is only ever handed to the postgres probe.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import BadInput
from core.toml_config import TomlTable, parse_toml_text, read_toml_text
from probes.options import options_from_toml

DEFAULT_CONFIG_PATH = Path("/etc/guardian-agent/config.toml")
DEFAULT_SPOOL_DIR = Path("/var/lib/guardian-agent/spool")
DEFAULT_DATASET_ROOT = "/var/lib/guardian-agent/dataset"

# Cheap probes run continuously by the daemon; the heavy ones (stacks, capture, postgres) are
# left to the timer-driven `collect`, which runs a short window now and then.
DAEMON_DEFAULT_PROBES = ("host", "syscalls", "tcp")
COLLECT_DEFAULT_PROBES = ("host", "syscalls", "tcp", "stacks")
# Probe names the project defines (ARCHITECTURE.md). A configured name from this list that is
# not built into this agent is reported as unavailable in the manifest instead of refusing the
# config, so one config.toml serves hosts running different agent versions.
KNOWN_PROBE_NAMES = ("host", "syscalls", "tcp", "capture", "stacks", "postgres", "kernel", "jitter")

SPOOL_POLICIES = ("drop-oldest", "refuse-new")

@dataclass
class DatasetSettings:
    root: str = DEFAULT_DATASET_ROOT
    spool_dir: Path | None = None  # None: beside a local root, DEFAULT_SPOOL_DIR for a remote one
    spool_max_bytes: int = 1024 * 1024 * 1024
    spool_policy: str = "drop-oldest"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    # SQLAlchemy URI of the Iceberg SQL catalog `compact` and `query` use (agent/fleet/iceberg.py).
    iceberg_catalog: str | None = None

    @property
    def is_remote(self) -> bool:
        return "://" in self.root


@dataclass
class CollectSettings:
    probes: tuple[str, ...] = COLLECT_DEFAULT_PROBES
    duration_s: float = 30.0


@dataclass
class DaemonSettings:
    probes: tuple[str, ...] = DAEMON_DEFAULT_PROBES
    # syscalls and tcp are rolling (compiled once, read every window); what a window costs is
    # host sampling, one map read and publishing (~0.6-0.85 s of CPU here), so 300 s windows
    # stay under the 0.5% budget without pauses. See docs/fleet.md.
    window_s: float = 300.0
    cpu_budget_pct: float = 0.5
    rss_limit_mb: float = 200.0
    upload_interval_s: float = 60.0


@dataclass
class TargetSettings:
    pids: tuple[int, ...] = ()
    process_names: tuple[str, ...] = ()
    units: tuple[str, ...] = ()


@dataclass
class PostgresSettings:
    dsn_file: Path | None = None
    dsn_env: str | None = None


@dataclass
class AgentConfig:
    path: Path | None = None
    dataset: DatasetSettings = field(default_factory=DatasetSettings)
    collect: CollectSettings = field(default_factory=CollectSettings)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    targets: TargetSettings = field(default_factory=TargetSettings)
    postgres: PostgresSettings = field(default_factory=PostgresSettings)
    probe_options: dict[str, Any] = field(default_factory=dict)
    # What this host is for (`environment = "paper-trading"`): chaos experiments run only on a
    # host whose marker matches the experiment's `environment`.
    environment: str | None = None

    def spool_dir(self) -> Path:
        if self.dataset.spool_dir is not None:
            return self.dataset.spool_dir
        if self.dataset.is_remote:
            return DEFAULT_SPOOL_DIR
        # Underscore prefix: pyarrow.dataset, Spark and Trino skip it when scanning ROOT.
        return Path(self.dataset.root) / "_spool"

    def probe_options_for_run(self) -> dict[str, Any]:
        """The option values handed to probes (names of probes/options.py), DSN resolved last-minute."""
        options = dict(self.probe_options)
        if self.postgres.dsn_file is not None:
            options["pg_dsn_file"] = self.postgres.dsn_file
        if self.postgres.dsn_env:
            dsn = os.environ.get(self.postgres.dsn_env)
            if dsn:
                options["pg_dsn"] = dsn
        from agent.tuning.ledger import with_ledger_dir

        return with_ledger_dir(options)


def known_probe_names() -> tuple[str, ...]:
    from probes import REGISTRY

    registered = tuple(probe.name for probe in REGISTRY)
    return tuple(dict.fromkeys(registered + KNOWN_PROBE_NAMES))


def load_config(path: Path | None = None, environ: dict[str, str] | None = None) -> AgentConfig:
    """Load and validate a config file. `path=None` reads the default file when it exists."""
    explicit = path is not None
    path = Path(path) if explicit else DEFAULT_CONFIG_PATH
    if not path.exists():
        if explicit:
            raise BadInput(f"--config {path}: no such file")
        return AgentConfig()
    return parse_config(read_toml_text(path), source=str(path), path=path, environ=environ)


def probe_list(table: TomlTable, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
    names = table.string_list(key, default)
    unknown = [n for n in names if n not in known_probe_names()]
    if unknown:
        table.fail(key, f"unknown probe {unknown[0]!r} (known: {', '.join(known_probe_names())})")
    if not names:
        table.fail(key, "list at least one probe")
    return tuple(dict.fromkeys(names))


def parse_config(text: str, source: str = "config.toml", path: Path | None = None,
                 environ: dict[str, str] | None = None) -> AgentConfig:
    environ = os.environ if environ is None else environ
    document = TomlTable.root(parse_toml_text(text, source), source,
                              known=("environment", "dataset", "collect", "daemon", "targets", "postgres",
                                     "probe_options"))
    config = AgentConfig(path=path, environment=document.string("environment", None))

    dataset = document.table("dataset", ("root", "spool_dir", "spool_max_mb", "spool_policy",
                                         "s3_endpoint_url", "s3_region", "iceberg_catalog"))
    root = dataset.string("root", DEFAULT_DATASET_ROOT)
    check_dataset_root(root, lambda message: dataset.fail("root", message))
    spool_dir = dataset.string("spool_dir", None)
    endpoint = dataset.string("s3_endpoint_url", None)
    if endpoint and not endpoint.startswith(("http://", "https://")):
        dataset.fail("s3_endpoint_url", f"expected an http:// or https:// URL, got {endpoint!r}")
    catalog = dataset.string("iceberg_catalog", None)
    if catalog:
        from agent.fleet.iceberg import check_catalog_uri

        check_catalog_uri(catalog, lambda message: dataset.fail("iceberg_catalog", message))
    config.dataset = DatasetSettings(
        root=root,
        spool_dir=Path(spool_dir) if spool_dir else None,
        spool_max_bytes=int(dataset.number("spool_max_mb", 1024, positive=True) * 1024 * 1024),
        spool_policy=dataset.choice("spool_policy", SPOOL_POLICIES, "drop-oldest"),
        s3_endpoint_url=endpoint,
        s3_region=dataset.string("s3_region", None),
        iceberg_catalog=catalog,
    )

    collect = document.table("collect", ("probes", "duration_s"))
    config.collect = CollectSettings(
        probes=probe_list(collect, "probes", COLLECT_DEFAULT_PROBES),
        duration_s=collect.number("duration_s", 30.0, positive=True),
    )

    daemon = document.table("daemon", ("probes", "window_s", "cpu_budget_pct", "rss_limit_mb", "upload_interval_s"))
    config.daemon = DaemonSettings(
        probes=probe_list(daemon, "probes", DAEMON_DEFAULT_PROBES),
        window_s=daemon.number("window_s", 300.0, positive=True),
        cpu_budget_pct=daemon.number("cpu_budget_pct", 0.5, positive=True),
        rss_limit_mb=daemon.number("rss_limit_mb", 200.0, positive=True),
        upload_interval_s=daemon.number("upload_interval_s", 60.0, positive=True),
    )
    if config.daemon.cpu_budget_pct > 100:
        daemon.fail("cpu_budget_pct", f"is a percentage of one core (0-100], got {config.daemon.cpu_budget_pct:g}")

    targets = document.table("targets", ("pids", "process_names", "units"))
    config.targets = TargetSettings(
        pids=targets.integer_list("pids", (), positive=True),
        process_names=targets.string_list("process_names", ()),
        units=targets.string_list("units", ()),
    )

    postgres = document.table("postgres", ("dsn_file", "dsn_env", "dsn"))
    if "dsn" in postgres:
        postgres.fail("dsn", "a DSN (and its password) does not belong in config.toml: "
                             "put it in a 0600 file named by dsn_file, or in the variable named by dsn_env")
    dsn_file = postgres.string("dsn_file", None)
    if dsn_file:
        check_secret_file(Path(dsn_file), lambda message: postgres.fail("dsn_file", message))
    dsn_env = postgres.string("dsn_env", None)
    if dsn_env and dsn_env not in environ:
        postgres.fail("dsn_env", f"environment variable {dsn_env} is not set")
    config.postgres = PostgresSettings(dsn_file=Path(dsn_file) if dsn_file else None, dsn_env=dsn_env)

    config.probe_options = options_from_toml(document.table("probe_options"))
    return config


def check_dataset_root(root: str, fail) -> None:
    if "://" in root:
        scheme, _, rest = root.partition("://")
        if scheme != "s3":
            fail(f"only local paths and s3://bucket/prefix URLs are supported, got {scheme}://")
        bucket = rest.split("/", 1)[0]
        if not bucket:
            fail(f"{root!r} names no bucket (expected s3://bucket/prefix)")


def check_secret_file(path: Path, fail) -> None:
    """A secret file must exist, be a regular file and be unreadable by group and others."""
    try:
        info = path.stat()
    except FileNotFoundError:
        fail(f"{path}: no such file")
        return
    except OSError as error:
        fail(f"{path}: cannot stat ({error.strerror})")
        return
    if not stat.S_ISREG(info.st_mode):
        fail(f"{path}: not a regular file")
    if info.st_mode & 0o077:
        fail(f"{path}: mode {stat.S_IMODE(info.st_mode):04o} lets group/others read it (chmod 600 {path})")
