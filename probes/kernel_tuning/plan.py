"""Expand a profile against a host into plan items: current -> target, why, risk, source.

Reading only: nothing here writes. Each item carries the actions `apply` would take (a file
write, a directory to create, a PM QoS holder to start); check-only items (boot cmdline,
topology) carry none and say what to do instead.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import BadInput

from core.host import Host, format_cpu_list, parse_cpu_list
from probes.kernel_tuning import sysctld
from probes.kernel_tuning.profiles import ItemSpec, Profile, _cpulist_part

DMA_LATENCY_DEVICE = "/dev/cpu_dma_latency"
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


def _cmdline_matches(current: str | None, target: str, fmt: str) -> bool:
    if fmt == "flag":
        return True
    if current is None:
        return False
    if fmt == "cpulist":
        def split(value: str) -> tuple[set[str], list[int]]:
            flags = {p for p in value.split(",") if p and not p[0].isdigit()}
            return flags, parse_cpu_list(_cpulist_part(value))
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
            items.extend(getattr(self, f"_{spec.section}")(spec))
        items.extend(self._topology())
        return Plan(self.profile, items)

    def _item(self, spec: ItemSpec, **kwargs) -> PlanItem:
        kwargs.setdefault("why", spec.why)
        kwargs.setdefault("risk", spec.risk)
        kwargs.setdefault("reboot_required", False)
        kwargs.setdefault("optional", bool(spec.fields.get("optional", False)))
        return PlanItem(**kwargs)

    def _write_item(self, spec: ItemSpec, name: str, kind: str, path: str, target: str, fmt: str,
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
            return self._item(spec, item=name, kind=kind, target=target, current=None, compliant=None,
                              source=source, note=f"{path}: {why_missing}", unknown=unknown, **extra)
        target_key = compare_key(target.encode(), "cpulist" if fmt == "cpumask" else fmt)
        compliant = compare_key(raw, fmt) == target_key
        if target_bytes is None:
            target_bytes = (format_mask(parse_cpu_list(target)) if fmt == "cpumask" else target).encode() + b"\n"
        action = Action("write", path, target_bytes, fmt)
        return self._item(spec, item=name, kind=kind, target=target_key if fmt != "text" else target,
                          current=display(raw, fmt), compliant=compliant, source=source,
                          actions=[action], **extra)

    def _sysctl(self, spec: ItemSpec) -> list[PlanItem]:
        target = " ".join(str(spec.fields["value"]).split())
        names = [spec.key]
        if "*" in spec.key:
            base = self.host.path("/proc/sys")
            pattern = spec.key.replace(".", "/")
            names = sorted(str(p.relative_to(base)).replace("/", ".") for p in base.glob(pattern)) or [spec.key]
        items = []
        for name in names:
            path = "/proc/sys/" + name.replace(".", "/")
            items.append(self._write_item(spec, name, "sysctl", path, target, "text",
                                          self._sysctl_source(name, path), sysctl_key=name))
        return items

    def _sysctl_source(self, name: str, path: str) -> str:
        row = sysctld.last_assignment(self.assignments, name)
        current = compare_key(read_raw(self.host, path), "text")
        if f"sysctl.{name}" in self.cmdline:
            return f"kernel cmdline (sysctl.{name}={self.cmdline[f'sysctl.{name}']})"
        if row is None:
            return "kernel default" if current is not None else "absent"
        if current is not None and current != row.value:
            return f"runtime (boot value {row.value} from {row.where})"
        return row.where

    def _sysfs(self, spec: ItemSpec) -> list[PlanItem]:
        pattern = str(spec.fields["path"])
        fmt = spec.fields.get("format", "text")
        target = str(spec.fields["value"])
        parameter = SYSFS_BOOT_PARAMETERS.get(pattern)
        source = "kernel default or runtime"
        if parameter and parameter in self.cmdline:
            source = f"kernel cmdline ({parameter}={self.cmdline[parameter]})"
        if not any(char in pattern for char in "*?["):
            self._refuse_outside_kernel_filesystems(spec, pattern)
            return [self._sysfs_item(spec, f"sysfs:{spec.key}", pattern, target, fmt, source)]
        root = self.host.path("/")
        paths = sorted("/" + str(p.relative_to(root)) for p in root.glob(pattern.lstrip("/")))
        for path in paths:
            self._refuse_outside_kernel_filesystems(spec, path)
        if not paths:
            return [self._item(spec, item=f"sysfs:{spec.key}", kind="sysfs", target=target, current=None,
                               compliant=None, source="none", note=f"nothing matches {pattern}")]
        return [self._sysfs_item(spec, f"sysfs:{spec.key}:{path}", path, target, fmt, source) for path in paths]

    def _refuse_outside_kernel_filesystems(self, spec: ItemSpec, path: str) -> None:
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

    def _sysfs_item(self, spec, name, path, target, fmt, source) -> PlanItem:
        item = self._write_item(spec, name, "sysfs", path, target, fmt, source)
        if fmt == "selection" and item.compliant is False:
            offered = [word.strip("[]") for word in (read_raw(self.host, path) or b"").decode().split()]
            if len(offered) > 1 and target not in offered:
                # The kernel would refuse it (EINVAL); say so now rather than roll back later.
                item.compliant, item.actions = None, []
                item.note = f"{target} not offered here ({' '.join(offered)})"
        return item

    def _cpus(self, value, default: list[int]) -> list[int]:
        if value is None or str(value) == "all":
            return default
        return [cpu for cpu in parse_cpu_list(str(value)) if cpu in self.online]

    def _cpu_governor(self, spec: ItemSpec) -> list[PlanItem]:
        target = str(spec.fields["value"])
        items = []
        source = "cpufreq driver default"
        if "cpufreq.default_governor" in self.cmdline:
            source = f"kernel cmdline (cpufreq.default_governor={self.cmdline['cpufreq.default_governor']})"
        for cpu in self._cpus(spec.fields.get("cpus"), self.online):
            base = f"/sys/devices/system/cpu/cpu{cpu}/cpufreq"
            if not self.host.exists(f"{base}/scaling_governor"):
                continue
            available = self.host.read_optional(f"{base}/scaling_available_governors").split()
            item = self._write_item(spec, f"governor:cpu{cpu}", "governor", f"{base}/scaling_governor",
                                    target, "text", source)
            if available and target not in available and item.compliant is False:
                item.compliant, item.actions = None, []
                item.note = f"governor {target} not offered by this cpufreq driver ({' '.join(available)})"
            items.append(item)
        if not items:
            items.append(self._item(spec, item="governor", kind="governor", target=target, current=None,
                                    compliant=None, source="none",
                                    note="no cpufreq on this host (a VM, or the cpufreq driver is not loaded)"))
        return items

    def _irq_affinity(self, spec: ItemSpec) -> list[PlanItem]:
        cpus = self._cpus(spec.fields["cpus"], self.online)
        target = format_cpu_list(cpus)
        source = f"kernel cmdline (irqaffinity={self.cmdline['irqaffinity']})" if "irqaffinity" in self.cmdline \
            else "kernel default (all CPUs) or runtime"
        note = "irqbalance is running and will move IRQs back: stop and disable it" if self._irqbalance() else ""
        items = [self._mask_subset_item(spec, "irq:default_smp_affinity", "/proc/irq/default_smp_affinity",
                                        cpus, "cpumask", source, note)]
        irq_root = self.host.path("/proc/irq")
        numbers = sorted(int(p.name) for p in irq_root.iterdir() if p.name.isdigit()) if irq_root.is_dir() else []
        for number in numbers:
            path = f"/proc/irq/{number}/smp_affinity_list"
            if not self.host.exists(path):
                continue
            item = self._mask_subset_item(spec, f"irq:{number}", path, cpus, "cpulist", source, note)
            # Per-CPU and managed IRQs refuse new affinity (EIO): report, do not roll back for it.
            item.best_effort = True
            items.append(item)
        for item in items:
            item.target = target
        return items

    def _mask_subset_item(self, spec, name, path, cpus, fmt, source, note) -> PlanItem:
        item = self._write_item(spec, name, "irq", path, format_cpu_list(cpus), fmt, source)
        if item.current is not None:
            current = parse_cpu_list(compare_key(read_raw(self.host, path), fmt) or "")
            # Affinity inside the housekeeping set is compliant even if narrower.
            item.compliant = bool(current) and set(current) <= set(cpus)
            if item.compliant:
                item.actions = []
        item.note = item.note or note
        return item

    def _irqbalance(self) -> bool:
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

    def _cmdline(self, spec: ItemSpec) -> list[PlanItem]:
        fmt = spec.fields.get("format", "text")
        value = str(spec.fields.get("value", ""))
        target = spec.key if fmt == "flag" else f"{spec.key}={value}"
        present = spec.key in self.cmdline
        current_value = self.cmdline.get(spec.key)
        compliant = present and _cmdline_matches(current_value, value, fmt)
        current = None if not present else (spec.key if current_value is None else f"{spec.key}={current_value}")
        note = "" if compliant else (f"add `{target}` to GRUB_CMDLINE_LINUX in /etc/default/grub, "
                                     "run update-grub, reboot")
        return [self._item(spec, item=f"cmdline:{spec.key}", kind="cmdline", target=target, current=current,
                           compliant=compliant, reboot_required=True, source="kernel cmdline (/proc/cmdline)",
                           note=note)]

    def _pm_qos(self, spec: ItemSpec) -> list[PlanItem]:
        value_us = int(spec.fields["value_us"])
        path = self.host.path(DMA_LATENCY_DEVICE)
        target = f"<= {value_us} us"
        try:
            is_device = stat.S_ISCHR(os.stat(path).st_mode)
        except OSError:
            is_device = False
        if not is_device:
            return [self._item(spec, item="pm_qos:cpu_dma_latency", kind="pm_qos", target=target, current=None,
                               compliant=None, source="none", note=f"{DMA_LATENCY_DEVICE}: no such device")]
        raw = read_raw(self.host, DMA_LATENCY_DEVICE)
        current = int(compare_key(raw, "int32") or 2_000_000_000)
        compliant = current <= value_us
        item = self._item(spec, item="pm_qos:cpu_dma_latency", kind="pm_qos", target=target,
                          current=f"{current} us", compliant=compliant,
                          source="PM QoS requests held open by processes (2000000000 = no limit)",
                          note="" if compliant else "held by a guardian-agent holder process until rollback")
        if not compliant:
            item.actions = [Action("pm_qos", DMA_LATENCY_DEVICE, value_us=value_us, compare="int32")]
        return [item]

    def _cpuset(self, spec: ItemSpec) -> list[PlanItem]:
        cpus = format_cpu_list(self._cpus(spec.fields["cpus"], self.online))
        mems = str(spec.fields.get("mems") or self.host.read_optional("/sys/devices/system/node/online") or "0")
        mount = self._cpuset_mount()
        name = f"cpuset:{spec.key}"
        if mount is None:
            return [self._item(spec, item=name, kind="cpuset", target=cpus, current=None, compliant=None,
                               source="none", note="no cpuset cgroup controller mounted")]
        directory = f"{mount}/{spec.key}"
        actions = []
        current = None
        if not self.host.path(directory).is_dir():
            actions.append(Action("mkdir", directory))
        else:
            current = compare_key(read_raw(self.host, f"{directory}/cpuset.cpus"), "cpulist")
        if current != compare_key(cpus.encode(), "cpulist"):
            actions.append(Action("write", f"{directory}/cpuset.mems", mems.encode() + b"\n", "cpulist"))
            actions.append(Action("write", f"{directory}/cpuset.cpus", cpus.encode() + b"\n", "cpulist"))
        return [self._item(spec, item=name, kind="cpuset", target=cpus, current=current,
                           compliant=not actions, source=directory, actions=actions,
                           note="move housekeeping services into it (systemd: AllowedCPUs=, or cgexec)")]

    def _cpuset_mount(self) -> str | None:
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


def build_plan(host: Host, profile: Profile) -> Plan:
    return Planner(host, profile).build()
