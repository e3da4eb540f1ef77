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
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import BadInput

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

# Probe options a config may set, with the type each must have (the `audit` option names).
PROBE_OPTION_TYPES: dict[str, type | tuple[type, ...]] = {
    "interval_s": (int, float),
    "profile": str,
    "profile_dir": str,
    "iface": str,
    "capture_filter": str,
    "capture_payload": bool,
    "sample_rate_hz": int,
    "native": bool,
    "subprocesses": bool,
    "blocking": bool,
    "jitter_cpus": str,
}


@dataclass
class DatasetSettings:
    root: str = DEFAULT_DATASET_ROOT
    spool_dir: Path | None = None  # None: beside a local root, DEFAULT_SPOOL_DIR for a remote one
    spool_max_bytes: int = 1024 * 1024 * 1024
    spool_policy: str = "drop-oldest"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None

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
        """The options dict handed to probes (same keys as `audit`), DSN resolved last-minute."""
        options = dict(self.probe_options)
        if "profile_dir" in options:
            options["profile_dir"] = Path(options["profile_dir"])
        options.setdefault("interval_s", 1.0)
        options["process_names"] = tuple(self.targets.process_names)
        options["units"] = tuple(self.targets.units)
        if self.postgres.dsn_file is not None:
            options["pg_dsn_file"] = self.postgres.dsn_file
        if self.postgres.dsn_env:
            dsn = os.environ.get(self.postgres.dsn_env)
            if dsn:
                options["pg_dsn"] = dsn
        return options


