"""When to snapshot: pure policies of measured costs and risk (no torch, no I/O)."""

from .adaptive import RiskAwarePolicy
from .base import PolicyContext, SnapshotPolicy
from .cost import PriceTable, SnapshotCost, snapshot_cost
from .fixed import AnyOf, EverySeconds, EverySteps, parse_policy
from .interval import daly_interval, expected_waste, optimal_interval, young_interval
from .risk import LLAMA3_JOB_PER_HOUR, LLAMA3_PER_GPU_HOUR, FailureRate

__all__ = [
    "PolicyContext",
    "SnapshotPolicy",
    "EverySteps",
    "EverySeconds",
    "AnyOf",
    "parse_policy",
    "RiskAwarePolicy",
    "PriceTable",
    "SnapshotCost",
    "snapshot_cost",
    "young_interval",
    "daly_interval",
    "optimal_interval",
    "expected_waste",
    "FailureRate",
    "LLAMA3_PER_GPU_HOUR",
    "LLAMA3_JOB_PER_HOUR",
]
