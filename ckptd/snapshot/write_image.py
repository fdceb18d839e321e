"""Write one rank's snapshot from its file image: the data file, DCP's ``.metadata``, the item index.

The tensors are already in place in the staging pool; what is made per
snapshot is small: the non-tensor records, appended after the tensors, the
zip CRC of each tensor's data (filled in by ``RecordCrc`` as the writer's
checksum pass goes by), and ``.metadata`` as DCP writes it, so
``dcp.load(checkpoint_id=...)`` reads the snapshot.
"""

from __future__ import annotations

import mmap
import os
import pickle
import struct
import uuid
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)

from ..store.checksum import Checksum
from .direct import DirectWriter, Segment
from .flatten import Leaf, is_empty
from .image import ALIGN, Layout, Placed, align_up, object_record
from .manifest import FileEntry, Item
from .stage import FileImage

DCP_METADATA = ".metadata"


def data_file(rank: int) -> str:
    """The data file of ``rank``, named as DCP's own writer names it."""
    return f"__{rank}_0.distcp"


def fits_image(leaves: Sequence[Leaf], image: FileImage | None) -> bool:
    """True when every tensor leaf is a view of ``image`` (staged into it), so the image can be written."""
    if image is None:
        return False
    tensors = [leaf for leaf in leaves if isinstance(leaf.value, torch.Tensor)]
    views = image.tensors
    return len(tensors) == len(image.layout.placed) and all(views.get(leaf.fqn) is leaf.value for leaf in tensors)


class RecordCrc:
    """The zip CRC-32 of each tensor's data, computed piece by piece and written into its record.

    Pieces arrive in file order; once a tensor's last byte has gone by its
    CRC goes into the record's data descriptor and central directory entry,
    which lie after the data, so they are patched before they are checksummed
    and written.
    """

    def __init__(self, image: FileImage) -> None:
        self._placed = sorted((p for p in image.layout.placed if p.nbytes), key=lambda p: p.data)
        self._view = image.view
        self._next = 0
        self._crc = 0

    def __call__(self, offset: int, piece: memoryview) -> None:
        end = offset + len(piece)
        while self._next < len(self._placed):
            p = self._placed[self._next]
            if p.data >= end:
                return
            lo, hi = max(offset, p.data), min(end, p.data + p.nbytes)
            if lo < hi:
                self._crc = zlib.crc32(piece[lo - offset : hi - offset], self._crc)
            if p.data + p.nbytes > end:
                return
            self._finish(p)

    def _finish(self, p: Placed) -> None:
        base = p.data + p.nbytes
        for at in p.template.crc_at:
            struct.pack_into("<I", self._view, base + at, self._crc)
        self._next += 1
        self._crc = 0


@dataclass
class ImageWrite:
    """What one rank's image write produced."""

    items: list[Item]
    files: list[FileEntry]
    io: str


def write_image(
    directory: str, leaves: Sequence[Leaf], image: FileImage, writer: DirectWriter, *, rank: int, algo: str
) -> ImageWrite:
    """Write the data file of ``rank`` into ``directory`` from its image: its items and its file's entry.

    A single-rank snapshot then needs ``write_metadata`` of those items; several ranks gather theirs first.
    """
    name = data_file(rank)
    layout = image.layout
    objects = [leaf for leaf in leaves if not isinstance(leaf.value, torch.Tensor) and not is_empty(leaf.value)]
    records = [object_record(leaf.value) for leaf in objects]
    tail, placed_objects = _tail(records, layout.size)
    size = layout.size + sum(len(r) for r in records) if records else _tensor_end(layout)
    segments = [Segment(0, image.view[: layout.size])] if layout.size else []
    tail_view = memoryview(tail) if tail is not None else None
    if tail_view is not None:
        segments.append(Segment(layout.size, tail_view))
    try:
        written = writer.write(os.path.join(directory, name), segments, size, algo=algo, hook=RecordCrc(image))
    finally:
        segments = []
        if tail_view is not None:
            tail_view.release()
        if tail is not None:
            tail.close()
    items = _items(leaves, layout, objects, placed_objects, name)
    return ImageWrite(items, [FileEntry(name, written.size, written.checksum, rank)], written.io)


