"""Write: staged state → a snapshot directory in DCP's layout, then the manifest.

The tensors and values go through ``torch.distributed.checkpoint.save`` with
DCP's own file writer, so ``dcp.load`` reads a snapshot as it is. Each rank
checksums its own files and writes its part record; rank 0 builds the
manifest and every rank gets its bytes; each node's leader renames the
finished attempt into place (``snapshot/dirs.py``). Every step between
ranks is a collective that carries errors, so one rank's failure fails the
snapshot on all of them instead of leaving the others waiting.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from ..errors import SnapshotError, SnapshotExists
from ..store.checksum import DEFAULT_ALGO, file_checksum
from ..store.file import FileStore, fsync_dir, rename_noreplace
from .direct import DirectWriter
from .dirs import LocalCommit, attempt_dir, partial_dir
from .flatten import Leaf, is_empty
from .manifest import MANIFEST, FileEntry, Item, Manifest, step_dir, utc_now
from .parts import PartRecord, part_name
from .stage import FileImage
from .write_image import fits_image, write_image, write_metadata

log = logging.getLogger("ckptd")
warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job and the process group ckptd's collectives use."""

    rank: int = 0
    world_size: int = 1
    group: Any = None
    leader: int = 0
    """The lowest rank writing into this rank's local tier: it commits that tier's directory."""
    whole: bool = True
    """Every rank writes into one local tier, so a committed directory there holds every file."""
    job: str = ""
    """The job id recorded in manifests and part records."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def node_leader(self) -> bool:
        return self.rank == self.leader


def _gather(ranks: Ranks, value: Any, error: BaseException | None, what: str) -> list:
    """Every rank's ``value``; if any rank failed ``what``, every rank raises, naming it."""
    if not ranks.distributed:
        if error is not None:
            raise error
        return [value]
    gathered: list = [None] * ranks.world_size
    note = None if error is None else f"{type(error).__name__}: {error}"
    dist.all_gather_object(gathered, (value, note), group=ranks.group)
    if error is not None:
        raise error
    failed = [(r, n) for r, (_v, n) in enumerate(gathered) if n is not None]
    if failed:
        r, note = failed[0]
        if note.startswith("SnapshotExists"):
            raise SnapshotExists(f"rank {r} {what}: {note.split(': ', 1)[-1]}")
        raise SnapshotError(f"rank {r} failed {what}: {note}")
    return [v for v, _n in gathered]


def _attempt(store: FileStore, step: int, ranks: Ranks, failed: BaseException | None = None) -> str:
    """Rank 0 draws the attempt id and refuses a step already committed here; all ranks agree. A rank that
    ``failed`` to stage fails the attempt on every rank here, at its first collective."""
    attempt, error = None, failed
    if ranks.rank == 0 and failed is None:
        attempt = uuid.uuid4().hex[:16]
        if ranks.whole and store.exists(f"{step_dir(step)}/{MANIFEST}"):
            error = SnapshotExists(f"{store.uri}/{step_dir(step)} is already committed; a step is saved once")
    return _gather(ranks, attempt, error, "starting the snapshot")[0]


def _in_each(ranks: Ranks, what: str, fn: Callable[[], Any]) -> list:
    """Run ``fn`` on every rank; every rank gets every result, or raises if any rank failed."""
    try:
        value, error = fn(), None
    except Exception as e:  # delivered to every rank by _gather
        value, error = None, e
    return _gather(ranks, value, error, what)


def write_dcp(directory: str, leaves: Sequence[Leaf], ranks: Ranks, order: Sequence[str] = ()) -> list[Item]:
    """Save ``leaves`` with DCP into ``directory``; return the item index, in ``order`` of the state."""
    flat = {leaf.fqn: leaf.value for leaf in leaves if not is_empty(leaf.value)}
    md = dcp.save(
        flat,
        storage_writer=FileSystemWriter(directory, sync_files=True, thread_count=1),
        planner=DefaultSavePlanner(flatten_state_dict=False),
        process_group=ranks.group,
        no_dist=not ranks.distributed,
    )
    paths = {leaf.fqn: leaf.path for leaf in leaves}
    empties = [_empty_item(leaf) for leaf in leaves if is_empty(leaf.value)]
    if ranks.distributed:  # other ranks' own keys (rng, extra) need their paths too
        gathered: list = [None] * ranks.world_size
        dist.all_gather_object(gathered, (paths, empties), group=ranks.group)
        paths = {k: v for part, _ in gathered for k, v in part.items()}
        empties = list({e.fqn: e for _, part in gathered for e in part}.values())
    items = list(empties)
    for index, info in md.storage_data.items():
        items.append(_item(index, info, md.state_dict_metadata[index.fqn], paths[index.fqn]))
    return _in_order(items, _state_order(ranks, order, paths))


