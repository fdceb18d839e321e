"""Find snapshots in a store: committed ones by their manifest (no torch here)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime, timezone

from ..errors import NoSnapshot, SnapshotCorrupt, StoreError
from ..snapshot.manifest import Manifest, manifest_key, parse_step_dir, step_dir
from ..store import FileStore, Store, open_store


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
    state: str = ""
    """committed, incomplete (parts or manifest missing) or corrupt (a manifest that does not parse)."""
    detail: str = ""
    """For an incomplete or corrupt snapshot: what is missing or wrong."""
    kind: str = "tensor"
    """``tensor`` (the hook's) or ``process`` (a CRIU image of ``ckptd run --transparent``)."""

    def __post_init__(self) -> None:
        if not self.state:
            object.__setattr__(self, "state", "committed" if self.committed else "incomplete")


def as_store(store: Store | str, *, create: bool = False) -> Store:
    return open_store(store, create=create) if isinstance(store, str) else store


def data_key(store: Store, manifest: Manifest, name: str) -> str:
    """Where data file ``name`` of ``manifest`` is in ``store``: flat in a local store, per attempt in an object store."""
    if isinstance(store, FileStore) or not manifest.attempt:
        return f"{step_dir(manifest.step)}/{name}"
    return manifest.object_key(name)


def read_manifest_bytes(store: Store, step: int) -> bytes:
    """The raw manifest of ``step``; NoSnapshot if it is not committed, SnapshotCorrupt if unreadable."""
    key = manifest_key(step)
    if not store.exists(key):
        raise NoSnapshot(f"{store.uri} has no committed snapshot of step {step}; `ckptd ls {store.uri}` lists them")
    try:
        return store.get_bytes(key)
    except StoreError as e:
        raise SnapshotCorrupt(f"cannot read {store.uri}/{key}: {e}") from e


def read_manifest(store: Store, step: int, *, data: bytes | None = None) -> Manifest:
    """The manifest of ``step`` (from ``data`` when given), through the one gate that checks it."""
    key = manifest_key(step)
    data = read_manifest_bytes(store, step) if data is None else data
    manifest = Manifest.from_json(data, source=f"{store.uri}/{key}")
    if manifest.step != step:
        raise SnapshotCorrupt(f"{store.uri}/{key} says step {manifest.step}, its directory says {step}")
    return manifest


def snapshot_steps(store: Store) -> list[int]:
    """Steps of every snapshot directory, committed or not, newest first."""
    steps = (parse_step_dir(name) for name in store.children(""))
    return sorted((s for s in steps if s is not None), reverse=True)


def list_snapshots(store: Store | str, *, tier: str | None = None) -> list[SnapshotInfo]:
    """Every snapshot in ``store``, oldest first; incomplete ones say what they lack."""
    store = as_store(store)
    tier = tier or ("s3" if store.uri.startswith("s3://") else "local")
    out = []
    for step in reversed(snapshot_steps(store)):
        key = step_dir(step)
        uri = f"{store.uri}/{key}"
        try:
            m = read_manifest(store, step)
            out.append(
                SnapshotInfo(step, m.created_at, m.nbytes, True, (tier,), uri, m.world_size, m.metrics, kind=m.kind)
            )
            continue
        except NoSnapshot:
            state, detail = "incomplete", ""
        except SnapshotCorrupt as e:
            state, detail = "corrupt", str(e)
        objs = store.list(key)
        if not objs:
            continue  # an empty prefix left by retention or gc is no snapshot at all
        world = None
        if state == "incomplete":
            detail, world = _what_is_missing(store, objs)
        created = min(o.mtime for o in objs)
        out.append(
            SnapshotInfo(
                step,
                datetime.fromtimestamp(created, timezone.utc),
                sum(o.size for o in objs),
                False,
                (tier,),
                uri,
                world,
                state=state,
                detail=detail,
            )
        )
    return out


def _what_is_missing(store: Store, objs: list) -> tuple[str, int | None]:
    """In words, what an uncommitted snapshot lacks, judged from the part records it has."""
    from ..snapshot.parts import PartRecord

    parts: dict[str, list[str]] = {}
    for o in objs:
        bits = o.key.split("/")
        if len(bits) == 3 and bits[1].startswith("a-") and bits[2].startswith("part-"):
            parts.setdefault(bits[1], []).append(o.key)
    if not parts:
        return "no manifest and no part records", None
    attempt, keys = max(parts.items(), key=lambda kv: len(kv[1]))
    try:
        world = PartRecord.from_json(store.get_bytes(sorted(keys)[0]), source=sorted(keys)[0]).world_size
    except (SnapshotCorrupt, StoreError) as e:
        return f"attempt {attempt[2:]}: {e}", None
    have = {int(m.group(1)) for k in keys if (m := re.search(r"/part-(\d{1,9})\.json$", k))}
    lacking = [r for r in range(world) if r not in have]
    if lacking:
        more = f" and {len(lacking) - 8} more" if len(lacking) > 8 else ""
        return (
            f"no manifest; parts of {len(have)} of {world} ranks, missing rank(s) "
            f"{', '.join(map(str, lacking[:8]))}{more}",
            world,
        )
    return f"no manifest; all {world} parts present (the commit is due or its writer died)", world
