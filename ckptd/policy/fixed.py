"""Fixed-interval policies and the parser for ``policy="every:50"`` strings."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import ConfigError
from .base import PolicyContext, SnapshotPolicy

_SPEC = re.compile(r"^every:(?P<n>\d+(?:\.\d+)?)(?P<unit>s|m|h)?$")


@dataclass(frozen=True)
class EverySteps:
    """Snapshot after every ``n``-th finished step: steps n-1, 2n-1, ... counted from 0 (no first-step snapshot)."""

    n: int

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"EverySteps(n={self.n!r}): n must be an integer >= 1")

    def should_snapshot(self, *, ctx: PolicyContext) -> bool:
        return (ctx.step + 1) % self.n == 0


@dataclass(frozen=True)
class EverySeconds:
    """Snapshot when ``seconds`` of wall time passed since the last one."""

    seconds: float

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ConfigError(f"EverySeconds(seconds={self.seconds!r}): must be > 0")

    def should_snapshot(self, *, ctx: PolicyContext) -> bool:
        return ctx.seconds_since is not None and ctx.seconds_since >= self.seconds


@dataclass(frozen=True)
class AnyOf:
    """Snapshot when any of the policies says so."""

    policies: Sequence[SnapshotPolicy]

    def __post_init__(self) -> None:
        if not self.policies:
            raise ConfigError("AnyOf([]) never snapshots; give at least one policy")

    def should_snapshot(self, *, ctx: PolicyContext) -> bool:
        return any(p.should_snapshot(ctx=ctx) for p in self.policies)


def parse_policy(spec: str) -> SnapshotPolicy:
    """Parse ``every:N`` (steps) or ``every:Ns`` / ``every:Nm`` / ``every:Nh`` (time)."""
    m = _SPEC.match(spec.strip()) if isinstance(spec, str) else None
    if m is None:
        raise ConfigError(
            f"policy {spec!r} is not understood; use 'every:50' (steps), 'every:30s', "
            "'every:10m', a policy object, or None for the default"
        )
    n, unit = m.group("n"), m.group("unit")
    if unit is None:
        if "." in n:
            raise ConfigError(f"policy {spec!r}: a step count is a whole number")
        return EverySteps(int(n))
    return EverySeconds(float(n) * {"s": 1, "m": 60, "h": 3600}[unit])
