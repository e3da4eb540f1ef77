"""Tuning profiles: TOML data with `include` layering and `${variable}` substitution.

Everything is validated before anything is read from or written to the host, and every error
names the file, the line and the key, because a profile is hand-written by an operator who must
find the typo quickly. tomllib does not report positions for semantic errors, so `locate()` scans
the text for the table header and key itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.errors import BadInput
from core.toml_config import TomlDocument, parse_toml_text, read_toml_text
from core.host import Host, format_cpu_list, parse_cpu_list
from probes.kernel_tuning.plan import NAME_PATTERN, SECTIONS, cpulist_part

BUILTIN_DIR = Path(__file__).resolve().parent.parent.parent / "kernel_profiles"
SYSTEM_DIR = "/etc/guardian-agent/profiles"
RISKS = ("low", "medium", "high")
MAX_INCLUDE_DEPTH = 8

# Keys common to every item: `optional` says the setting may be absent on some kernels (not a
# typo). Each section's own keys, validation and planning are its class in plan.py (SECTIONS).
COMMON_KEYS = {"why", "risk", "optional"}
TOPOLOGY_KEYS = {"smt_siblings_isolated", "min_housekeeping_cores", "why"}
VARIABLE_KEYS = {"type", "description", "default", "default_complement_of", "required"}
VARIABLE_TYPES = ("cpulist", "int", "text")
PROFILE_KEYS = {"description", "include"}
TOP_LEVEL = {"profile", "variables", "topology"} | set(SECTIONS)
VARIABLE_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class ItemSpec:
    """One item of a profile as written, before it is expanded against a host."""

    section: str
    key: str  # sysctl name, sysfs item name, cmdline parameter ...
    fields: dict[str, Any]
    file: Path
    line: int

    @property
    def why(self) -> str:
        return str(self.fields.get("why", ""))

    @property
    def risk(self) -> str:
        return str(self.fields.get("risk", "low"))


@dataclass
class Profile:
    name: str
    file: Path
    description: str
    items: list[ItemSpec]
    variables: dict[str, str]
    topology: dict[str, Any] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)


def parse_variables(items) -> dict[str, str]:
    """`--var KEY=VALUE` flags (tune and audit) -> {key: value}."""
    values = {}
    for item in items:
        if "=" not in item:
            raise BadInput(f"--var {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        values[key.strip()] = value.strip()
    return values


def search_dirs(profile_dir: Path | None, host: Host | None = None) -> list[Path]:
    host = host or Host.real()
    dirs = [Path(profile_dir)] if profile_dir else []
    dirs += [host.path(SYSTEM_DIR), BUILTIN_DIR]
    return dirs


def available_profiles(profile_dir: Path | None = None, host: Host | None = None) -> list[str]:
    names: set[str] = set()
    for directory in search_dirs(profile_dir, host):
        if directory.is_dir():
            names.update(p.stem for p in directory.glob("*.toml"))
    return sorted(names)


def find_profile(name: str, profile_dir: Path | None = None, host: Host | None = None) -> Path:
    """A profile NAME is looked up in the search order; a path to a .toml file is used as is."""
    if name.endswith(".toml") or "/" in name:
        path = Path(name)
        if not path.is_file():
            raise BadInput(f"profile file {path}: not found")
        return path
    if not NAME_PATTERN.match(name):
        raise BadInput(f"profile name {name!r}: use letters, digits, '.', '_' or '-'")
    for directory in search_dirs(profile_dir, host):
        candidate = directory / f"{name}.toml"
        if candidate.is_file():
            return candidate
    known = ", ".join(available_profiles(profile_dir, host)) or "none"
    searched = ", ".join(str(d) for d in search_dirs(profile_dir, host))
    raise BadInput(f"profile {name!r} not found (searched {searched}; known: {known})")


def _split_header(header: str) -> list[str]:
    """Split a TOML table header (a."b.c".d) into its keys, honouring quotes."""
    parts, current, quote = [], "", None
    for char in header:
        if quote:
            if char == quote:
                quote = None
            else:
                current += char
        elif char in "\"'":
            quote = char
        elif char == ".":
            parts.append(current.strip())
            current = ""
        else:
            current += char
    parts.append(current.strip())
    return parts


def locate(text: str, table: list[str], key: str | None = None) -> int:
    """Line number (1-based) of `key` inside table `table`, or of the table header; 1 if unknown."""
    header_line = 0
    current: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("["):
            inner = line.strip("[]").split("#")[0].strip().rstrip("]").strip()
            current = _split_header(inner)
            if current == table:
                header_line = number
            continue
        if current == table or (not table and not current):
            if key is None:
                continue
            match = re.match(r"""^\s*(?:"([^"]*)"|'([^']*)'|([A-Za-z0-9_.-]+))\s*=""", raw)
            if match and key in match.groups():
                return number
    if key is not None and header_line == 0 and table:
        # Inline tables (`sysctl = { ... }`) or dotted keys: fall back to the first mention.
        for number, raw in enumerate(text.splitlines(), start=1):
            if key in raw:
                return number
    return header_line or 1