def _state_order(ranks: Ranks, order: Sequence[str], known: Iterable[str]) -> dict[str, int]:
    """Each name's place in the state, every rank's names included (rank 0's first), so restore keeps it."""
    names = list(order) or list(known)
    if ranks.distributed:
        gathered: list = [None] * ranks.world_size
        dist.all_gather_object(gathered, names, group=ranks.group)
        names = [n for part in gathered for n in part]
    return {fqn: n for n, fqn in enumerate(dict.fromkeys([*names, *known]))}


def _in_order(items: Iterable[Item], order: dict[str, int]) -> list[Item]:
    return sorted(items, key=lambda i: (order[i.fqn], i.chunk_offsets))


def write_images(
    directory: str, leaves: Sequence[Leaf], ranks: Ranks, image: FileImage, writer: DirectWriter, order: Sequence[str]
) -> tuple[list[Item], list[FileEntry], str]:
    """Every rank writes its data file from its image (O_DIRECT, checksummed as it goes), then rank 0 writes
    DCP's ``.metadata`` for all of them: the layout ``dcp.save`` would have made, without the page cache."""
    done = _in_each(
        ranks,
        "writing its data file",
        lambda: write_image(directory, leaves, image, writer, rank=ranks.rank, algo=DEFAULT_ALGO),
    )
    empties = {i.fqn: i for d in done for i in d.items if i.kind == "empty"}  # every rank has its own
    kept = [i for d in done for i in d.items if i.kind != "empty"] + list(empties.values())
    items = _in_order(kept, _state_order(ranks, order, (i.fqn for i in kept)))
    metadata = _in_each(
        ranks,
        "writing .metadata",
        lambda: write_metadata(directory, items, rank=0, algo=DEFAULT_ALGO) if ranks.rank == 0 else None,
    )[0]
    ios = {d.io for d in done}
    return items, [metadata, *(f for d in done for f in d.files)], "buffered" if "buffered" in ios else ios.pop()


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
    """Checksums of every rank's files, gathered; rank 0 also owns DCP's ``.metadata``."""

    def mine() -> list[dict]:
        prefix = f"__{ranks.rank}_"
        names = sorted(
            n for n in os.listdir(directory) if n.startswith(prefix) or (ranks.rank == 0 and n == ".metadata")
        )
        entries = []
        for name in names:
            value, size = file_checksum(os.path.join(directory, name), algo)
            entries.append(FileEntry(name, size, value, ranks.rank).__dict__)
        return entries

    return [FileEntry(**e) for part in _in_each(ranks, "checksumming its files", mine) for e in part]


def build_manifest(
    step: int,
    files: list[FileEntry],
    items: list[Item],
    ranks: Ranks,
    *,
    metrics: dict,
    meta: dict,
    attempt: str = "",
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
        attempt=attempt,
        job=ranks.job,
    )


def _agree_manifest(
    step: int, files: list[FileEntry], items: list[Item], ranks: Ranks, attempt: str, *, metrics: dict, meta: dict
) -> tuple[Manifest, bytes]:
    """Rank 0 builds the manifest; every rank gets the same bytes (they are committed by whoever can)."""

    def build() -> bytes | None:
        if ranks.rank != 0:
            return None
        return build_manifest(step, files, items, ranks, metrics=metrics, meta=meta, attempt=attempt).to_json()

    data = _in_each(ranks, "building the manifest", build)[0]
    return Manifest.from_json(data, source=f"manifest of step {step}"), data


