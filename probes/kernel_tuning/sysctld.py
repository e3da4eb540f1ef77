"""Where a sysctl value comes from at boot: the sysctl.d files, in the order systemd-sysctl and
`sysctl --system` apply them (sysctl.d(5)): every *.conf from the directories below, a file name
in an earlier directory masking the same name in a later one, all sorted by file name, later
assignments winning; procps then reads /etc/sysctl.conf last (Debian also links it as
/etc/sysctl.d/99-sysctl.conf)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from core.host import Host

SYSCTL_DIRS = ("/etc/sysctl.d", "/run/sysctl.d", "/usr/local/lib/sysctl.d", "/usr/lib/sysctl.d", "/lib/sysctl.d")
LEGACY_FILE = "/etc/sysctl.conf"
PERSIST_FILE = "/etc/sysctl.d/90-guardian-agent.conf"


@dataclass(frozen=True)
class Assignment:
    key: str
    value: str
    file: str  # absolute host path
    line: int

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def normalize_key(key: str) -> str:
    """sysctl.d accepts both net.ipv4.ip_forward and net/ipv4/ip_forward."""
    key = key.strip().lstrip("-")
    return key.replace("/", ".") if "/" in key and "." not in key.split("/")[0] else key


def boot_files(host: Host, skip: str | None = None) -> list[str]:
    """The files applied at boot, in application order (absolute host paths)."""
    chosen: dict[str, str] = {}
    for directory in SYSCTL_DIRS:
        real = host.path(directory)
        if not real.is_dir():
            continue
        for path in sorted(real.glob("*.conf")):
            chosen.setdefault(path.name, f"{directory}/{path.name}")
    ordered = [chosen[name] for name in sorted(chosen)]
    legacy_target = host.path(LEGACY_FILE)
    linked = any(host.path(f).resolve() == legacy_target.resolve() for f in ordered if host.path(f).exists())
    if legacy_target.is_file() and not linked:
        ordered.append(LEGACY_FILE)
    return [f for f in ordered if f != skip]


def parse_assignments(text: str, file: str) -> list[Assignment]:
    rows = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] in "#;" or "=" not in line:
            continue
        key, value = line.split("=", 1)
        rows.append(Assignment(normalize_key(key), " ".join(value.split()), file, number))
    return rows


def boot_assignments(host: Host, skip: str | None = None) -> list[Assignment]:
    rows: list[Assignment] = []
    for file in boot_files(host, skip):
        try:
            rows.extend(parse_assignments(host.read_text(file), file))
        except (OSError, UnicodeDecodeError):
            continue
    return rows


def matches(pattern: str, key: str) -> bool:
    return pattern == key or ("*" in pattern and fnmatch.fnmatchcase(key, pattern))


def last_assignment(assignments: list[Assignment], key: str) -> Assignment | None:
    found = None
    for row in assignments:
        if matches(row.key, key):
            found = row
    return found


def overriding(assignments: list[Assignment], key: str, our_file: str = PERSIST_FILE) -> list[Assignment]:
    """Assignments applied after `our_file` at boot that set `key` (they would win over ours)."""
    our_name = Path(our_file).name
    later = []
    for row in assignments:
        name = Path(row.file).name
        applied_after = row.file == LEGACY_FILE or name > our_name
        if applied_after and matches(row.key, key):
            later.append(row)
    return later


def render_persist_file(profile: str, values: list[tuple[str, str]]) -> str:
    lines = [f"# Written by guardian-agent tune apply --persist (profile {profile}).",
             "# Removed by `guardian-agent tune rollback`; do not edit by hand.", ""]
    lines += [f"{key} = {value}" for key, value in values]
    return "\n".join(lines) + "\n"
