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
from core.toml_config import TomlDocument, TomlTable, parse_toml_text, read_toml_text
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

    def locate_parts(self, parts: tuple) -> int:
        """The line of a key path: its last part is the key, the rest its table."""
        return locate(self.text, [str(part) for part in parts[:-1]], str(parts[-1])) if parts else 1

    def root(self) -> TomlTable:
        return TomlTable.root(self.data, str(self.path), known=TOP_LEVEL, locate=self.locate_parts)

    def error(self, table: list[str], key: str | None, message: str) -> BadInput:
        """core/toml_config's wording, with the line number tomllib cannot give."""
        document = TomlDocument(f"{self.path}:{locate(self.text, table, key)}")
        return document.error(tuple(table) + ((key,) if key else ()), message)


def _check_common(item: TomlTable) -> None:
    item.string("why", None, allow_empty=True)
    item.boolean("optional", False)
    if "risk" in item:
        item.choice("risk", RISKS)


def _parse_items(source: _Source) -> tuple[list[ItemSpec], dict, dict, dict]:
    root = source.root()
    header = root.table("profile", PROFILE_KEYS)
    include = header.raw("include", [])
    if isinstance(include, str):
        include = [include]
    if not isinstance(include, list) or not all(isinstance(i, str) for i in include):
        header.fail("include", "expected a profile name or a list of names")

    variables = root.table("variables")
    for _name, spec in variables.named_tables(known=VARIABLE_KEYS):
        spec.choice("type", VARIABLE_TYPES, "text")

    topology = root.table("topology", TOPOLOGY_KEYS)
    topology.boolean("smt_siblings_isolated", False)
    if "min_housekeeping_cores" in topology:  # an int from here on, as the planner counts cores with it
        topology.data["min_housekeeping_cores"] = topology.number("min_housekeeping_cores", low=0, integer=True)

    items: list[ItemSpec] = []
    for section, kind in SECTIONS.items():
        if section not in root:
            continue
        body = root.table(section)
        entries = [("", body.data)] if kind.single_item else list(body.data.items())
        for key, fields in entries:
            table = [section] + ([key] if key else [])
            if not isinstance(fields, dict):
                body.fail(key, "expected a table of settings (value, why, risk)")
            _check_common(TomlTable(fields, root.document, tuple(table), known=kind.keys | COMMON_KEYS))
            kind.validate(source, key, table, fields)
            items.append(ItemSpec(section, key or section, dict(fields), source.path,
                                  locate(source.text, table)))
    return items, variables.data, topology.data, {"include": include, "description": header.raw("description", "")}


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