def _finish(
    store: FileStore, directory: str, commit: LocalCommit, ranks: Ranks, fence: Callable[[], None] | None
) -> str:
    """The node leader writes the manifest and renames the attempt into place; returns the final path."""
    m = commit.manifest
    final = store.path_of(step_dir(m.step) if ranks.whole else partial_dir(m.step, m.attempt))
    with open(os.path.join(directory, MANIFEST), "wb") as f:
        f.write(commit.data)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(directory)
    if fence is not None:
        fence()  # a writer that lost the store's lease commits nothing
    os.makedirs(os.path.dirname(final), exist_ok=True)
    try:
        rename_noreplace(directory, final)
    except FileExistsError as e:
        raise SnapshotExists(
            f"{store.uri}/{step_dir(m.step)} is already committed by another writer; "
            "a step is committed once, so this attempt was discarded"
        ) from e
    fsync_dir(os.path.dirname(final))
    return final


def fail_everywhere(store: FileStore, step: int, ranks: Ranks, failed: BaseException) -> None:
    """This rank could not stage ``step``, which the other ranks are writing: tell them at the attempt's first
    collective, so each fails it at once instead of waiting for this rank until the group's timeout."""
    _attempt(store, step, ranks, failed)


def write_snapshot(
    store: FileStore,
    step: int,
    leaves: Sequence[Leaf],
    ranks: Ranks,
    *,
    metrics: dict,
    meta: dict,
    fence: Callable[[], None] | None = None,
    image: FileImage | None = None,
    writer: DirectWriter | None = None,
    order: Sequence[str] = (),
    share: str = "",
    failed: BaseException | None = None,
) -> LocalCommit:
    """Write, checksum and commit one snapshot into a local store; every rank calls it.

    The attempt is written in its own directory, a part record per rank
    beside the files, then the node leader renames it into place. Only this
    attempt's own directory is ever removed on failure. ``fence`` raises if
    this writer may no longer commit (a lost lease). When every rank's
    tensors were staged into its ``image`` (each rank its own share, see
    ``assign.py``), each writes it with ``writer`` (O_DIRECT, checksummed in
    the same pass); otherwise DCP writes and the files are checksummed after.
    ``order`` names the whole state's values in order (a rank may write only
    its share of them), so a restore rebuilds containers in their order.
    ``share`` is the attempt whose assignment ``leaves`` are this rank's share
    of (empty: they are all of its state); several ranks write their images
    only when every one holds its share of the same assignment. A rank that
    ``failed`` before writing still calls this, and every rank raises it.
    """
    t0 = time.monotonic()
    order = order or [leaf.fqn for leaf in leaves]
    attempt = _attempt(store, step, ranks, failed)
    directory = store.path_of(attempt_dir(step, attempt))
    committed = False
    try:
        _in_each(ranks, "creating its attempt directory", lambda: os.makedirs(directory, exist_ok=True))
        staged = writer is not None and image is not None and fits_image(leaves, image)
        shares = _in_each(ranks, "checking its file image", lambda: share if staged else None)
        if shares[0] is not None and len(set(shares)) == 1 and (share or not ranks.distributed):
            assert image is not None and writer is not None
            items, files, io = write_images(directory, leaves, ranks, image, writer, order)
        else:
            items = write_dcp(directory, leaves, ranks, order)
            files, io = checksum_files(directory, ranks), "dcp"
        meta = {**meta, "write_s": time.monotonic() - t0, "io": io}
        manifest, data = _agree_manifest(step, files, items, ranks, attempt, metrics=metrics, meta=meta)
        part = PartRecord.of(manifest, data, ranks.rank)
        _in_each(
            ranks,
            "writing its part record",
            lambda: _write_synced(os.path.join(directory, part_name(ranks.rank)), part.to_json()),
        )
        log.debug("ckptd: step %d: files written, committing", step)
        commit = LocalCommit(manifest, data, directory, ranks.whole)
        finals = _in_each(
            ranks,
            "committing its local tier",
            lambda: _finish(store, directory, commit, ranks, fence) if ranks.node_leader else None,
        )
        committed = True
    finally:
        if not committed and ranks.node_leader:
            shutil.rmtree(directory, ignore_errors=True)  # this attempt's own files, nobody else's
    return LocalCommit(manifest, data, finals[ranks.leader], ranks.whole)


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
