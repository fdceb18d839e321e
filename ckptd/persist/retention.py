"""Retention: keep the newest committed snapshots, remove old ones and garbage (no torch).

Garbage is what no committed snapshot needs and no live writer can still
be writing: uncommitted steps, attempts that lost the commit and, in a
local tier, attempt and partial directories, each only once it is older
than the grace period. Deletion removes the manifest first, so a
half-deleted snapshot is never taken for a committed one. In an object
store, a committed attempt that is removed leaves a tiny record under
``.ckptd/pruned/`` for the grace period: a rank still waiting to see it
committed then knows it was.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass

from ..errors import ConfigError, SnapshotCorrupt, StoreError
from ..snapshot.dirs import ATTEMPTS, DOWNLOADS, PARTIAL, parse_named
from ..snapshot.manifest import MANIFEST, Manifest, manifest_key, parse_step_dir, step_dir
from ..store.base import Store
from ..store.file import FileStore
from .commit import PRUNED, pruned_key

log = logging.getLogger("ckptd")


@dataclass(frozen=True, kw_only=True)
class Retention:
    """Which snapshots to keep; ``keep_every`` also keeps steps divisible by it."""

    keep_last: int
    keep_every: int | None = None
    grace: float = 3600.0
    """Seconds an uncommitted snapshot or attempt may stay: its writer may still be at work."""

    def __post_init__(self) -> None:
        if not isinstance(self.keep_last, int) or self.keep_last < 1:
            raise ConfigError(f"keep_last={self.keep_last!r}: keep at least 1 snapshot")
        if self.keep_every is not None and self.keep_every < 1:
            raise ConfigError(f"keep_every={self.keep_every!r}: must be >= 1 or None")
        if self.grace < 0:
            raise ConfigError(f"grace={self.grace!r}: must be >= 0 seconds")


@dataclass(frozen=True)
class Plan:
    """What retention would delete: committed steps, incomplete steps, and stray keys."""

    committed: list[int]
    incomplete: list[int]
    strays: list[str]
    """Objects of attempts that lost the commit (object stores) or dead attempts (local tiers)."""


def plan(store: Store, rule: Retention, *, protect: frozenset[int] = frozenset(), now: float | None = None) -> Plan:
    """Decide what to delete; never the newest committed snapshot nor a protected step."""
    now = time.time() if now is None else now
    objects: dict[int, list] = {}
    for o in store.list(""):
        step = parse_step_dir(o.key.split("/", 1)[0])
        if step is not None:
            objects.setdefault(step, []).append(o)
    steps = sorted(objects, reverse=True)
    committed = [s for s in steps if any(o.key == manifest_key(s) for o in objects[s])]
    kept = set(committed[: rule.keep_last]) | set(protect)
    if rule.keep_every:
        kept |= {s for s in committed if s % rule.keep_every == 0}
    stale = [
        s
        for s in steps
        if s not in committed and s not in protect and now - max(o.mtime for o in objects[s]) >= rule.grace
    ]
    strays = [k for s in committed if s in kept for k in _losers(store, s, objects[s], rule.grace, now)]
    if isinstance(store, FileStore):
        strays += _dead_local(store, rule.grace, now, protect)
    else:
        strays += [o.key for o in store.list(PRUNED) if now - o.mtime >= rule.grace]
    return Plan(sorted(s for s in committed if s not in kept), sorted(stale), strays)


def _losers(store: Store, step: int, objs: list, grace: float, now: float) -> list[str]:
    """Objects of ``step`` under an attempt prefix other than the committed one's, past the grace period."""
    others = [o for o in objs if o.key.split("/")[1:2] and o.key.split("/")[1].startswith("a-")]
    if not others:
        return []
    try:
        attempt = Manifest.from_json(store.get_bytes(manifest_key(step)), source=manifest_key(step)).attempt
    except (SnapshotCorrupt, StoreError):
        return []  # verify reports it; never guess what a damaged manifest needs
    return [o.key for o in others if o.key.split("/")[1] != f"a-{attempt}" and now - o.mtime >= grace]


def _dead_local(store: FileStore, grace: float, now: float, protect: frozenset[int]) -> list[str]:
    """Attempt and partial directories of a local tier older than the grace period."""
    out = []
    for parent in (ATTEMPTS, PARTIAL):
        for name in store.children(parent):
            named = parse_named(name)
            path = store.path_of(f"{parent}/{name}")
            try:
                age = now - os.lstat(path).st_mtime
            except FileNotFoundError:
                continue
            if named is not None and named[0] not in protect and age >= grace:
                out.append(f"{parent}/{name}")
    for name in store.children(""):
        if name.startswith(DOWNLOADS):
            path = store.path_of(name)
            try:
                if now - os.lstat(path).st_mtime >= grace:
                    out.append(name)
            except FileNotFoundError:
                continue
    return out


def delete_snapshot(store: Store, step: int, *, committed: bool = False) -> None:
    """Remove one snapshot, manifest first; a ``committed`` one of an object store leaves its pruned record."""
    if committed and not isinstance(store, FileStore):
        try:
            attempt = Manifest.from_json(store.get_bytes(manifest_key(step)), source=manifest_key(step)).attempt
        except SnapshotCorrupt:
            attempt = ""
        if attempt:
            store.put_bytes(pruned_key(step, attempt), b"")
    store.delete([f"{step_dir(step)}/{MANIFEST}"])
    _delete_prefix(store, step_dir(step))


def _delete_prefix(store: Store, prefix: str) -> None:
    if isinstance(store, FileStore):
        shutil.rmtree(store.path_of(prefix), ignore_errors=True)
    else:
        store.delete([o.key for o in store.list(prefix)])


def apply(store: Store, rule: Retention, *, protect: frozenset[int] = frozenset()) -> Plan:
    """Delete what :func:`plan` selects; return it."""
    p = plan(store, rule, protect=protect)
    for step in p.committed:
        delete_snapshot(store, step, committed=True)
    for step in p.incomplete:
        delete_snapshot(store, step)
    local_dirs = [k for k in p.strays if k.startswith((ATTEMPTS + "/", PARTIAL + "/", DOWNLOADS))]
    for key in local_dirs:
        _delete_prefix(store, key)
    store.delete([k for k in p.strays if k not in local_dirs])
    if p.committed or p.incomplete or p.strays:
        log.info(
            "ckptd: retention removed steps %s (incomplete: %s; %d stray objects) from %s",
            p.committed,
            p.incomplete,
            len(p.strays),
            store.uri,
        )
    return p
