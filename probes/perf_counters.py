"""Per-CPU software counters through perf_event_open(2), for kernels without /proc/schedstat.

/proc/schedstat (CONFIG_SCHEDSTATS) gives per-CPU context switches, but many production kernels
build without it. The perf software event PERF_COUNT_SW_CONTEXT_SWITCHES counts the same thing
per CPU on any kernel with perf events. Python has no binding for perf_event_open in the
standard library and psutil does not expose it, so this calls the syscall through ctypes.
"""

from __future__ import annotations

import ctypes
import os
import platform
import struct

PERF_TYPE_SOFTWARE = 1
PERF_COUNT_SW_CONTEXT_SWITCHES = 3
PERF_COUNT_SW_CPU_MIGRATIONS = 4
PERF_FLAG_FD_CLOEXEC = 1 << 3
SYSCALL_NUMBERS = {"x86_64": 298, "aarch64": 241}


class PerfEventAttr(ctypes.Structure):
    # The first 64 bytes of struct perf_event_attr (PERF_ATTR_SIZE_VER0) are all a counting
    # event needs; the kernel accepts the smaller size and zero-fills the rest.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32),
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),
    ]


class PerCpuCounter:
    """One counting software event per CPU; read() returns {cpu: count since open}."""

    def __init__(self, cpus: list[int], config: int = PERF_COUNT_SW_CONTEXT_SWITCHES):
        number = SYSCALL_NUMBERS.get(platform.machine())
        if number is None:
            raise OSError(f"perf_event_open syscall number unknown on {platform.machine()}")
        libc = ctypes.CDLL(None, use_errno=True)
        self.fds: dict[int, int] = {}
        attr = PerfEventAttr()
        attr.type = PERF_TYPE_SOFTWARE
        attr.size = ctypes.sizeof(PerfEventAttr)
        attr.config = config
        try:
            for cpu in cpus:
                fd = libc.syscall(number, ctypes.byref(attr), -1, cpu, -1, PERF_FLAG_FD_CLOEXEC)
                if fd < 0:
                    error = ctypes.get_errno()
                    raise OSError(error, f"perf_event_open on cpu {cpu}: {os.strerror(error)}")
                self.fds[cpu] = fd
        except BaseException:
            self.close()
            raise

    def read(self) -> dict[int, int]:
        return {cpu: struct.unpack("Q", os.read(fd, 8))[0] for cpu, fd in self.fds.items()}

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}
