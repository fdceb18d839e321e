"""Verify a snapshot in any store by recomputing every file's checksum (no torch)."""

from __future__ import annotations

from ..errors import CkptdError, SnapshotCorrupt
from ..restore.find import data_key, read_manifest
from ..restore.verify import check_items, verify_dir
from ..snapshot.manifest import step_dir
from ..store.base import Store
from ..store.checksum import Checksum
from ..store.file import FileStore

_CHUNK = 64 << 20


def verify_snapshot(store: Store, step: int) -> list[str]:
    """Problems with one snapshot, one line each; empty when it verifies."""
    try:
        manifest = read_manifest(store, step)
        if manifest.kind == "process":  # the gate restore passes too
            from ..process.image import ProcessMeta

            ProcessMeta.of(manifest, source=f"{store.uri}/{step_dir(step)}")
    except SnapshotCorrupt as e:
        return [f"ckptd.json: {e}"]
    if isinstance(store, FileStore):
        return verify_dir(store.path_of(step_dir(step)), manifest)
    problems = []
    sizes = {o.key: o.size for o in store.list(step_dir(step))}
    whole = {}
    for f in manifest.files:
        key = data_key(store, manifest, f.name)
        if key not in sizes:
            problems.append(f"{f.name}: missing")
            continue
        if sizes[key] != f.size:
            problems.append(f"{f.name}: {sizes[key]} bytes, manifest says {f.size}")
            continue
        cs = Checksum(manifest.checksum)
        try:
            for offset in range(0, f.size, _CHUNK):
                cs.update(store.get_range(key, offset, min(_CHUNK, f.size - offset)))
        except CkptdError as e:
            problems.append(f"{f.name}: cannot read: {e}")
            continue
        if cs.hexdigest() != f.checksum:
            problems.append(f"{f.name}: {manifest.checksum} {cs.hexdigest()}, manifest says {f.checksum}")
            continue
        whole[f.name] = f.size
    return problems + check_items(manifest, whole)
