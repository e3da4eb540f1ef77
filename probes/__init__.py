"""The probes. `from probes import REGISTRY` gives the ordered tuple of probe classes
(probes/registry.py).

The registry is loaded on first use (PEP 562 module __getattr__), not when the package is: the
CLI imports probes/options.py to build its flags, and loading every probe module (pyarrow
among them) would add ~0.25 s to every `guardian-agent` command, `--help` included.
"""

from __future__ import annotations

__all__ = ["REGISTRY"]


def __getattr__(name: str):
    if name == "REGISTRY":
        from probes.registry import REGISTRY

        return REGISTRY
    raise AttributeError(f"module 'probes' has no attribute {name!r}")
