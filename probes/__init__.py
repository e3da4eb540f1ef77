"""Probe registry: an explicit ordered tuple. Each probe module imports its heavy optional
libraries (bcc, scapy, asyncpg, py-spy) only inside check()/collect(), so listing probes works on
any host."""

from probes.host import HostProbe
from probes.stacks import StacksProbe
from probes.syscalls import SyscallsProbe
from probes.tcp import TcpProbe
from probes.capture import CaptureProbe
from probes.kernel import KernelProbe
from probes.jitter import JitterProbe
from probes.postgres import PostgresProbe

REGISTRY: tuple = (
    HostProbe,
    SyscallsProbe,
    StacksProbe,
    TcpProbe,
    CaptureProbe,
    KernelProbe,
    JitterProbe,
    PostgresProbe,
)

__all__ = ["REGISTRY"]
