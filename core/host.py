"""One seam for every path under /proc, /sys, /etc and /dev, so tests can point at a fake tree."""

from __future__ import annotations

import os
import platform
import socket
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Host:
    root: Path = Path("/")

    @classmethod
    def real(cls) -> "Host":
        return cls(Path("/"))

    def path(self, absolute: str) -> Path:
        """Map an absolute host path (/proc/stat) into this host's root."""
        return self.root / absolute.lstrip("/")

    def read_text(self, absolute: str) -> str:
        return self.path(absolute).read_text()

    def read_bytes(self, absolute: str) -> bytes:
        return self.path(absolute).read_bytes()

    def read_optional(self, absolute: str, default: str = "") -> str:
        try:
            return self.read_text(absolute).strip()
        except OSError:
            return default

    def exists(self, absolute: str) -> bool:
        return self.path(absolute).exists()

    @property
    def is_real(self) -> bool:
        return self.root == Path("/")

    def boot_id(self) -> str:
        return self.read_optional("/proc/sys/kernel/random/boot_id", "unknown-boot")

    def kernel_release(self) -> str:
        return self.read_optional("/proc/sys/kernel/osrelease", platform.release())

    def hostname(self) -> str:
        return self.read_optional("/proc/sys/kernel/hostname", socket.gethostname())

    def cmdline(self) -> str:
        return self.read_optional("/proc/cmdline")

    def cpu_model(self) -> str:
        for line in self.read_optional("/proc/cpuinfo").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
        return platform.processor() or "unknown"

    def online_cpus(self) -> list[int]:
        text = self.read_optional("/sys/devices/system/cpu/online")
        return parse_cpu_list(text) if text else list(range(os.cpu_count() or 1))

    def isolated_cpus(self) -> list[int]:
        return parse_cpu_list(self.read_optional("/sys/devices/system/cpu/isolated"))

    def pid_exists(self, pid: int) -> bool:
        return self.path(f"/proc/{pid}").is_dir()


def parse_cpu_list(text: str) -> list[int]:
    """Parse the kernel's cpu list format ("0-3,8,10-11") into a sorted list."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            low, high = part.split("-", 1)
            stride = 1
            if ":" in high:  # "0-15:2" (stride form accepted by isolcpus and cpusets)
                high, stride_text = high.split(":", 1)
                stride = int(stride_text.split("/")[0])
            cpus.update(range(int(low), int(high) + 1, stride))
        else:
            cpus.add(int(part))
    return sorted(cpus)


def format_cpu_list(cpus: list[int] | set[int]) -> str:
    """Inverse of parse_cpu_list: [0,1,2,5] -> "0-2,5"."""
    ordered = sorted(set(cpus))
    ranges: list[str] = []
    start = previous = None
    for cpu in ordered:
        if start is None:
            start = previous = cpu
        elif cpu == previous + 1:
            previous = cpu
        else:
            ranges.append(f"{start}-{previous}" if start != previous else str(start))
            start = previous = cpu
    if start is not None:
        ranges.append(f"{start}-{previous}" if start != previous else str(start))
    return ",".join(ranges)
