"""Expand a profile against a host into plan items: current -> target, why, risk, source.

Reading only: nothing here writes. Each item carries the actions `apply` would take (a file
write, a directory to create, a PM QoS holder to start); check-only items (boot cmdline,
topology) carry none and say what to do instead.
"""

from __future__ import annotations

import os
import re
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from core.errors import BadInput

from core.host import Host, format_cpu_list, parse_cpu_list
from probes.kernel_tuning import sysctld

if TYPE_CHECKING:  # profiles.py imports SECTIONS from here; the types are for annotations only
    from probes.kernel_tuning.profiles import ItemSpec, Profile

DMA_LATENCY_DEVICE = "/dev/cpu_dma_latency"
SYSFS_FORMATS = ("text", "selection", "cpumask", "cpulist")
CMDLINE_FORMATS = ("text", "cpulist", "flag")
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.-]+$")
# Kernel cmdline parameters that set a sysfs default at boot, to name the source of a value.
SYSFS_BOOT_PARAMETERS = {
    "/sys/kernel/mm/transparent_hugepage/enabled": "transparent_hugepage",
    "/sys/kernel/mm/transparent_hugepage/defrag": "transparent_hugepage_defrag",
}


# The kernel keeps vm.dirty_bytes/vm.dirty_ratio (and the background pair) mutually exclusive:
# writing one zeroes the other, and writing 0 to a *_bytes one is refused (EINVAL, minimum two
# pages). So "restore dirty_bytes to 0" really means "write the ratio back"; apply journals the
# companion's original too.
COMPANIONS = {
    "/proc/sys/vm/dirty_bytes": "/proc/sys/vm/dirty_ratio",
    "/proc/sys/vm/dirty_ratio": "/proc/sys/vm/dirty_bytes",
    "/proc/sys/vm/dirty_background_bytes": "/proc/sys/vm/dirty_background_ratio",
    "/proc/sys/vm/dirty_background_ratio": "/proc/sys/vm/dirty_background_bytes",
}


@dataclass
class Action:
    """One step of apply, journaled before it runs."""

    op: str  # write | mkdir | pm_qos
    path: str  # absolute host path
    target: bytes = b""
    compare: str = "text"  # how rollback compares values: text|selection|cpumask|cpulist|int32
    value_us: int = 0

    @property
    def companion(self) -> str | None:
        return COMPANIONS.get(self.path)


@dataclass
class PlanItem:
    item: str
    kind: str
    target: str
    current: str | None
    compliant: bool | None  # None: not applicable on this host (with `note` saying why)
    why: str
    risk: str
    reboot_required: bool
    source: str
    note: str = ""
    actions: list[Action] = field(default_factory=list)
    best_effort: bool = False  # a refused write is reported, not a reason to roll back
    sysctl_key: str = ""  # for --persist
    unknown: bool = False  # the kernel has no such setting: a typo, unless the item is optional
    optional: bool = False

    @property
    def status(self) -> str:
        if self.unknown and not self.optional:
            return "unknown"
        if self.compliant is None:
            return "n/a"
        if self.compliant:
            return "ok"
        return "reboot" if self.reboot_required else "drift"


@dataclass
class Plan:
    profile: Profile
    items: list[PlanItem]

    @property
    def drifted(self) -> list[PlanItem]:
        return [item for item in self.items if item.compliant is False]

    @property
    def unknown(self) -> list[PlanItem]:
        """Settings this kernel does not have and the profile did not mark `optional = true`."""
        return [item for item in self.items if item.unknown and not item.optional]

    @property
    def applicable(self) -> list[PlanItem]:
        return [item for item in self.items if item.compliant is False and item.actions]

    def cmdline_line(self) -> str:
        """The exact parameters to add to the boot command line, in one line."""
        missing = [item for item in self.items if item.kind == "cmdline" and item.compliant is False]
        return " ".join(item.target for item in missing)


# ---------------------------------------------------------------- value comparison

def read_raw(host: Host, absolute: str) -> bytes | None:
    try:
        return host.path(absolute).read_bytes()
    except OSError:
        return None


def parse_mask(text: str) -> list[int]:
    """Kernel hex cpumask ("ff,00000001") -> cpu list."""
    digits = text.strip().replace(",", "")
    value = int(digits or "0", 16)
    return [bit for bit in range(value.bit_length()) if value >> bit & 1]


