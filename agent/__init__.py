"""guardian-agent: a host-level performance audit agent for latency-critical Linux hosts."""

from core import __version__

__all__ = ["__version__"]
