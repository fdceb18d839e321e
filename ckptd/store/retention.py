"""Retention: keep the newest committed snapshots, remove old ones and garbage.

Deletion removes the manifest first, so a half-deleted snapshot is never
taken for a committed one.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from ..errors import ConfigError
from ..snapshot.manifest import MANIFEST, parse_step_dir, step_dir
from .base import Store

log = logging.getLogger("ckptd")


@dataclass(frozen=True, kw_only=True)
class Retention:
    """Which snapshots to keep; ``keep_every`` also keeps steps divisible by it."""

    keep_last: int
    keep_every: int | None = None
    grace: float = 3600.0
    """Seconds an incomplete snapshot (no manifest) may stay: it may still be written."""

    def __post_init__(self) -> None:
        if not isinstance(self.keep_last, int) or self.keep_last < 1:
            raise ConfigError(f"keep_last={self.keep_last!r}: keep at least 1 snapshot")
        if self.keep_every is not None and self.keep_every < 1:
            raise ConfigError(f"keep_every={self.keep_every!r}: must be >= 1 or None")
        if self.grace < 0:
            raise ConfigError(f"grace={self.grace!r}: must be >= 0 seconds")


@dataclass(frozen=True)
class Plan:
    """What retention would delete: committed steps and incomplete ones."""

    committed: list[int]
    incomplete: list[int]


def plan(store: Store, rule: Retention, *, protect: frozenset[int] = frozenset(), now: float | None = None) -> Plan:
    """Decide what to delete; never the newest committed snapshot nor a protected step."""
    now = time.time() if now is None else now
    steps = sorted((s for s in map(parse_step_dir, store.children("")) if s is not None), reverse=True)
    committed = [s for s in steps if store.exists(f"{step_dir(s)}/{MANIFEST}")]
    incomplete = [s for s in steps if s not in set(committed)]
    kept = set(committed[: rule.keep_last]) | set(protect)
    if rule.keep_every:
        kept |= {s for s in committed if s % rule.keep_every == 0}
    old_committed = [s for s in committed if s not in kept]
    stale = []
    for s in incomplete:
        if s in protect:
            continue
        objs = store.list(step_dir(s))
        newest = max((o.mtime for o in objs), default=0.0)
        if now - newest >= rule.grace:
            stale.append(s)
    return Plan(sorted(old_committed), sorted(stale))


def delete_snapshot(store: Store, step: int) -> None:
    """Remove one snapshot, manifest first."""
    key = step_dir(step)
    store.delete([f"{key}/{MANIFEST}"])
    store.delete_prefix(key)  # type: ignore[attr-defined]


def apply(store: Store, rule: Retention, *, protect: frozenset[int] = frozenset()) -> Plan:
    """Delete what :func:`plan` selects; return it."""
    p = plan(store, rule, protect=protect)
    for step in p.committed + p.incomplete:
        delete_snapshot(store, step)
    if p.committed or p.incomplete:
        log.info("ckptd: retention removed steps %s (incomplete: %s)", p.committed, p.incomplete)
    return p
