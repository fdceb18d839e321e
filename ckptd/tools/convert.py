"""Turn a torchsnapshot snapshot into a ckptd snapshot, so a job moves over with its history."""

from __future__ import annotations

import tempfile

from ..persist.transfer import upload_snapshot
from ..snapshot.flatten import flatten
from ..snapshot.manifest import Manifest
from ..snapshot.write import Ranks, write_snapshot
from ..store import open_store
from ..store.file import FileStore
from . import torchsnapshot_format as tsf
from .export import from_torchsnapshot


def convert(source: str, dest: str, *, step: int = 0) -> Manifest:
    """Write the torchsnapshot at ``source`` as step ``step`` of the ckptd store ``dest``."""
    state = from_torchsnapshot(tsf.read_state(source))
    leaves = flatten(state)
    meta = {"converted_from": "torchsnapshot", "source": source}
    store = open_store(dest)
    if isinstance(store, FileStore):
        return write_snapshot(store, step, leaves, Ranks(), metrics={}, meta=meta).manifest
    with tempfile.TemporaryDirectory(prefix="ckptd-convert-") as tmp:
        local = FileStore(tmp)
        write_snapshot(local, step, leaves, Ranks(), metrics={}, meta=meta)
        return upload_snapshot(local, step, store)