def format_mask(cpus: list[int]) -> str:
    """cpu list -> kernel hex cpumask, comma-separated 32-bit groups like the kernel prints."""
    value = 0
    for cpu in cpus:
        value |= 1 << cpu
    text = f"{value:x}"
    groups = []
    while len(text) > 8:
        groups.insert(0, text[-8:])
        text = text[:-8]
    groups.insert(0, text)
    return ",".join(groups)


def selected_word(text: str) -> str:
    """"always [madvise] never" -> "madvise"; plain text unchanged."""
    words = text.split()
    for word in words:
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return " ".join(words)


def compare_key(raw: bytes | None, fmt: str) -> str | None:
    """The comparable form of a value; whitespace never matters (the kernel
    prints "0-3\n" for what was written as "0-3", and tabs in some sysfs files)."""
    if raw is None:
        return None
    if fmt == "int32":
        return str(struct.unpack("i", raw[:4])[0]) if len(raw) >= 4 else raw.decode(errors="replace").strip()
    text = raw.decode(errors="replace")
    try:
        if fmt == "selection":
            return selected_word(text)
        if fmt == "cpumask":
            return format_cpu_list(parse_mask(text))
        if fmt == "cpulist":
            return format_cpu_list(parse_cpu_list(text))
    except ValueError:
        pass
    return " ".join(text.split())


def display(raw: bytes | None, fmt: str) -> str | None:
    key = compare_key(raw, fmt)
    if key is not None and fmt == "cpumask":
        return f"{' '.join(raw.decode().split())} (cpus {key or 'none'})"
    return key


# ---------------------------------------------------------------- cmdline

def parse_cmdline(text: str) -> dict[str, str | None]:
    """Kernel parameters (before the "--" that hands the rest to init)."""
    params: dict[str, str | None] = {}
    for token in text.split():
        if token == "--":
            break
        key, sep, value = token.partition("=")
        params[key] = value if sep else None
    return params


def cpulist_part(value: str) -> str:
    """isolcpus accepts leading flags: "managed_irq,domain,2-3" -> "2-3"."""
    parts = [p for p in value.split(",") if p and (p[0].isdigit())]
    return ",".join(parts)



def _cmdline_matches(current: str | None, target: str, fmt: str) -> bool:
    if fmt == "flag":
        return True
    if current is None:
        return False
    if fmt == "cpulist":
        def split(value: str) -> tuple[set[str], list[int]]:
            flags = {p for p in value.split(",") if p and not p[0].isdigit()}
            return flags, parse_cpu_list(cpulist_part(value))
        try:
            return split(current) == split(target)
        except ValueError:
            return False
    return current.strip() == target.strip()


# ---------------------------------------------------------------- building the plan

