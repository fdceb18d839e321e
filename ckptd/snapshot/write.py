"""Write: staged state → a snapshot directory in DCP's layout, then the manifest.

The tensors and values go through ``torch.distributed.checkpoint.save`` with
DCP's own file writer, so ``dcp.load`` reads a snapshot as it is. Each rank
then checksums its own files, and rank 0 commits the manifest last.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import warnings
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from ..errors import SnapshotExists
from ..store.checksum import DEFAULT_ALGO, file_checksum
from ..store.file import FileStore
from .flatten import Leaf
from .manifest import MANIFEST, FileEntry, Item, Manifest, step_dir, utc_now

log = logging.getLogger("ckptd")
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job and the process group DCP may use."""

    rank: int = 0
    world_size: int = 1
    group: Any = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def prepare_dir(store: FileStore, step: int, ranks: Ranks) -> str:
    """Make an empty directory for ``step``; leftovers of a dead writer are removed."""
    key = step_dir(step)
    if ranks.rank == 0:
        if store.exists(f"{key}/{MANIFEST}"):
            raise SnapshotExists(f"{store.uri}/{key} is already committed; a step is saved once")
        store.delete_prefix(key)
        os.makedirs(store.path_of(key))
    if ranks.distributed:
        dist.barrier(group=ranks.group)
    return key


def write_dcp(directory: str, leaves: Sequence[Leaf], ranks: Ranks) -> list[Item]:
    """Save ``leaves`` with DCP into ``directory``; return the item index."""
    flat = {leaf.fqn: leaf.value for leaf in leaves if not _is_empty(leaf.value)}
    md = dcp.save(
        flat,
        storage_writer=FileSystemWriter(directory, sync_files=True, thread_count=1),
        planner=DefaultSavePlanner(flatten_state_dict=False),
        process_group=ranks.group,
        no_dist=not ranks.distributed,
    )
    paths = {leaf.fqn: leaf.path for leaf in leaves}
    empties = [_empty_item(leaf) for leaf in leaves if _is_empty(leaf.value)]
    if ranks.distributed:  # other ranks' own keys (rng, extra) need their paths too
        gathered: list = [None] * ranks.world_size
        dist.all_gather_object(gathered, (paths, empties), group=ranks.group)
        paths = {k: v for part, _ in gathered for k, v in part.items()}
        empties = list({e.fqn: e for _, part in gathered for e in part}.values())
    items = list(empties)
    for index, info in md.storage_data.items():
        items.append(_item(index, info, md.state_dict_metadata[index.fqn], paths[index.fqn]))
    order = {fqn: n for n, fqn in enumerate(paths)}  # the state's own order, so restore keeps it
    return sorted(items, key=lambda i: (order[i.fqn], i.chunk_offsets))


def _is_empty(value: Any) -> bool:
    return isinstance(value, (dict, list, tuple)) and len(value) == 0


def _empty_item(leaf: Leaf) -> Item:
    kind = "dict" if isinstance(leaf.value, dict) else type(leaf.value).__name__
    return Item(leaf.fqn, leaf.path, "empty", "", 0, 0, empty=kind)


def _item(index, info, meta, path) -> Item:
    if info.transform_descriptors:
        raise RuntimeError(f"DCP wrote {index.fqn} with stream transforms ckptd does not read")
    common = dict(fqn=index.fqn, path=path, file=info.relative_path, offset=info.offset, length=info.length)
    if not hasattr(meta, "chunks"):
        return Item(kind="object", **common)
    chunk = next(c for c in meta.chunks if tuple(c.offsets) == tuple(index.offset))
    dtype = meta.properties.dtype
    return Item(
        kind="tensor",
        shape=tuple(meta.size),
        dtype=str(dtype).removeprefix("torch."),
        nbytes=meta.size.numel() * dtype.itemsize,
        chunk_offsets=tuple(chunk.offsets),
        chunk_sizes=tuple(chunk.sizes),
        **common,
    )


def checksum_files(directory: str, ranks: Ranks, algo: str = DEFAULT_ALGO) -> list[FileEntry]:
    """Checksums of this rank's files; rank 0 also owns DCP's ``.metadata``."""
    mine = f"__{ranks.rank}_"
    names = sorted(n for n in os.listdir(directory) if n.startswith(mine) or (ranks.rank == 0 and n == ".metadata"))
    entries = []
    for name in names:
        value, size = file_checksum(os.path.join(directory, name), algo)
        entries.append(FileEntry(name, size, value, ranks.rank))
    if ranks.distributed:
        gathered: list = [None] * ranks.world_size
        dist.all_gather_object(gathered, [e.__dict__ for e in entries], group=ranks.group)
        entries = [FileEntry(**e) for part in gathered for e in part]
    return entries


def commit(store: FileStore, key: str, manifest: Manifest, ranks: Ranks) -> None:
    """Rank 0 writes the manifest (exclusively); every rank returns once it is there."""
    error = None
    if ranks.rank == 0:
        try:
            store.commit(f"{key}/{MANIFEST}", manifest.to_json())
        except Exception as e:  # re-raised below, after the other ranks were told
            error = e
    if ranks.distributed:
        flag = [error is None]
        dist.broadcast_object_list(flag, src=0, group=ranks.group)
        if not flag[0] and error is None:
            raise SnapshotExists(f"rank 0 could not commit {store.uri}/{key}")
    if error is not None:
        raise error


def build_manifest(
    step: int, files: list[FileEntry], items: list[Item], ranks: Ranks, *, metrics: dict, meta: dict
) -> Manifest:
    return Manifest(
        step=step,
        created=utc_now(),
        world_size=ranks.world_size,
        host=socket.gethostname(),
        checksum=DEFAULT_ALGO,
        files=tuple(files),
        items=tuple(items),
        metrics={k: float(v) for k, v in metrics.items()},
        meta=meta,
    )


def write_snapshot(
    store: FileStore, step: int, leaves: Sequence[Leaf], ranks: Ranks, *, metrics: dict, meta: dict
) -> Manifest:
    """Write, checksum and commit one snapshot into a local store; all ranks call it."""
    t0 = time.monotonic()
    key = prepare_dir(store, step, ranks)
    directory = store.path_of(key)
    try:
        items = write_dcp(directory, leaves, ranks)
        files = checksum_files(directory, ranks)
        meta = {**meta, "write_s": time.monotonic() - t0}
        manifest = build_manifest(step, files, items, ranks, metrics=metrics, meta=meta)
        log.debug("ckptd: step %d: files written, committing", step)
        commit(store, key, manifest, ranks)
    except BaseException:
        if ranks.rank == 0 and not store.exists(f"{key}/{MANIFEST}"):
            store.delete_prefix(key)  # a partial snapshot only takes space (a full disk, say)
        raise
    return manifest


def tensor_dtype(name: str) -> torch.dtype:
    """The torch dtype a manifest names; ValueError for anything else."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype
