"""Probe options, declared once: name, type, default, help and the probes that read them.

From this one table come the `audit` flags (agent/cli.py), the validation of config.toml's
[probe_options] (agent/config.py, for `collect` and the daemon) and the value a probe reads
(`ProbeBase.option(name)`, which refuses a name that is not declared for that probe: a typo
fails loudly instead of silently reading the default). Each setting has one name everywhere:
the config key and the probe's key are `name`; the flag is `--name-with-dashes` unless a
declaration names the flag users already know (`--rate`, `--interval`, `--peer-role`, `--var`).

Import-light on purpose (no pyarrow, no probe module): `guardian-agent --help` builds every
flag from it. Validators that live in a probe module are named as "module:function" and
imported only when a value is given.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.errors import BadInput
from core.toml_config import TomlTable
from probes.jitter_loop import THRESHOLD_NS
from probes.kernel_tuning.profiles import parse_variables

KINDS = ("number", "integer", "string", "path", "boolean", "choice", "strings", "variables")


@dataclass(frozen=True)
class ProbeOption:
    name: str
    kind: str
    default: Any
    help: str
    probes: tuple[str, ...]
    flag: str = ""
    choices: tuple[str, ...] = ()
    positive: bool = False
    metavar: str = ""
    # "module:function" called with the value: raises BadInput naming the flag, may normalise.
    validator: str = ""
    # False for secrets (the DSN has its own [postgres] table) and for per-run choices.
    in_config: bool = True

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")

    def validate(self, value: Any) -> Any:
        """The value a probe gets, or BadInput naming the flag; None means "not set"."""
        if value is None or (self.kind in ("strings", "variables") and not value):
            return None
        if self.kind in ("number", "integer"):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise BadInput(f"{self.cli_flag}: expected a number, got {value!r}")
            if self.kind == "integer" and int(value) != value:
                raise BadInput(f"{self.cli_flag}: expected an integer, got {value!r}")
            if self.positive and value <= 0:
                raise BadInput(f"{self.cli_flag} must be positive, not {value:g}")
            value = int(value) if self.kind == "integer" else float(value)
        elif self.kind == "path":
            value = Path(value)
        elif self.kind == "strings":
            value = tuple(value)
        elif self.kind == "variables":
            value = parse_variables(value) if not isinstance(value, dict) else {
                str(key): str(item) for key, item in value.items()}
        if self.validator:
            module, _, function = self.validator.partition(":")
            checked = getattr(importlib.import_module(module), function)(value)
            value = value if checked is None or self.kind == "strings" else checked
        return value

    def from_toml(self, table: TomlTable) -> Any:
        """Read and check this option from config.toml's [probe_options] table."""
        name = self.name
        if self.kind in ("number", "integer"):
            value = table.number(name, integer=self.kind == "integer", positive=self.positive)
        elif self.kind in ("string", "path"):
            value = table.string(name)
        elif self.kind == "boolean":
            value = table.boolean(name)
        elif self.kind == "choice":
            value = table.choice(name, self.choices)
        elif self.kind == "strings":
            value = table.string_list(name)
        else:  # variables: a table of KEY = "value"
            variables = table.table(name)
            for key in variables.keys():
                variables.typed(key, (str, int))
            value = dict(variables.data)
        try:
            return self.validate(value)
        except BadInput as error:
            table.fail(name, str(error).removeprefix(f"{self.cli_flag} ").removeprefix(f"{self.cli_flag}: "))


