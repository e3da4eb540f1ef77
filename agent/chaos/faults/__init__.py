"""Fault injectors for chaos experiments: one class per `kind`, see base.Injector.

The registry is an explicit ordered tuple, like probes/__init__.py: `chaos doctor` lists the
kinds in this order.
"""

from __future__ import annotations

from core.errors import BadInput

from .base import Injector
from .network import (BandwidthInjector, HttpErrorInjector, JitterInjector, LatencyInjector, LossInjector,
                      PostgresLatencyInjector, ResetInjector)
from .pressure import CpuInjector, MemoryInjector
from .process import KillInjector, PauseInjector

REGISTRY: tuple[type[Injector], ...] = (
    LatencyInjector,
    JitterInjector,
    PostgresLatencyInjector,
    LossInjector,
    ResetInjector,
    HttpErrorInjector,
    BandwidthInjector,
    CpuInjector,
    MemoryInjector,
    PauseInjector,
    KillInjector,
)


def injector_for(kind: str) -> type[Injector]:
    for injector in REGISTRY:
        if injector.kind == kind:
            return injector
    raise BadInput(f"unknown fault kind {kind!r} (known: {', '.join(i.kind for i in REGISTRY)})")


__all__ = ["REGISTRY", "Injector", "injector_for"]
