"""Probe registry: an explicit ordered tuple of probe classes. Each probe module imports its heavy
optional libraries (bcc, scapy, asyncpg, py-spy) only inside check()/collect(), so listing probes
works on any host."""

from __future__ import annotations

from probes.base import ProbeBase
from probes.capture import CaptureProbe
from probes.host import HostProbe
from probes.jitter import JitterProbe
from probes.kernel import KernelProbe
from probes.postgres import PostgresProbe
from probes.stacks import StacksProbe
from probes.syscalls import SyscallsProbe
from probes.tcp import TcpProbe

REGISTRY: tuple[type[ProbeBase], ...] = (
    HostProbe,
    SyscallsProbe,
    StacksProbe,
    TcpProbe,
    CaptureProbe,
    KernelProbe,
    JitterProbe,
    PostgresProbe,
)