PROBE_OPTIONS: tuple[ProbeOption, ...] = (
    ProbeOption("interval_s", "number", 1.0, "Host counter sampling interval in seconds (default 1).", ("host",),
                flag="--interval", positive=True),
    ProbeOption("profile", "string", None, "Tuning profile to audit the kernel against (adds the `kernel` table).",
                ("kernel",)),
    ProbeOption("profile_dir", "path", None, "Extra directory searched for profiles.", ("kernel",)),
    ProbeOption("profile_vars", "variables", None, "Profile variable (repeatable).", ("kernel",),
                flag="--var", metavar="KEY=VALUE"),
    ProbeOption("tuning_state_dir", "path", None, "Tune state directory whose impact ledger (tune experiment) "
                "gives each kernel row its last measured effect (default: tune's --state-dir default).",
                ("kernel",)),
    ProbeOption("iface", "string", None, "Capture interface (capture probe).", ("capture",)),
    ProbeOption("capture_filter", "string", None, "BPF capture filter (capture probe).", ("capture",)),
    ProbeOption("capture_payload", "boolean", False, "Capture full payloads (default: headers only).",
                ("capture",)),
    # The caps bound what a capture may cost a trading host (disk for the ring, memory and time
    # for the analysis); past them the capture stops and says so.
    ProbeOption("capture_max_bytes", "integer", 256 << 20, "Stop capturing after this many bytes "
                "(capture probe; default 256 MiB).", ("capture",), positive=True),
    ProbeOption("capture_max_packets", "integer", 2_000_000, "Analyse at most this many packets "
                "(capture probe; default 2000000).", ("capture",), positive=True),
    ProbeOption("pg_dsn", "string", None, "PostgreSQL DSN for the postgres probe "
                "(prefer --pg-dsn-file or PGPASSWORD).", ("postgres",), in_config=False),
    ProbeOption("pg_dsn_file", "path", None, "File (0600) holding the DSN.", ("postgres",), in_config=False),
    ProbeOption("sample_rate_hz", "integer", 97, "Stack sampling rate in Hz (stacks probe; default 97).",
                ("stacks",), flag="--rate"),
    ProbeOption("native", "boolean", False, "Native stacks with perf (stacks probe).", ("stacks",)),
    ProbeOption("subprocesses", "boolean", False, "Also profile child processes (stacks probe).", ("stacks",)),
    ProbeOption("blocking", "boolean", False, "Stop the target while sampling for exact stacks (stacks).",
                ("stacks",)),
    ProbeOption("stack_threads", "choice", "running", "Threads to sample: running (default), all (idle too), "
                "gil (GIL holder only) (stacks).", ("stacks",), choices=("running", "all", "gil")),
    ProbeOption("jitter_cpus", "string", None, "CPUs for the jitter busy-loop, e.g. 2-3 (jitter probe).",
                ("jitter",)),
    ProbeOption("jitter_meter", "choice", "auto", "Jitter meter: auto (oslat, else cyclictest, else the Python "
                "loop), oslat (busy-loop gaps), cyclictest (timer wakeup latency), python (jitter probe).",
                ("jitter",), choices=("auto", "oslat", "cyclictest", "python")),
    ProbeOption("jitter_threshold_ns", "integer", THRESHOLD_NS, "A gap in the busy loop longer than this "
                f"counts as an interruption (jitter probe; default {THRESHOLD_NS} ns).", ("jitter",), positive=True),
    ProbeOption("peer_roles", "strings", None, "Label TCP peers, e.g. 9100-9199=exchange (repeatable; tcp "
                "probe; 5432=database built in).", ("tcp",), flag="--peer-role",
                metavar="PORT[-PORT]|CIDR=ROLE", validator="probes.tcp:parse_roles"),
    # Map sizes for a busy host; past them the probe counts what it drops and reports `partial`.
    ProbeOption("syscalls_max_rows", "integer", 65536, "Histogram rows per CPU, one per pid x syscall "
                "seen on that CPU (syscalls probe; default 65536 = 23 MB per CPU).", ("syscalls",),
                positive=True),
    ProbeOption("tcp_max_connections", "integer", 131072, "Socket ends tracked at once (tcp probe; "
                "default 131072, ~80 MB).", ("tcp",), positive=True),
)
BY_NAME: dict[str, ProbeOption] = {option.name: option for option in PROBE_OPTIONS}


def declared(name: str, probe: str) -> ProbeOption:
    """The declaration a probe reads; an undeclared name (a typo) is a programming error."""
    option = BY_NAME.get(name)
    if option is None or probe not in option.probes:
        raise LookupError(f"probe {probe!r} reads option {name!r}, which is not declared for it in probes/options.py")
    return option


def validated_options(values: dict[str, Any]) -> dict[str, Any]:
    """Check every given option (from the CLI or the config) once, before anything runs."""
    unknown = sorted(set(values) - set(BY_NAME))
    if unknown:
        raise BadInput(f"unknown probe option {unknown[0]!r} (known: {', '.join(BY_NAME)})")
    checked = {}
    for name, value in values.items():
        value = BY_NAME[name].validate(value)
        if value is not None:
            checked[name] = value
    return checked


def options_from_toml(table: TomlTable) -> dict[str, Any]:
    settable = [option for option in PROBE_OPTIONS if option.in_config]
    table.check_keys(option.name for option in settable)
    values = {}
    for option in settable:
        if option.name in table:
            value = option.from_toml(table)
            if value is not None:
                values[option.name] = value
    return values

