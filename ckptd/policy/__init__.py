"""When to snapshot: pure policies of measured costs and risk (no torch, no I/O)."""

from .base import PolicyContext, SnapshotPolicy
from .fixed import AnyOf, EverySeconds, EverySteps, parse_policy

__all__ = [
    "PolicyContext",
    "SnapshotPolicy",
    "EverySteps",
    "EverySeconds",
    "AnyOf",
    "parse_policy",
]
