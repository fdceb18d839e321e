"""The object-store commit: every rank's part first, the manifest last and exclusively (no torch).

Phase 1, per rank (any node, any uploader): upload the rank's files under
the attempt's own prefix, then its part record. Phase 2, by whoever sees it
first: when the part record of every rank is there and every object it
lists has the listed size, write the manifest with the store's exclusive
``commit``. Only that makes the snapshot exist. Uploaders of one attempt
hold identical manifest bytes, so losing the commit race to a peer is
success; a complete commit of another attempt is a refusal
(SnapshotExists), and nothing of it is ever touched. Retention leaves a
small record of each committed attempt it removes, so an uploader that
looks only after a newer snapshot pushed this one out still learns that it
was committed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from ..errors import ConfigError, SnapshotCorrupt, SnapshotExists, StoreError
from ..snapshot.manifest import Manifest, attempt_prefix, manifest_key, step_dir
from ..snapshot.parts import MAX_PART_BYTES, PartRecord, part_key
from ..store.base import Progress, Store
from ..store.file import FileStore

log = logging.getLogger("ckptd")

_FILE_THREADS = 4
PRUNED = ".ckptd/pruned"
"""Where retention records the committed attempts it removed from an object store."""


def pruned_key(step: int, attempt: str) -> str:
    """The record that ``step``'s attempt ``attempt`` was committed and later removed by retention."""
    return f"{PRUNED}/{step_dir(step)}-{attempt}"


def parallel(fn: Callable[[str], None], names: list[str]) -> None:
    """Run ``fn`` over ``names`` a few at a time; the first error is raised."""
    if len(names) <= 1:
        for n in names:
            fn(n)
        return
    with ThreadPoolExecutor(min(_FILE_THREADS, len(names)), thread_name_prefix="ckptd-xfer") as pool:
        for fut in [pool.submit(fn, n) for n in names]:
            fut.result()


def upload_part(
    remote: Store, directory: str, manifest: Manifest, data: bytes, rank: int, *, progress: Progress | None = None
) -> None:
    """Phase 1 for one rank: its files under the attempt's prefix, then its part record."""
    if isinstance(remote, FileStore):
        raise ConfigError(f"{remote.uri} is a local store: snapshots are written there, not uploaded")
    if not manifest.attempt:
        raise SnapshotCorrupt(
            f"step {manifest.step} in {directory} was written by an older ckptd without "
            "attempts; it can be restored locally but not uploaded"
        )
    names = [f.name for f in manifest.files_of(rank)]
    parallel(lambda n: remote.put_file(manifest.object_key(n), os.path.join(directory, n), progress=progress), names)
    remote.put_bytes(part_key(manifest.step, manifest.attempt, rank), PartRecord.of(manifest, data, rank).to_json())


def missing(remote: Store, manifest: Manifest, data: bytes) -> list[str]:
    """What keeps ``manifest`` from being committed in ``remote``, a line each; empty when complete."""
    objects = {o.key: o.size for o in remote.list(attempt_prefix(manifest.step, manifest.attempt))}
    keys = [part_key(manifest.step, manifest.attempt, r) for r in range(manifest.world_size)]
    absent = [r for r, k in enumerate(keys) if k not in objects]
    if absent:
        return [f"no part record of rank{'s' if len(absent) > 1 else ''} {_ranks(absent)} yet"]
    problems = []
    for rank, key in enumerate(keys):
        if objects[key] > MAX_PART_BYTES:  # judged by its listed size, before reading a byte of it
            problems.append(
                f"rank {rank}: {remote.uri}/{key} is {objects[key]} bytes, more than a part record "
                f"may be ({MAX_PART_BYTES}); remove it"
            )
            continue
        try:
            rec = PartRecord.from_json(remote.get_bytes(key), source=f"{remote.uri}/{key}")
        except SnapshotCorrupt as e:
            problems.append(f"rank {rank}: {e}")
            continue
        why = rec.mismatch(manifest, data) or (None if rec.rank == rank else f"says it is rank {rec.rank}")
        if why:
            problems.append(f"rank {rank}'s part record {why}")
            continue
        for f in rec.files:
            size = objects.get(manifest.object_key(f.name))
            if size != f.size:
                problems.append(
                    f"rank {rank}: {f.name} "
                    + ("missing" if size is None else f"has {size} bytes, its part says {f.size}")
                )
    return problems


def try_commit(remote: Store, manifest: Manifest, data: bytes) -> list[str]:
    """Phase 2: commit if complete. Empty list: committed (by this call or a peer, maybe since pruned);
    else what is missing.

    SnapshotExists when the step holds a complete commit of another attempt.
    """
    key = manifest_key(manifest.step)
    if _committed_here(remote, manifest, data):
        return []
    problems = missing(remote, manifest, data)
    if problems:
        return [] if remote.exists(pruned_key(manifest.step, manifest.attempt)) else problems
    try:
        remote.commit(key, data)
    except SnapshotExists:
        if not _committed_here(remote, manifest, data):
            raise
    return []


def _committed_here(remote: Store, manifest: Manifest, data: bytes) -> bool:
    """True if ``data`` is the step's manifest; SnapshotExists if another complete commit is."""
    key = manifest_key(manifest.step)
    try:
        existing = remote.get_bytes(key)
    except StoreError:
        if remote.exists(key):
            raise
        return False
    if existing == data:
        return True
    try:
        other = Manifest.from_json(existing, source=f"{remote.uri}/{key}")
        gaps = missing(remote, other, existing) if other.attempt else _legacy_gaps(remote, other)
    except SnapshotCorrupt as e:
        gaps = [str(e)]
    if not gaps:
        raise SnapshotExists(
            f"{remote.uri}/{step_dir(manifest.step)} holds another commit of step "
            f"{manifest.step} (attempt {other.attempt or '-'}, job {other.job or '-'}); "
            "a step is committed once, so this attempt was discarded"
        )
    log.warning(
        "ckptd: %s/%s names a snapshot that is not whole (%s); removing that manifest so step %d can be committed",
        remote.uri,
        key,
        gaps[0],
        manifest.step,
    )
    remote.delete([key])
    return False


def _legacy_gaps(remote: Store, manifest: Manifest) -> list[str]:
    sizes = {o.key: o.size for o in remote.list(step_dir(manifest.step))}
    return [f"{f.name} missing" for f in manifest.files if sizes.get(manifest.object_key(f.name)) != f.size]


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:8])) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")
