"""Copy whole snapshots between stores: data files first, manifest last (no torch).

Uploading commits with the destination's exclusive ``commit``; downloading
verifies every file against the manifest before the manifest is written, so
a local copy is either whole and verified or not a snapshot.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ..errors import SnapshotCorrupt, SnapshotExists
from ..snapshot.manifest import MANIFEST, Manifest, step_dir
from .base import Progress, Store
from .checksum import file_checksum
from .file import FileStore

_FILE_THREADS = 4


def _read_manifest(store: Store, step: int) -> tuple[Manifest, bytes]:
    key = f"{step_dir(step)}/{MANIFEST}"
    data = store.get_bytes(key)
    manifest = Manifest.from_json(data, source=f"{store.uri}/{key}")
    if manifest.step != step:
        raise SnapshotCorrupt(f"{store.uri}/{key} says step {manifest.step}, its directory says {step}")
    return manifest, data


def _parallel(fn: Callable[[str], None], names: list[str]) -> None:
    with ThreadPoolExecutor(min(_FILE_THREADS, max(1, len(names))), thread_name_prefix="ckptd-xfer") as pool:
        for fut in [pool.submit(fn, n) for n in names]:
            fut.result()


def upload_files(src: FileStore, manifest: Manifest, dest: Store, *, rank: int | None = None,
                 progress: Progress | None = None) -> None:
    """Upload a snapshot's data files (only ``rank``'s when given), several at a time."""
    key = step_dir(manifest.step)
    names = [f.name for f in manifest.files if rank is None or f.rank == rank]
    _parallel(lambda n: dest.put_file(f"{key}/{n}", src.path_of(f"{key}/{n}"), progress=progress), names)


def already_committed(dest: Store, step: int, data: bytes) -> bool:
    """True if ``dest`` holds this very manifest; SnapshotExists if it holds another commit of ``step``."""
    key = f"{step_dir(step)}/{MANIFEST}"
    if not dest.exists(key):
        return False
    if dest.get_bytes(key) == data:
        return True
    raise SnapshotExists(f"{dest.uri}/{step_dir(step)} holds another commit of step {step}")


def commit_once(dest: Store, step: int, data: bytes) -> None:
    """Commit the manifest last; losing a race to the identical manifest is success."""
    try:
        dest.commit(f"{step_dir(step)}/{MANIFEST}", data)
    except SnapshotExists:
        if not already_committed(dest, step, data):
            raise


def upload_snapshot(src: FileStore, step: int, dest: Store, *, progress: Progress | None = None) -> Manifest:
    """Upload a committed local snapshot; the destination commits it with its manifest.

    A manifest already in the destination that is byte-identical means the
    upload was done before (idempotent); a different one raises SnapshotExists.
    """
    manifest, data = _read_manifest(src, step)
    if not already_committed(dest, step, data):
        upload_files(src, manifest, dest, progress=progress)
        commit_once(dest, step, data)
    return manifest


def download_snapshot(src: Store, step: int, dest: FileStore, *, progress: Progress | None = None) -> Manifest:
    """Download a committed snapshot into a local store, verified, manifest last."""
    manifest, data = _read_manifest(src, step)
    key = step_dir(step)
    if dest.exists(f"{key}/{MANIFEST}"):
        raise SnapshotExists(f"{dest.uri}/{key} is already there; remove it first or pick another directory")
    dest.delete_prefix(key)
    os.makedirs(dest.path_of(key), exist_ok=True)
    sums = {f.name: f for f in manifest.files}

    def fetch(name: str) -> None:
        path = dest.path_of(f"{key}/{name}")
        src.get_file(f"{key}/{name}", path, progress=progress)
        value, size = file_checksum(path, manifest.checksum)
        if (value, size) != (sums[name].checksum, sums[name].size):
            raise SnapshotCorrupt(f"{src.uri}/{key}/{name} does not match its manifest ({value}, {size} bytes)")

    _parallel(fetch, list(sums))
    dest.commit(f"{key}/{MANIFEST}", data)
    return manifest