class _Source:
    """A profile file with its text, to turn a key path into `file:line: key` messages."""

    def __init__(self, path: Path):
        self.path = path
        self.text = read_toml_text(path, f"profile file {path}")
        self.data = parse_toml_text(self.text, str(path))

    def error(self, table: list[str], key: str | None, message: str) -> BadInput:
        """core/toml_config's wording, with the line number tomllib cannot give."""
        document = TomlDocument(f"{self.path}:{locate(self.text, table, key)}")
        return document.error(tuple(table) + ((key,) if key else ()), message)


def _check_common(source: _Source, table: list[str], fields: dict) -> None:
    if "why" in fields and not isinstance(fields["why"], str):
        raise source.error(table, "why", "expected a one-line string")
    if "optional" in fields and not isinstance(fields["optional"], bool):
        raise source.error(table, "optional", f"expected true or false, got {fields['optional']!r}")
    if "risk" in fields and fields["risk"] not in RISKS:
        raise source.error(table, "risk", f"expected one of {', '.join(RISKS)}, got {fields['risk']!r}")


def _parse_items(source: _Source) -> tuple[list[ItemSpec], dict, dict, dict]:
    data = source.data
    for top in data:
        if top not in TOP_LEVEL:
            raise source.error([], top, f"unknown key (known: {', '.join(sorted(TOP_LEVEL))})")
    header = data.get("profile", {})
    if not isinstance(header, dict):
        raise source.error([], "profile", "expected a table")
    for key in header:
        if key not in PROFILE_KEYS:
            raise source.error(["profile"], key, f"unknown key (known: {', '.join(sorted(PROFILE_KEYS))})")
    include = header.get("include", [])
    if isinstance(include, str):
        include = [include]
    if not isinstance(include, list) or not all(isinstance(i, str) for i in include):
        raise source.error(["profile"], "include", "expected a profile name or a list of names")

    variables = data.get("variables", {})
    for name, spec in variables.items():
        if not isinstance(spec, dict):
            raise source.error(["variables"], name, "expected a table with type/description/default")
        for key in spec:
            if key not in VARIABLE_KEYS:
                raise source.error(["variables", name], key,
                                   f"unknown key (known: {', '.join(sorted(VARIABLE_KEYS))})")
        if spec.get("type", "text") not in VARIABLE_TYPES:
            raise source.error(["variables", name], "type", f"expected one of {', '.join(VARIABLE_TYPES)}")

    topology = data.get("topology", {})
    for key, value in topology.items():
        if key not in TOPOLOGY_KEYS:
            raise source.error(["topology"], key, f"unknown key (known: {', '.join(sorted(TOPOLOGY_KEYS))})")
    if "smt_siblings_isolated" in topology and not isinstance(topology["smt_siblings_isolated"], bool):
        raise source.error(["topology"], "smt_siblings_isolated", "expected true or false")
    minimum = topology.get("min_housekeeping_cores", 1)
    if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 0:
        raise source.error(["topology"], "min_housekeeping_cores", "expected a non-negative integer")

    items: list[ItemSpec] = []
    for section, kind in SECTIONS.items():
        allowed = kind.keys | COMMON_KEYS
        if section not in data:
            continue
        body = data[section]
        if not isinstance(body, dict):
            raise source.error([], section, "expected a table")
        entries = [("", body)] if kind.single_item else list(body.items())
        for key, fields in entries:
            table = [section] + ([key] if key else [])
            if not isinstance(fields, dict):
                raise source.error([section], key, "expected a table of settings (value, why, risk)")
            for field_name in fields:
                if field_name not in allowed:
                    raise source.error(table, field_name,
                                       f"unknown key (known: {', '.join(sorted(allowed))})")
            _check_common(source, table, fields)
            kind.validate(source, key, table, fields)
            items.append(ItemSpec(section, key or section, dict(fields), source.path,
                                  locate(source.text, table)))
    return items, variables, topology, {"include": include, "description": header.get("description", "")}


def load_profile(name: str, profile_dir: Path | None = None, variables: dict[str, str] | None = None,
                 host: Host | None = None) -> Profile:
    """Load, layer and validate a profile; substitute variables. Raises BadInput with file:line."""
    host = host or Host.real()
    path = find_profile(name, profile_dir, host)
    chain: list[_Source] = []
    _collect_chain(path, profile_dir, host, chain, [])
    merged: dict[tuple[str, str], ItemSpec] = {}
    declared: dict[str, tuple[dict, _Source]] = {}
    topology: dict[str, Any] = {}
    description = ""
    for source in chain:  # parents first: later files override earlier ones
        items, declared_here, topology_here, header = source.parsed
        for item in items:
            merged.pop((item.section, item.key), None)
            merged[(item.section, item.key)] = item
        for variable, spec in declared_here.items():
            declared[variable] = (spec, source)
        topology.update(topology_here)
        description = header["description"] or description
    values = _resolve_variables(declared, dict(variables or {}), host, path)
    resolved = [_substitute(item, values, chain) for item in merged.values()]
    return Profile(path.stem, path, description, resolved, values, topology, [s.path for s in chain])


