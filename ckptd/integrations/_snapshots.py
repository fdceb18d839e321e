"""What both callbacks ask of a store: its newest complete snapshot, a resume path naming it, its state."""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from ..errors import ConfigError, NoSnapshot
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


def newest_complete(store: str) -> int | None:
    """Step of the newest committed snapshot in ``store``; None when it holds none (or does not exist yet)."""
    if "://" not in store and not os.path.isdir(store):
        return None
    committed = [s.step for s in list_snapshots(open_store(store, create=False)) if s.committed]
    return max(committed) if committed else None


def resume_path(store: str) -> str | None:
    """``<store>/step-N`` for the newest complete snapshot, else None."""
    step = newest_complete(store)
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


def load_snapshot(store: str, step: int) -> dict[str, Any]:
    """State of snapshot ``step``; if it fails verification, the newest older one that verifies (logged)."""
    from ..errors import SnapshotCorrupt
    from ..restore.api import load

    try:
        return load(store, step=step)
    except (NoSnapshot, SnapshotCorrupt) as e:
        state = load(store)  # NoSnapshot when nothing verifies: the caller's error
        log.warning("ckptd: snapshot of step %d cannot be used (%s); resuming from step %d instead",
                    step, e, state["meta"]["step"])
        return state
