"""``ckptd.load``: the plain saved state of a snapshot, for tools and export."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import NoSnapshot
from ..snapshot.manifest import step_dir
from ..store import open_store
from ..store.file import FileStore
from .choose import newest_good
from .load import read_state


def load(store: str, step: int | None = None, map_location: Any = "cpu") -> dict[str, Any]:
    """State of the newest verified snapshot (or of ``step``) with keys
    ``model``, ``optimizer``, ``scheduler``, ``extra``, ``rng`` (these two by rank) and ``meta``."""
    st = open_store(store, create=False)
    if not isinstance(st, FileStore):
        raise NoSnapshot(f"{store}: load() reads local stores; copy the snapshot with `ckptd restore` first")
    manifest = newest_good(st, step)
    if manifest is None:
        raise NoSnapshot(f"{st.uri} holds no committed snapshot that verifies")
    state = read_state(st.path_of(step_dir(manifest.step)), manifest)
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


def _to(obj: Any, device: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(v, device) for v in obj)
    return obj
