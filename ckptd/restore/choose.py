"""Choose what to restore: the newest committed snapshot that verifies."""

from __future__ import annotations

import logging
import warnings

from ..errors import NoSnapshot, SnapshotCorrupt
from ..snapshot.manifest import Manifest, step_dir
from ..store.file import FileStore
from .find import read_manifest, snapshot_steps
from .verify import verify_dir

log = logging.getLogger("ckptd")


def check(store: FileStore, step: int) -> Manifest:
    """The manifest of ``step`` if the snapshot verifies; SnapshotCorrupt naming the bad files."""
    manifest = read_manifest(store, step)
    problems = verify_dir(store.path_of(step_dir(step)), manifest)
    if problems:
        raise SnapshotCorrupt(f"snapshot {store.uri}/{step_dir(step)} does not verify: " + "; ".join(problems))
    return manifest


def newest_good(store: FileStore, step: int | None = None) -> Manifest | None:
    """The asked snapshot (errors if missing or corrupt), or the newest that verifies, or None."""
    if step is not None:
        return check(store, step)
    for candidate in snapshot_steps(store):
        try:
            return check(store, candidate)
        except NoSnapshot:
            continue
        except SnapshotCorrupt as e:
            msg = f"ckptd: skipping {step_dir(candidate)}: {e}"
            log.warning("%s", msg)
            warnings.warn(msg, stacklevel=3)
    return None
