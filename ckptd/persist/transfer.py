"""Copy whole snapshots between stores (no torch).

Uploading goes through the commit protocol (every rank's part, then the
manifest, exclusively). Downloading fetches every file into a fresh
directory beside the destination, verifies it against the manifest, writes
the manifest last and renames the directory into place, so the destination
holds a whole, verified snapshot or nothing at all.
"""

from __future__ import annotations

import os
import shutil
import uuid

from ..errors import SnapshotCorrupt, SnapshotError, SnapshotExists
from ..restore.find import data_key, read_manifest, read_manifest_bytes
from ..restore.verify import verify_dir
from ..snapshot.dirs import DOWNLOADS
from ..snapshot.manifest import MANIFEST, Manifest, step_dir
from ..store.base import Progress, Store
from ..store.file import FileStore, fsync_dir, rename_noreplace
from .commit import parallel, try_commit, upload_part


def upload_snapshot(src: FileStore, step: int, dest: Store, *, progress: Progress | None = None) -> Manifest:
    """Upload a whole committed local snapshot, every rank's part, and commit it in ``dest``.

    Idempotent: a destination that already holds this very manifest is left as it is; one that holds
    another complete commit of the step raises SnapshotExists.
    """
    data = read_manifest_bytes(src, step)
    manifest = Manifest.from_json(data, source=f"{src.uri}/{step_dir(step)}/{MANIFEST}")
    directory = src.path_of(step_dir(step))
    if try_commit(dest, manifest, data):  # not committed there yet
        for rank in range(manifest.world_size):
            upload_part(dest, directory, manifest, data, rank, progress=progress)
        problems = try_commit(dest, manifest, data)
        if problems:
            raise SnapshotError(f"step {step} is not whole after uploading it to {dest.uri}: " + "; ".join(problems))
    return manifest


def download_snapshot(src: Store, step: int, dest: FileStore, *, progress: Progress | None = None) -> Manifest:
    """Download a committed snapshot into ``dest`` as ``step-N/``: verified, manifest last, atomic."""
    data = read_manifest_bytes(src, step)
    manifest = read_manifest(src, step, data=data)
    final = dest.path_of(step_dir(step))
    if os.path.lexists(final):
        raise SnapshotExists(f"{final} is already there; remove it first or pick another directory")
    if not isinstance(src, FileStore):  # judge each object by its listed size before fetching a byte
        sizes = {o.key: o.size for o in src.list(step_dir(step))}
        listed = {f.name: sizes.get(data_key(src, manifest, f.name)) for f in manifest.files}
        wrong = [
            f"{f.name}: " + ("missing" if listed[f.name] is None else f"{listed[f.name]} bytes, manifest says {f.size}")
            for f in manifest.files
            if listed[f.name] != f.size
        ]
        if wrong:
            raise SnapshotCorrupt(f"{src.uri}/{step_dir(step)} does not verify: " + "; ".join(wrong))
    work = os.path.join(dest.root, f"{DOWNLOADS}{step_dir(step)}-{uuid.uuid4().hex[:8]}")
    os.makedirs(work)
    try:
        parallel(
            lambda n: src.get_file(data_key(src, manifest, n), os.path.join(work, n), progress=progress),
            [f.name for f in manifest.files],
        )
        problems = verify_dir(work, manifest)
        if problems:
            raise SnapshotCorrupt(f"{src.uri}/{step_dir(step)} does not verify: " + "; ".join(problems))
        # The data files are not fsynced: the object store holds the durable copy, and a local copy that a
        # crash left short fails its checksum as it is read and is downloaded again. Syncing 1 GiB halved
        # download throughput here (bench/s3_throughput.py: 271 against 525 MiB/s for boto3's download).
        with open(os.path.join(work, MANIFEST), "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(work)
        try:
            rename_noreplace(work, final)
        except FileExistsError as e:
            raise SnapshotExists(
                f"{final} appeared while downloading; remove it first or pick another directory"
            ) from e
        fsync_dir(dest.root)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # after a successful rename it no longer exists
    return manifest