def write_metadata(directory: str, items: Sequence[Item], *, rank: int, algo: str) -> FileEntry:
    """DCP's ``.metadata`` for every rank's ``items``, written and checksummed by ``rank`` (rank 0, as DCP)."""
    md = pickle.dumps(_dcp_metadata(items), protocol=pickle.HIGHEST_PROTOCOL)
    _write_synced(os.path.join(directory, DCP_METADATA), md)
    cs = Checksum(algo)
    cs.update(md)
    return FileEntry(DCP_METADATA, len(md), cs.hexdigest(), rank)


def _tensor_end(layout: Layout) -> int:
    return max((p.offset + p.length for p in layout.placed), default=0)


def _tail(records: list[bytes], start: int) -> tuple[mmap.mmap | None, list[tuple[int, int]]]:
    """An aligned buffer holding the object records back to back, and each one's (offset, length) in the file."""
    if not records:
        return None, []
    total = sum(len(r) for r in records)
    buf = mmap.mmap(-1, align_up(total, ALIGN))
    placed, pos = [], 0
    for r in records:
        buf[pos : pos + len(r)] = r
        placed.append((start + pos, len(r)))
        pos += len(r)
    return buf, placed


def _items(
    leaves: Sequence[Leaf], layout: Layout, objects: list[Leaf], placed_objects: list[tuple[int, int]], name: str
) -> list[Item]:
    where = {leaf.fqn: at for leaf, at in zip(objects, placed_objects)}
    items = []
    for leaf in leaves:
        if isinstance(leaf.value, torch.Tensor):
            p = layout.by_fqn[leaf.fqn]
            items.append(
                Item(
                    fqn=leaf.fqn,
                    path=leaf.path,
                    kind="tensor",
                    file=name,
                    offset=p.offset,
                    length=p.length,
                    shape=p.shape,
                    dtype=str(p.dtype).removeprefix("torch."),
                    nbytes=p.nbytes,
                    chunk_offsets=(0,) * len(p.shape),
                    chunk_sizes=p.shape,
                    data_offset=p.data,
                )
            )
        elif leaf.fqn in where:
            offset, length = where[leaf.fqn]
            items.append(Item(fqn=leaf.fqn, path=leaf.path, kind="object", file=name, offset=offset, length=length))
        else:
            kind = "dict" if isinstance(leaf.value, dict) else type(leaf.value).__name__
            items.append(Item(leaf.fqn, leaf.path, "empty", "", 0, 0, empty=kind))
    return items


def _dcp_metadata(items: Sequence[Item]) -> Metadata:
    """DCP's ``.metadata`` for these items, as ``dcp.save`` with ``flatten_state_dict=False`` writes it."""
    sd_meta: dict[str, Any] = {}
    storage: dict[MetadataIndex, _StorageInfo] = {}
    for item in items:
        if item.kind == "empty":
            continue
        info = _StorageInfo(relative_path=item.file, offset=item.offset, length=item.length)
        if item.kind == "object":
            sd_meta[item.fqn] = BytesStorageMetadata()
            storage[MetadataIndex(item.fqn)] = info
            continue
        size = torch.Size(item.shape)
        offsets = torch.Size(item.chunk_offsets)
        sd_meta[item.fqn] = TensorStorageMetadata(
            properties=TensorProperties(dtype=getattr(torch, item.dtype)),
            size=size,
            chunks=[ChunkStorageMetadata(offsets=offsets, sizes=size)],
        )
        storage[MetadataIndex(item.fqn, offsets, 0)] = info
    return Metadata(
        state_dict_metadata=sd_meta,
        planner_data=None,
        storage_data=storage,
        storage_meta=StorageMeta(save_id=str(uuid.uuid4())),
        version="1.0.0",
    )


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