class Planner:
    def __init__(self, host: Host, profile: Profile):
        self.host = host
        self.profile = profile
        self.cmdline = parse_cmdline(host.cmdline())
        self.assignments = sysctld.boot_assignments(host)
        self.online = host.online_cpus()

    def build(self) -> Plan:
        items: list[PlanItem] = []
        for spec in self.profile.items:
            items.extend(SECTIONS[spec.section].plan(self, spec))
        items.extend(self._topology())
        return Plan(self.profile, items)

    def plan_item(self, spec: ItemSpec, **kwargs) -> PlanItem:
        kwargs.setdefault("why", spec.why)
        kwargs.setdefault("risk", spec.risk)
        kwargs.setdefault("reboot_required", False)
        kwargs.setdefault("optional", bool(spec.fields.get("optional", False)))
        return PlanItem(**kwargs)

    def write_item(self, spec: ItemSpec, name: str, kind: str, path: str, target: str, fmt: str,
                    source: str, target_bytes: bytes | None = None, **extra) -> PlanItem:
        raw = read_raw(self.host, path)
        if raw is None:
            present = self.host.path(path).exists()
            unknown = kind == "sysctl" and not present
            if unknown:
                why_missing = ("optional, not on this kernel" if spec.fields.get("optional") else
                               "unknown sysctl: this kernel has no such setting (misspelled? mark the item "
                               "`optional = true` if it exists only on some kernels)")
            else:
                why_missing = "not present on this kernel" if not present else "unreadable"
            return self.plan_item(spec, item=name, kind=kind, target=target, current=None, compliant=None,
                              source=source, note=f"{path}: {why_missing}", unknown=unknown, **extra)
        target_key = compare_key(target.encode(), "cpulist" if fmt == "cpumask" else fmt)
        compliant = compare_key(raw, fmt) == target_key
        if target_bytes is None:
            target_bytes = (format_mask(parse_cpu_list(target)) if fmt == "cpumask" else target).encode() + b"\n"
        action = Action("write", path, target_bytes, fmt)
        return self.plan_item(spec, item=name, kind=kind, target=target_key if fmt != "text" else target,
                          current=display(raw, fmt), compliant=compliant, source=source,
                          actions=[action], **extra)

    def sysctl_source(self, name: str, path: str) -> str:
        row = sysctld.last_assignment(self.assignments, name)
        current = compare_key(read_raw(self.host, path), "text")
        if f"sysctl.{name}" in self.cmdline:
            return f"kernel cmdline (sysctl.{name}={self.cmdline[f'sysctl.{name}']})"
        if row is None:
            return "kernel default" if current is not None else "absent"
        if current is not None and current != row.value:
            return f"runtime (boot value {row.value} from {row.where})"
        return row.where

    def refuse_outside_kernel_filesystems(self, spec: ItemSpec, path: str) -> None:
        """A sysfs item names a kernel knob; through a symlink (/proc/self/root/etc/passwd,
        /sys/... -> a file elsewhere) it could name any file, so the real path must stay inside
        /proc/sys, /sys or a cgroup filesystem of this host's root."""
        resolved = Path(os.path.realpath(self.host.path(path)))
        root = Path(os.path.realpath(self.host.path("/")))
        allowed = [root / "proc/sys", root / "sys", *self._cgroup_mounts(root)]
        if not any(resolved == base or base in resolved.parents for base in allowed):
            shown = "/" + str(resolved.relative_to(root)) if root in resolved.parents else str(resolved)
            raise BadInput(f"{spec.file}:{spec.line}: sysfs.{spec.key}.path: {path} resolves to {shown}, "
                           "outside /proc/sys, /sys and the cgroup filesystems: refused")

    def _cgroup_mounts(self, root: Path) -> list[Path]:
        mounts = []
        for line in self.host.read_optional("/proc/self/mounts").splitlines():
            fields = line.split()
            if len(fields) >= 3 and fields[2] in ("cgroup", "cgroup2"):
                mounts.append(root / fields[1].lstrip("/"))
        return mounts

    def sysfs_item(self, spec, name, path, target, fmt, source) -> PlanItem:
        item = self.write_item(spec, name, "sysfs", path, target, fmt, source)
        if fmt == "selection" and item.compliant is False:
            offered = [word.strip("[]") for word in (read_raw(self.host, path) or b"").decode().split()]
            if len(offered) > 1 and target not in offered:
                # The kernel would refuse it (EINVAL); say so now rather than roll back later.
                item.compliant, item.actions = None, []
                item.note = f"{target} not offered here ({' '.join(offered)})"
        return item

    def chosen_cpus(self, value, default: list[int]) -> list[int]:
        if value is None or str(value) == "all":
            return default
        return [cpu for cpu in parse_cpu_list(str(value)) if cpu in self.online]

    def mask_subset_item(self, spec, name, path, cpus, fmt, source, note) -> PlanItem:
        item = self.write_item(spec, name, "irq", path, format_cpu_list(cpus), fmt, source)
        if item.current is not None:
            current = parse_cpu_list(compare_key(read_raw(self.host, path), fmt) or "")
            # Affinity inside the housekeeping set is compliant even if narrower.
            item.compliant = bool(current) and set(current) <= set(cpus)
            if item.compliant:
                item.actions = []
        item.note = item.note or note
        return item

    def irqbalance_running(self) -> bool:
        proc = self.host.path("/proc")
        try:
            entries = [p for p in proc.iterdir() if p.name.isdigit()]
        except OSError:
            return False
        for entry in entries:
            try:
                if (entry / "comm").read_text().strip() == "irqbalance":
                    return True
            except OSError:
                continue
        return False

    def cpuset_mount(self) -> str | None:
        if self.host.exists("/sys/fs/cgroup/cpuset/cpuset.cpus"):
            return "/sys/fs/cgroup/cpuset"
        if "cpuset" in self.host.read_optional("/sys/fs/cgroup/cgroup.controllers").split():
            return "/sys/fs/cgroup"
        return None

    def _topology(self) -> list[PlanItem]:
        topology = self.profile.topology
        variables = self.profile.variables
        if not topology or "isolated_cores" not in variables:
            return []
        why = str(topology.get("why", "isolation only holds when nothing else shares the core"))
        isolated = parse_cpu_list(variables["isolated_cores"])
        housekeeping = parse_cpu_list(variables.get("housekeeping_cores", "")) or \
            sorted(set(self.online) - set(isolated))
        items = []
        overlap = sorted(set(isolated) & set(housekeeping))
        if overlap:
            items.append(PlanItem("topology:overlap", "topology", "isolated and housekeeping disjoint",
                                  f"cpus {format_cpu_list(overlap)} in both", False, why, "high", False,
                                  "profile variables", note="a CPU is either isolated or housekeeping"))
        if topology.get("smt_siblings_isolated", True):
            for cpu in isolated:
                siblings_text = self.host.read_optional(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list")
                if not siblings_text:
                    continue
                siblings = [s for s in parse_cpu_list(siblings_text) if s != cpu]
                exposed = [s for s in siblings if s not in isolated]
                items.append(PlanItem(
                    f"topology:smt:cpu{cpu}", "topology", "SMT siblings isolated too",
                    f"siblings {format_cpu_list(siblings) or 'none'}", not exposed, why, "medium", False,
                    f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list",
                    note=(f"sibling cpu {format_cpu_list(exposed)} is not isolated: it shares the core's caches "
                          "and pipeline; isolate it too or take it offline") if exposed else ""))
        minimum = int(topology.get("min_housekeeping_cores", 1))
        items.append(PlanItem("topology:housekeeping_cores", "topology", f">= {minimum} housekeeping cores",
                              f"{len(housekeeping)} ({format_cpu_list(housekeeping) or 'none'})",
                              len(housekeeping) >= minimum, why, "high", False, "profile variables",
                              note="" if len(housekeeping) >= minimum else
                              "too few housekeeping cores: kernel threads, IRQs and services will crowd them"))
        return items


# ---------------------------------------------------------------- section kinds

def check_scalar(source, table: list[str], fields: dict, key: str, required: bool = True) -> None:
    """`source` is the profile file being read (profiles._Source): its error() names file:line."""
    if key not in fields:
        if required:
            raise source.error(table, key, "missing required key")
        return
    value = fields[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise source.error(table, key, f"expected a string or an integer, got {type(value).__name__}")


class Section:
    """One kind of profile section: the keys an item may have, how it is validated when the
    profile is read (profiles.py), and how it becomes plan items on a host (Planner). A new kind
    of tuning is one subclass here, registered in SECTIONS, plus an action kind in
    agent/tuning/actions.py if it changes the host in a new way."""

    name: ClassVar[str] = ""
    keys: ClassVar[frozenset[str]] = frozenset()
    single_item: ClassVar[bool] = False  # [cpu_governor] rather than [sysctl."vm.x"]

    def validate(self, source, key: str, table: list[str], fields: dict) -> None:
        return None

    def plan(self, planner: "Planner", spec: ItemSpec) -> list[PlanItem]:
        raise NotImplementedError


class SysctlSection(Section):
    """A /proc/sys value by dotted name (globs allowed: net.ipv4.conf.*.rp_filter)."""

    name = "sysctl"
    keys = frozenset({"value"})

    def validate(self, source, key, table, fields):
        if not re.match(r"^[a-z0-9_]+(\.[A-Za-z0-9_*-]+)+$", key):
            raise source.error([self.name], key, "not a sysctl name (expected dotted, like vm.swappiness)")
        check_scalar(source, table, fields, "value")

    def plan(self, planner, spec):
        target = " ".join(str(spec.fields["value"]).split())
        names = [spec.key]
        if "*" in spec.key:
            base = planner.host.path("/proc/sys")
            pattern = spec.key.replace(".", "/")
            names = sorted(str(p.relative_to(base)).replace("/", ".") for p in base.glob(pattern)) or [spec.key]
        items = []
        for name in names:
            path = "/proc/sys/" + name.replace(".", "/")
            items.append(planner.write_item(spec, name, "sysctl", path, target, "text",
                                          planner.sysctl_source(name, path), sysctl_key=name))
        return items


class SysfsSection(Section):
    """A /sys (or /proc) file by path, compared as text, selection, cpumask or cpulist."""

    name = "sysfs"
    keys = frozenset({"path", "value", "format"})

    def validate(self, source, key, table, fields):
        check_scalar(source, table, fields, "path")
        path = str(fields["path"])
        if not (path.startswith("/sys/") or path.startswith("/proc/")) or ".." in path:
            raise source.error(table, "path", "must be an absolute path under /sys or /proc")
        check_scalar(source, table, fields, "value")
        if fields.get("format", "text") not in SYSFS_FORMATS:
            raise source.error(table, "format", f"expected one of {', '.join(SYSFS_FORMATS)}")

    def plan(self, planner, spec):
        pattern = str(spec.fields["path"])
        fmt = spec.fields.get("format", "text")
        target = str(spec.fields["value"])
        parameter = SYSFS_BOOT_PARAMETERS.get(pattern)
        source = "kernel default or runtime"
        if parameter and parameter in planner.cmdline:
            source = f"kernel cmdline ({parameter}={planner.cmdline[parameter]})"
        if not any(char in pattern for char in "*?["):
            planner.refuse_outside_kernel_filesystems(spec, pattern)
            return [planner.sysfs_item(spec, f"sysfs:{spec.key}", pattern, target, fmt, source)]
        root = planner.host.path("/")
        paths = sorted("/" + str(p.relative_to(root)) for p in root.glob(pattern.lstrip("/")))
        for path in paths:
            planner.refuse_outside_kernel_filesystems(spec, path)
        if not paths:
            return [planner.plan_item(spec, item=f"sysfs:{spec.key}", kind="sysfs", target=target, current=None,
                               compliant=None, source="none", note=f"nothing matches {pattern}")]
        return [planner.sysfs_item(spec, f"sysfs:{spec.key}:{path}", path, target, fmt, source) for path in paths]


class CpuGovernorSection(Section):
    """The cpufreq governor of the chosen CPUs (one item)."""

    name = "cpu_governor"
    keys = frozenset({"value", "cpus"})
    single_item = True

    def validate(self, source, key, table, fields):
        check_scalar(source, table, fields, "value")
        check_scalar(source, table, fields, "cpus", required=False)

    def plan(self, planner, spec):
        target = str(spec.fields["value"])
        items = []
        source = "cpufreq driver default"
        if "cpufreq.default_governor" in planner.cmdline:
            source = f"kernel cmdline (cpufreq.default_governor={planner.cmdline['cpufreq.default_governor']})"
        for cpu in planner.chosen_cpus(spec.fields.get("cpus"), planner.online):
            base = f"/sys/devices/system/cpu/cpu{cpu}/cpufreq"
            if not planner.host.exists(f"{base}/scaling_governor"):
                continue
            available = planner.host.read_optional(f"{base}/scaling_available_governors").split()
            item = planner.write_item(spec, f"governor:cpu{cpu}", "governor", f"{base}/scaling_governor",
                                    target, "text", source)
            if available and target not in available and item.compliant is False:
                item.compliant, item.actions = None, []
                item.note = f"governor {target} not offered by this cpufreq driver ({' '.join(available)})"
            items.append(item)
        if not items:
            items.append(planner.plan_item(spec, item="governor", kind="governor", target=target, current=None,
                                    compliant=None, source="none",
                                    note="no cpufreq on this host (a VM, or the cpufreq driver is not loaded)"))
        return items


class IrqAffinitySection(Section):
    """Every IRQ's affinity (and the default) inside the housekeeping CPUs (one item)."""

    name = "irq_affinity"
    keys = frozenset({"cpus"})
    single_item = True

    def validate(self, source, key, table, fields):
        check_scalar(source, table, fields, "cpus")

    def plan(self, planner, spec):
        cpus = planner.chosen_cpus(spec.fields["cpus"], planner.online)
        target = format_cpu_list(cpus)
        source = f"kernel cmdline (irqaffinity={planner.cmdline['irqaffinity']})" if "irqaffinity" in planner.cmdline \
            else "kernel default (all CPUs) or runtime"
        note = ("irqbalance is running and will move IRQs back: stop and disable it"
                if planner.irqbalance_running() else "")
        items = [planner.mask_subset_item(spec, "irq:default_smp_affinity", "/proc/irq/default_smp_affinity",
                                        cpus, "cpumask", source, note)]
        irq_root = planner.host.path("/proc/irq")
        numbers = sorted(int(p.name) for p in irq_root.iterdir() if p.name.isdigit()) if irq_root.is_dir() else []
        for number in numbers:
            path = f"/proc/irq/{number}/smp_affinity_list"
            if not planner.host.exists(path):
                continue
            item = planner.mask_subset_item(spec, f"irq:{number}", path, cpus, "cpulist", source, note)
            # Per-CPU and managed IRQs refuse new affinity (EIO): report, do not roll back for it.
            item.best_effort = True
            items.append(item)
        for item in items:
            item.target = target
        return items


class CmdlineSection(Section):
    """A boot parameter, audited against /proc/cmdline: reboot-required, never written."""

    name = "cmdline"
    keys = frozenset({"value", "format"})

    def validate(self, source, key, table, fields):
        fmt = fields.get("format", "text")
        if fmt not in CMDLINE_FORMATS:
            raise source.error(table, "format", f"expected one of {', '.join(CMDLINE_FORMATS)}")
        check_scalar(source, table, fields, "value", required=fmt != "flag")

    def plan(self, planner, spec):
        fmt = spec.fields.get("format", "text")
        value = str(spec.fields.get("value", ""))
        target = spec.key if fmt == "flag" else f"{spec.key}={value}"
        present = spec.key in planner.cmdline
        current_value = planner.cmdline.get(spec.key)
        compliant = present and _cmdline_matches(current_value, value, fmt)
        current = None if not present else (spec.key if current_value is None else f"{spec.key}={current_value}")
        note = "" if compliant else (f"add `{target}` to GRUB_CMDLINE_LINUX in /etc/default/grub, "
                                     "run update-grub, reboot")
        return [planner.plan_item(spec, item=f"cmdline:{spec.key}", kind="cmdline", target=target, current=current,
                           compliant=compliant, reboot_required=True, source="kernel cmdline (/proc/cmdline)",
                           note=note)]


class PmQosSection(Section):
    """A /dev/cpu_dma_latency request, held by a child process until rollback."""

    name = "pm_qos"
    keys = frozenset({"value_us"})

    def validate(self, source, key, table, fields):
        if key != "cpu_dma_latency":
            raise source.error([self.name], key, "only cpu_dma_latency is supported")
        value = fields.get("value_us")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 2_000_000_000:
            raise source.error(table, "value_us", "expected an integer number of microseconds (0 = poll)")

    def plan(self, planner, spec):
        value_us = int(spec.fields["value_us"])
        path = planner.host.path(DMA_LATENCY_DEVICE)
        target = f"<= {value_us} us"
        try:
            is_device = stat.S_ISCHR(os.stat(path).st_mode)
        except OSError:
            is_device = False
        if not is_device:
            return [planner.plan_item(spec, item="pm_qos:cpu_dma_latency", kind="pm_qos", target=target, current=None,
                               compliant=None, source="none", note=f"{DMA_LATENCY_DEVICE}: no such device")]
        raw = read_raw(planner.host, DMA_LATENCY_DEVICE)
        current = int(compare_key(raw, "int32") or 2_000_000_000)
        compliant = current <= value_us
        item = planner.plan_item(spec, item="pm_qos:cpu_dma_latency", kind="pm_qos", target=target,
                          current=f"{current} us", compliant=compliant,
                          source="PM QoS requests held open by processes (2000000000 = no limit)",
                          note="" if compliant else "held by a guardian-agent holder process until rollback")
        if not compliant:
            item.actions = [Action("pm_qos", DMA_LATENCY_DEVICE, value_us=value_us, compare="int32")]
        return [item]


class CpusetSection(Section):
    """A cgroup cpuset for housekeeping tasks: the directory and its cpus/mems."""

    name = "cpuset"
    keys = frozenset({"cpus", "mems"})

    def validate(self, source, key, table, fields):
        if not NAME_PATTERN.match(key):
            raise source.error([self.name], key, "cpuset name: use letters, digits, '.', '_' or '-'")
        check_scalar(source, table, fields, "cpus")
        check_scalar(source, table, fields, "mems", required=False)

    def plan(self, planner, spec):
        cpus = format_cpu_list(planner.chosen_cpus(spec.fields["cpus"], planner.online))
        mems = str(spec.fields.get("mems") or planner.host.read_optional("/sys/devices/system/node/online") or "0")
        mount = planner.cpuset_mount()
        name = f"cpuset:{spec.key}"
        if mount is None:
            return [planner.plan_item(spec, item=name, kind="cpuset", target=cpus, current=None, compliant=None,
                               source="none", note="no cpuset cgroup controller mounted")]
        directory = f"{mount}/{spec.key}"
        actions = []
        current = None
        if not planner.host.path(directory).is_dir():
            actions.append(Action("mkdir", directory))
        else:
            current = compare_key(read_raw(planner.host, f"{directory}/cpuset.cpus"), "cpulist")
        if current != compare_key(cpus.encode(), "cpulist"):
            actions.append(Action("write", f"{directory}/cpuset.mems", mems.encode() + b"\n", "cpulist"))
            actions.append(Action("write", f"{directory}/cpuset.cpus", cpus.encode() + b"\n", "cpulist"))
        return [planner.plan_item(spec, item=name, kind="cpuset", target=cpus, current=current,
                           compliant=not actions, source=directory, actions=actions,
                           note="move housekeeping services into it (systemd: AllowedCPUs=, or cgexec)")]


class CgroupCpuSection(Section):
    """A CPU bandwidth limit on a cgroup: v1 cpu.cfs_quota_us (+ cpu.cfs_period_us), or v2
    cpu.max where the host has no v1 cpu hierarchy. quota_us = -1 lifts the limit ("max" in v2).
    The cgroup must exist: the item limits a workload's group, it never creates one."""

    name = "cgroup_cpu"
    keys = frozenset({"cgroup", "quota_us", "period_us"})

    def validate(self, source, key, table, fields):
        if not NAME_PATTERN.match(key):
            raise source.error([self.name], key, "item name: use letters, digits, '.', '_' or '-'")
        check_scalar(source, table, fields, "cgroup")
        cgroup = str(fields["cgroup"]).strip("/")
        if not cgroup or ".." in cgroup.split("/"):
            raise source.error(table, "cgroup", "expected a cgroup path relative to its hierarchy, like trading/strategy")
        # The kernel refuses quotas and periods under 1 ms (EINVAL), v1 and v2 alike.
        for name in ("quota_us", "period_us"):
            value = fields.get(name, 100_000 if name == "period_us" else None)
            if isinstance(value, bool) or not isinstance(value, int) or not (
                    value >= 1000 or (name == "quota_us" and value == -1)):
                raise source.error(table, name, "expected an integer number of microseconds >= 1000"
                                                + (" (-1 = no limit)" if name == "quota_us" else ""))

    def plan(self, planner, spec):
        cgroup = str(spec.fields["cgroup"]).strip("/")
        quota, period = int(spec.fields["quota_us"]), spec.fields.get("period_us")
        name = f"cgroup_cpu:{spec.key}"
        if planner.host.exists("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):
            directory = f"/sys/fs/cgroup/cpu/{cgroup}"
            actions = [(f"{directory}/cpu.cfs_period_us", str(period))] if period else []
            actions.append((f"{directory}/cpu.cfs_quota_us", str(quota)))
        elif "cpu" in planner.host.read_optional("/sys/fs/cgroup/cgroup.controllers").split():
            directory = f"/sys/fs/cgroup/{cgroup}"
            # Without period_us the group keeps its own period (cpu.max is "QUOTA PERIOD").
            current_period = (planner.host.read_optional(f"{directory}/cpu.max").split() or ["", "100000"])[-1]
            actions = [(f"{directory}/cpu.max", f"{'max' if quota < 0 else quota} {period or current_period}")]
        else:
            return [planner.plan_item(spec, item=name, kind="cgroup_cpu", target=str(quota), current=None,
                                      compliant=None, source="none", note="no cgroup cpu controller mounted")]
        if not planner.host.path(directory).is_dir():
            raise BadInput(f"{spec.file}:{spec.line}: cgroup_cpu.{spec.key}.cgroup: {directory} does not exist")
        for path, _ in actions:
            planner.refuse_outside_kernel_filesystems(spec, path)
        items = [planner.write_item(spec, name, "cgroup_cpu", path, value, "text", directory) for path, value in actions]
        item = items[-1]
        item.target = " ".join(value for _, value in actions)
        item.current = " ".join(str(i.current) for i in items)
        item.compliant = all(i.compliant for i in items)
        item.actions = [] if item.compliant else [a for i in items for a in i.actions]
        return [item]


SECTIONS: dict[str, Section] = {section.name: section for section in (
    SysctlSection(), SysfsSection(), CpuGovernorSection(), IrqAffinitySection(), CmdlineSection(),
    PmQosSection(), CpusetSection(), CgroupCpuSection())}


def build_plan(host: Host, profile: Profile) -> Plan:
    return Planner(host, profile).build()
