"""Probe registry: an explicit ordered tuple. Each probe module imports its heavy optional
libraries (bcc, scapy, asyncpg, py-spy) only inside check()/collect(), so listing probes works on
any host."""

REGISTRY: tuple = (
)

__all__ = ["REGISTRY"]
