"""The newest snapshot that is chosen and reads, else the next older one: one loop for every restore path."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from ..errors import NoGoodSnapshot, SnapshotCorrupt, StoreError
from ..snapshot.manifest import Manifest, manifest_key, step_dir


def newest_readable(
    choose: Callable[[int | None, int | None], Manifest | None],
    read: Callable[[Manifest], Any],
    *,
    step: int | None,
    where: str,
    agree: Callable[[str | None], str | None] = lambda problem: problem,
) -> tuple[Manifest | None, Any]:
    """``choose(step, below)`` a snapshot, ``read`` it; a read that fails (on any rank, through ``agree``)
    skips to an older one, unless ``step`` was asked for. (None, None) when there is none at all;
    NoGoodSnapshot naming each defect when every one failed to read."""
    below: int | None = None
    bad: list[str] = []
    while True:
        manifest = choose(step, below)
        if manifest is None:
            if bad:
                raise NoGoodSnapshot(f"no snapshot in {where} can be read: " + "; ".join(bad), problems=bad)
            return None, None
        state, problem = None, None
        try:
            state = read(manifest)
        except (SnapshotCorrupt, OSError, ValueError) as e:
            problem = str(e)
        problem = agree(problem)
        if problem is None:
            return manifest, state
        if step is not None:
            raise SnapshotCorrupt(f"{step_dir(step)} cannot be read: {problem}")
        warnings.warn(f"ckptd: skipping {step_dir(manifest.step)}: {problem}", stacklevel=3)
        bad.append(f"{step_dir(manifest.step)}: {problem}")
        below = manifest.step


def refetching(tiers, read: Callable[[Manifest], Any]) -> Callable[[Manifest], Any]:
    """``read`` a local copy; one that fails while it is read (its checksum is computed then) is downloaded
    again, once, when the object store holds the step. Single-process jobs only: the ranks of a node share
    its local tier, so there the next older snapshot is taken instead."""

    def run(manifest: Manifest) -> Any:
        try:
            return read(manifest)
        except SnapshotCorrupt as e:
            if tiers.remote is None or tiers.world_size != 1 or not _held(tiers.remote, manifest.step):
                raise
            warnings.warn(f"ckptd: {e}; downloading {step_dir(manifest.step)} from {tiers.remote.uri}", stacklevel=3)
        from ..persist import retention

        retention.delete_snapshot(tiers.local, manifest.step)
        return read(tiers.ensure_local(manifest.step))

    return run


def _held(store, step: int) -> bool:
    try:
        return store.exists(manifest_key(step))
    except StoreError:
        return False
