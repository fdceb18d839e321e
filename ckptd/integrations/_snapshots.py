"""What both callbacks ask of a store: its newest complete snapshot, a resume path naming it, its state.

An object store's snapshots live in two tiers: the bucket and this node's
local tier, which may hold a newer one that was committed but not yet
uploaded when the job died. A single-process job resumes from the newer of
the two, as ``Checkpointer.restore()`` would; a distributed one only from the
bucket, the tier every node sees.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from ..errors import ConfigError, NoSnapshot, SnapshotCorrupt
from ..restore.find import list_snapshots
from ..snapshot.manifest import step_dir
from ..store import open_store

log = logging.getLogger("ckptd")

_STEP = re.compile(r"step-(\d{12})$")


def store_uri(store: str | None) -> str:
    """The store as ckptd names it (a bare path made absolute); $CKPTD_STORE when ``store`` is None."""
    store = store if store is not None else os.environ.get("CKPTD_STORE")
    if not store:
        raise ConfigError("no store given: pass a path or URI, or set CKPTD_STORE")
    if "://" not in store:
        return os.path.abspath(store)
    return store.rstrip("/")


def _committed(store: str) -> list[int]:
    path = store[len("file://") :] if store.startswith("file://") else store
    if "://" not in path and not os.path.isdir(path):
        return []  # not made yet: no snapshot
    return [s.step for s in list_snapshots(open_store(store, create=False)) if s.committed]


def local_tier(store: str, local: str | None = None) -> str | None:
    """The local tier a single-process job's Checkpointer uses for object store ``store``; None otherwise."""
    from ..persist.lease import env_job_id
    from ..persist.tiers import default_local_dir

    if not store.startswith("s3://") or int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return None
    return local or default_local_dir(open_store(store, create=False).uri, env_job_id())


def newest_complete(store: str, local: str | None = None) -> int | None:
    """Step of the newest committed snapshot of ``store`` (either tier); None when there is none."""
    tier = local_tier(store, local)
    steps = _committed(store) + (_committed(tier) if tier else [])
    return max(steps) if steps else None


def resume_path(store: str, local: str | None = None) -> str | None:
    """``<store>/step-N`` for the newest complete snapshot, else None."""
    step = newest_complete(store, local)
    return None if step is None else f"{store}/{step_dir(step)}"


def step_of(store: str, path: Any) -> int | None:
    """The step a path made by :func:`resume_path` for ``store`` names; None for any other path."""
    path = os.fspath(path) if isinstance(path, os.PathLike) else path
    if not isinstance(path, str):
        return None
    head, _, tail = path.rstrip("/").rpartition("/")
    m = _STEP.match(tail)
    if m is None:
        return None
    same = head == store if "://" in store else os.path.abspath(head) == store
    return int(m.group(1)) if same else None


def load_snapshot(store: str, step: int, local: str | None = None) -> dict[str, Any]:
    """State of snapshot ``step`` (from the local tier if it is there); if it fails verification, the newest
    older one that verifies (logged)."""
    from ..restore.api import load

    tier = local_tier(store, local)
    if tier is not None and step in _committed(tier):
        try:
            return load(tier, step=step)
        except SnapshotCorrupt as e:
            log.warning("ckptd: the local copy of step %d does not verify (%s); trying %s", step, e, store)
    try:
        return load(store, step=step)
    except (NoSnapshot, SnapshotCorrupt) as e:
        state = load(store)  # NoSnapshot when nothing verifies: the caller's error
        log.warning(
            "ckptd: snapshot of step %d cannot be used (%s); resuming from step %d instead",
            step,
            e,
            state["meta"]["step"],
        )
        return state
