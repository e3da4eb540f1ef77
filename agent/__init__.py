"""guardian-agent: a host-level performance audit agent for latency-critical Linux hosts."""

__version__ = "0.1.0"
