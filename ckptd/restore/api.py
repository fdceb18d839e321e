"""``ckptd.load``: the plain saved state of a snapshot, for tools and export."""

from __future__ import annotations

import tempfile
from typing import Any

import torch

from ..errors import NoSnapshot
from ..persist import retention
from ..persist.tiers import Tiers
from ..snapshot.manifest import Manifest, step_dir
from ..store import open_store
from ..store.file import FileStore
from .fallback import newest_readable, refetching
from .load import read_state
from .verify import checksums_on_load


def load(store: str, step: int | None = None, map_location: Any = "cpu") -> dict[str, Any]:
    """State of the newest verified snapshot (or of ``step``) with keys
    ``model``, ``optimizer``, ``scheduler``, ``extra``, ``rng`` (these two by rank) and ``meta``.

    A snapshot only in an object store is downloaded (verified) to a temporary directory first."""
    opened = open_store(store, create=False)
    with tempfile.TemporaryDirectory(prefix="ckptd-load-") as tmp:
        tiers = Tiers(
            opened,
            local=None if isinstance(opened, FileStore) else tmp,
            rank=0,
            world_size=1,
            rule=retention.Retention(keep_last=1),
        )
        try:
            with checksums_on_load():  # verified and loaded with one read of each file
                manifest, state = _newest_readable(tiers, step)
        finally:
            tiers.close()
    if str(map_location) != "cpu":
        state = _to(state, map_location)
    state["meta"] = {
        "step": manifest.step,
        "created": manifest.created,
        "world_size": manifest.world_size,
        "host": manifest.host,
        "metrics": dict(manifest.metrics),
        **manifest.meta,
    }
    return state


def _newest_readable(tiers: Tiers, step: int | None) -> tuple[Manifest, dict[str, Any]]:
    """The asked or newest snapshot that verifies and reads; NoSnapshot if the store holds none."""
    where = tiers.local.uri if tiers.remote is None else tiers.remote.uri
    read = refetching(tiers, lambda m: read_state(tiers.local.path_of(step_dir(m.step)), m))
    manifest, state = newest_readable(lambda s, below: tiers.newest_good(s, below=below), read, step=step, where=where)
    if manifest is None:
        raise NoSnapshot(f"{where} holds no committed snapshot that verifies")
    return manifest, state


def _to(obj: Any, device: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj
