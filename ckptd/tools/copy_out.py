"""``ckptd restore --to``: a verified copy of a snapshot in a local directory, the newest that verifies."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import ConfigError, NoGoodSnapshot, SnapshotCorrupt, SnapshotExists, StoreError
from ..persist.transfer import download_snapshot
from ..restore.find import list_snapshots, read_manifest
from ..snapshot.manifest import Manifest, step_dir
from ..store.base import Progress, Store
from ..store.file import FileStore
from .describe import newest_committed


@dataclass(frozen=True)
class CopiedOut:
    """The snapshot copied, where it is now, and the newer ones skipped with why."""

    manifest: Manifest
    path: str
    skipped: list[str]


def copy_out(
    src: Store,
    dest: str,
    *,
    step: int | None = None,
    progress: Callable[[Manifest], Progress | None] = lambda m: None,
    skipping: Callable[[str], None] = lambda note: None,
) -> CopiedOut:
    """Download ``step`` (or the newest snapshot that verifies) into ``dest``/step-N, verified and atomic.

    Without ``step`` a snapshot that does not verify is reported through ``skipping`` and the next
    older one tried; NoGoodSnapshot when none does. With ``step`` its defect is the error.
    """
    candidates = (
        [step]
        if step is not None
        else [newest_committed(src)]
        + [i.step for i in reversed(list_snapshots(src)) if i.committed or i.state == "corrupt"]
    )
    into = FileStore(dest)
    bad: list[str] = []
    for s in dict.fromkeys(candidates):
        target = into.path_of(step_dir(s))
        if os.path.lexists(target):
            raise ConfigError(f"{target} already exists; restore into another --to directory or remove it")
        try:
            m = download_snapshot(src, s, into, progress=progress(read_manifest(src, s)))
            return CopiedOut(m, target, bad)
        except SnapshotExists:  # the destination, not the snapshot: trying another would not help
            raise
        except (SnapshotCorrupt, StoreError) as e:  # a defect of this one snapshot: try the next older
            if step is not None:
                raise
            skipping(f"{step_dir(s)}: {e}")
            bad.append(f"{step_dir(s)}: {e}")
    raise NoGoodSnapshot(f"no snapshot in {src.uri} verifies: " + "; ".join(bad), problems=bad)