def _collect_chain(path: Path, profile_dir, host: Host, chain: list[_Source], stack: list[Path]) -> None:
    resolved = path.resolve()
    if resolved in stack:
        cycle = " -> ".join(p.name for p in stack + [resolved])
        raise BadInput(f"{path}: include cycle ({cycle})")
    if len(stack) >= MAX_INCLUDE_DEPTH:
        raise BadInput(f"{path}: includes nested deeper than {MAX_INCLUDE_DEPTH}")
    if any(existing.path.resolve() == resolved for existing in chain):
        return  # a diamond include: the shared parent is layered once
    source = _Source(path)
    source.parsed = _parse_items(source)
    for parent in source.parsed[3]["include"]:
        try:
            parent_path = (path.parent / parent) if parent.endswith(".toml") else find_profile(parent, profile_dir, host)
            if not parent_path.is_file():
                raise BadInput("not found")
        except BadInput:
            raise source.error(["profile"], "include", f"included profile {parent!r} not found") from None
        _collect_chain(parent_path, profile_dir, host, chain, stack + [resolved])
    chain.append(source)


def _resolve_variables(declared: dict[str, tuple[dict, _Source]], given: dict[str, str], host: Host,
                       path: Path) -> dict[str, str]:
    unknown = sorted(set(given) - set(declared))
    if unknown:
        known = ", ".join(sorted(declared)) or "none"
        raise BadInput(f"--var {unknown[0]}: profile {path.stem} has no such variable (known: {known})")
    values: dict[str, str] = {}
    pending = []
    for name, (spec, source) in declared.items():
        if name in given:
            values[name] = _check_variable(name, spec, str(given[name]), f"--var {name}")
            if spec.get("type") == "cpulist":
                offline = sorted(set(parse_cpu_list(values[name])) - set(host.online_cpus()))
                if offline:
                    raise BadInput(f"--var {name}={given[name]}: CPU {format_cpu_list(offline)} is not online "
                                   f"(online: {format_cpu_list(host.online_cpus())})")
        elif "default" in spec:
            values[name] = _check_variable(name, spec, str(spec["default"]),
                                           f"{source.path}:{locate(source.text, ['variables', name], 'default')}: "
                                           f"variables.{name}.default")
        elif "default_complement_of" in spec:
            pending.append((name, spec))
        elif spec.get("required", True):
            description = spec.get("description", "")
            raise BadInput(f"profile {path.stem} needs --var {name}=VALUE"
                           + (f" ({description})" if description else ""))
    for name, spec in pending:
        other = spec["default_complement_of"]
        if other not in values:
            raise BadInput(f"profile {path.stem}: variable {name} defaults to the complement of "
                           f"{other}, which is not set")
        rest = sorted(set(host.online_cpus()) - set(parse_cpu_list(values[other])))
        values[name] = format_cpu_list(rest)
    return values


def _check_variable(name: str, spec: dict, value: str, where: str) -> str:
    kind = spec.get("type", "text")
    if kind == "cpulist":
        try:
            cpus = parse_cpu_list(value)
        except ValueError:
            raise BadInput(f"{where}: {value!r} is not a CPU list (like 2-3,6)") from None
        if not cpus and value.strip():
            raise BadInput(f"{where}: {value!r} is not a CPU list (like 2-3,6)")
        return format_cpu_list(cpus)
    if kind == "int":
        try:
            return str(int(value))
        except ValueError:
            raise BadInput(f"{where}: {value!r} is not an integer") from None
    return value


def _substitute(item: ItemSpec, values: dict[str, str], chain: list[_Source]) -> ItemSpec:
    source = next(s for s in chain if s.path == item.file)
    table = [item.section] + ([] if SECTIONS[item.section].single_item else [item.key])
    fields = {}
    for key, value in item.fields.items():
        if isinstance(value, str):
            for name in VARIABLE_PATTERN.findall(value):
                if name not in values:
                    raise source.error(table, key, f"unknown variable ${{{name}}} "
                                       f"(declare it under [variables.{name}])")
            value = VARIABLE_PATTERN.sub(lambda match: values[match.group(1)], value)
        fields[key] = value
    for key in ("cpus", "mems"):
        if key in fields and str(fields[key]) != "all":
            try:
                parse_cpu_list(str(fields[key]))
            except ValueError:
                raise source.error(table, key, f"{fields[key]!r} is not a CPU list (like 2-3,6)") from None
    if item.section == "cmdline" and fields.get("format") == "cpulist":
        try:
            parse_cpu_list(cpulist_part(str(fields["value"])))
        except ValueError:
            raise source.error(table, "value", f"{fields['value']!r} does not end in a CPU list") from None
    return ItemSpec(item.section, item.key, fields, item.file, item.line)