class _Section:
    """Reads one table of the TOML document, naming `section.key` in every error."""

    def __init__(self, source: str, name: str, data: Any, known: tuple[str, ...]):
        self.source, self.name = source, name
        if not isinstance(data, dict):
            self.fail(None, f"expected a table [{name}], got {type(data).__name__}")
        unknown = sorted(set(data) - set(known))
        if unknown:
            self.fail(unknown[0], f"unknown key (known in [{name}]: {', '.join(known)})")
        self.data = data

    def fail(self, key: str | None, message: str):
        where = f"{self.name}.{key}" if key else self.name
        raise BadInput(f"{self.source}: {where}: {message}")

    def has(self, key: str) -> bool:
        return key in self.data

    def positive_number(self, key: str, default: float) -> float:
        value = self.data.get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            self.fail(key, f"expected a positive number, got {value!r}")
        return float(value)

    def string(self, key: str, default: str | None) -> str | None:
        value = self.data.get(key, default)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            self.fail(key, f"expected a non-empty string, got {value!r}")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> str:
        value = self.data.get(key, default)
        if value not in choices:
            self.fail(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def string_list(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.data.get(key, list(default))
        if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
            self.fail(key, f"expected a list of non-empty strings, got {value!r}")
        return tuple(v.strip() for v in value)

    def probe_list(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        names = self.string_list(key, default)
        unknown = [n for n in names if n not in known_probe_names()]
        if unknown:
            self.fail(key, f"unknown probe {unknown[0]!r} (known: {', '.join(known_probe_names())})")
        if not names:
            self.fail(key, "list at least one probe")
        return tuple(dict.fromkeys(names))


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
    try:
        text = path.read_text()
    except OSError as error:
        raise BadInput(f"{path}: cannot read ({error.strerror})") from None
    return parse_config(text, source=str(path), path=path, environ=environ)


def parse_config(text: str, source: str = "config.toml", path: Path | None = None,
                 environ: dict[str, str] | None = None) -> AgentConfig:
    environ = os.environ if environ is None else environ
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise BadInput(f"{source}: not valid TOML ({error})") from None
    # Constructing the section is the check: unknown top-level tables are refused.
    top = _Section(source, "config", document,
                   ("environment", "dataset", "collect", "daemon", "targets", "postgres", "probe_options"))
    config = AgentConfig(path=path, environment=top.string("environment", None))

    dataset = _Section(source, "dataset", document.get("dataset", {}),
                       ("root", "spool_dir", "spool_max_mb", "spool_policy", "s3_endpoint_url", "s3_region"))
    root = dataset.string("root", DEFAULT_DATASET_ROOT)
    check_dataset_root(root, lambda message: dataset.fail("root", message))
    spool_dir = dataset.string("spool_dir", None)
    endpoint = dataset.string("s3_endpoint_url", None)
    if endpoint and not endpoint.startswith(("http://", "https://")):
        dataset.fail("s3_endpoint_url", f"expected an http:// or https:// URL, got {endpoint!r}")
    config.dataset = DatasetSettings(
        root=root,
        spool_dir=Path(spool_dir) if spool_dir else None,
        spool_max_bytes=int(dataset.positive_number("spool_max_mb", 1024) * 1024 * 1024),
        spool_policy=dataset.choice("spool_policy", SPOOL_POLICIES, "drop-oldest"),
        s3_endpoint_url=endpoint,
        s3_region=dataset.string("s3_region", None),
    )

    collect = _Section(source, "collect", document.get("collect", {}), ("probes", "duration_s"))
    config.collect = CollectSettings(
        probes=collect.probe_list("probes", COLLECT_DEFAULT_PROBES),
        duration_s=collect.positive_number("duration_s", 30.0),
    )

    daemon = _Section(source, "daemon", document.get("daemon", {}),
                      ("probes", "window_s", "cpu_budget_pct", "rss_limit_mb", "upload_interval_s"))
    config.daemon = DaemonSettings(
        probes=daemon.probe_list("probes", DAEMON_DEFAULT_PROBES),
        window_s=daemon.positive_number("window_s", 300.0),
        cpu_budget_pct=daemon.positive_number("cpu_budget_pct", 0.5),
        rss_limit_mb=daemon.positive_number("rss_limit_mb", 200.0),
        upload_interval_s=daemon.positive_number("upload_interval_s", 60.0),
    )
    if config.daemon.cpu_budget_pct > 100:
        daemon.fail("cpu_budget_pct", f"is a percentage of one core (0-100], got {config.daemon.cpu_budget_pct:g}")

    targets = _Section(source, "targets", document.get("targets", {}), ("pids", "process_names", "units"))
    pids = targets.data.get("pids", [])
    if not isinstance(pids, list) or not all(isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in pids):
        targets.fail("pids", f"expected a list of positive integers, got {pids!r}")
    config.targets = TargetSettings(
        pids=tuple(pids),
        process_names=targets.string_list("process_names", ()),
        units=targets.string_list("units", ()),
    )

    postgres = _Section(source, "postgres", document.get("postgres", {}), ("dsn_file", "dsn_env", "dsn"))
    if postgres.has("dsn"):
        postgres.fail("dsn", "a DSN (and its password) does not belong in config.toml: "
                             "put it in a 0600 file named by dsn_file, or in the variable named by dsn_env")
    dsn_file = postgres.string("dsn_file", None)
    if dsn_file:
        check_secret_file(Path(dsn_file), lambda message: postgres.fail("dsn_file", message))
    dsn_env = postgres.string("dsn_env", None)
    if dsn_env and dsn_env not in environ:
        postgres.fail("dsn_env", f"environment variable {dsn_env} is not set")
    config.postgres = PostgresSettings(dsn_file=Path(dsn_file) if dsn_file else None, dsn_env=dsn_env)

    options = _Section(source, "probe_options", document.get("probe_options", {}), tuple(PROBE_OPTION_TYPES))
    for key, value in options.data.items():
        expected = PROBE_OPTION_TYPES[key]
        if isinstance(value, bool) and expected is not bool:
            options.fail(key, f"expected {_type_name(expected)}, got {value!r}")
        if not isinstance(value, expected):
            options.fail(key, f"expected {_type_name(expected)}, got {value!r}")
    if "interval_s" in options.data and options.data["interval_s"] <= 0:
        options.fail("interval_s", f"expected a positive number, got {options.data['interval_s']!r}")
    config.probe_options = dict(options.data)
    return config


def _type_name(expected) -> str:
    if expected == (int, float):
        return "a number"
    return {str: "a string", bool: "true or false", int: "an integer"}.get(expected, str(expected))


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
