"""Describe a snapshot from its manifest alone: no tensor data, no unpickling, no torch."""

from __future__ import annotations

from typing import Any

from ..errors import NoSnapshot
from ..restore.find import read_manifest, snapshot_steps
from ..store.base import Store


def newest_committed(store: Store) -> int:
    """The newest step whose manifest is there; NoSnapshot naming the store otherwise."""
    for step in snapshot_steps(store):
        if store.exists(f"step-{step:012d}/ckptd.json"):
            return step
    raise NoSnapshot(f"{store.uri} holds no committed snapshot; `ckptd ls {store.uri}` shows what is there")


def describe(store: Store, step: int | None = None) -> dict[str, Any]:
    """Metadata, RNG streams, the tensor tree by group, and every group's plain values.

    ``groups`` (optimizer param groups with lr, scheduler, loader position,
    extra) comes from the summary the hook writes into the manifest; a
    snapshot without it lists its plain values by name only.
    """
    step = newest_committed(store) if step is None else step
    m = read_manifest(store, step)
    tensors: dict[str, dict[str, Any]] = {}
    rng: set[str] = set()
    values: dict[str, list[str]] = {}
    for item in m.items:
        top = item.path[0][1]
        if top == "rng":
            rng.add(".".join(str(k) for _, k in item.path[2:3]))
            continue
        if item.kind != "tensor":
            values.setdefault(top, []).append(item.fqn)
            continue
        if item.fqn in tensors:
            continue
        tensors[item.fqn] = {
            "name": item.fqn,
            "group": top,
            "shape": list(item.shape),
            "dtype": item.dtype,
            "nbytes": item.nbytes,
        }
    meta = dict(m.meta)
    groups = meta.pop("groups", None)
    if not isinstance(groups, dict):
        groups = {top: {"values": names} for top, names in values.items()}
    return {
        "step": m.step,
        "created": m.created,
        "world_size": m.world_size,
        "host": m.host,
        "format": m.format,
        "kind": m.kind,
        "checksum": m.checksum,
        "nbytes": m.nbytes,
        "metrics": m.metrics,
        "meta": meta,
        "groups": groups,
        "files": [{"name": f.name, "size": f.size, "rank": f.rank} for f in m.files],
        "rng": sorted(rng),
        "tensors": list(tensors.values()),
    }
