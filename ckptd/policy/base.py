"""The seam between the hook and a snapshot policy: one context, one method."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable


@dataclass(frozen=True, kw_only=True)
class PolicyContext:
    """What the hook knows when it asks a policy; times in seconds.

    ``None`` means "not measured yet" (no snapshot or step seen so far).
    """

    step: int
    """The step that has just finished."""
    now: float
    """Monotonic clock reading."""
    steps_since: int | None
    """Steps since the last snapshot was taken, or None before the first."""
    seconds_since: float | None
    """Seconds since the last snapshot was taken (or since the run started)."""
    step_time: float | None
    """Median wall time of recent steps."""
    stall: float | None
    """Median training stall of recent snapshots."""
    persist: float | None
    """Median time from a snapshot's start until it is durable."""
    in_flight: int
    """Snapshots taken but not yet durable."""
    gpus: int = 1
    """GPUs the job uses (failure rate scales with it)."""
    nbytes: int | None = None
    """Bytes of one snapshot, for its storage and request cost."""


@runtime_checkable
class SnapshotPolicy(Protocol):
    """Decides after every step whether to snapshot now. Pure: no I/O."""

    def should_snapshot(self, *, ctx: PolicyContext) -> bool: ...
