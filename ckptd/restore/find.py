"""Find snapshots in a store: committed ones by their manifest (no torch here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone

from ..errors import NoSnapshot, SnapshotCorrupt, StoreError
from ..snapshot.manifest import MANIFEST, Manifest, parse_step_dir, step_dir
from ..store import Store, open_store


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot as listed: committed ones carry their manifest's facts."""

    step: int
    created: datetime
    nbytes: int
    committed: bool
    tiers: tuple[str, ...]
    uri: str
    world_size: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)


def as_store(store: Store | str, *, create: bool = False) -> Store:
    return open_store(store, create=create) if isinstance(store, str) else store


def read_manifest(store: Store, step: int) -> Manifest:
    """The manifest of ``step``; NoSnapshot if it is not committed, SnapshotCorrupt if unreadable."""
    key = f"{step_dir(step)}/{MANIFEST}"
    if not store.exists(key):
        raise NoSnapshot(f"{store.uri} has no committed snapshot of step {step}; `ckptd ls {store.uri}` lists them")
    try:
        data = store.get_bytes(key)
    except StoreError as e:
        raise SnapshotCorrupt(f"cannot read {store.uri}/{key}: {e}") from e
    manifest = Manifest.from_json(data, source=f"{store.uri}/{key}")
    if manifest.step != step:
        raise SnapshotCorrupt(f"{store.uri}/{key} says step {manifest.step}, its directory says {step}")
    return manifest


def snapshot_steps(store: Store) -> list[int]:
    """Steps of every snapshot directory, committed or not, newest first."""
    steps = (parse_step_dir(name) for name in store.children(""))
    return sorted((s for s in steps if s is not None), reverse=True)


def list_snapshots(store: Store | str, *, tier: str | None = None) -> list[SnapshotInfo]:
    """Every snapshot in ``store``, oldest first; incomplete ones have ``committed=False``."""
    store = as_store(store)
    tier = tier or ("s3" if store.uri.startswith("s3://") else "local")
    out = []
    for step in reversed(snapshot_steps(store)):
        key = step_dir(step)
        uri = f"{store.uri}/{key}"
        try:
            m = read_manifest(store, step)
            out.append(SnapshotInfo(step, m.created_at, m.nbytes, True, (tier,), uri, m.world_size, m.metrics))
        except (NoSnapshot, SnapshotCorrupt):
            objs = store.list(key)
            created = min((o.mtime for o in objs), default=0.0)
            out.append(SnapshotInfo(
                step, datetime.fromtimestamp(created, timezone.utc), sum(o.size for o in objs), False, (tier,), uri
            ))
    return out
