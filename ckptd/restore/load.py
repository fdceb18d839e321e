"""Load a snapshot directory through the manifest, never through pickle.

Each data file is read once, in order, with its checksum computed in the
same pass (``read.py``): the raw data of every tensor written from a file
image goes straight into its destination, the live tensor of the model or
optimizer when the caller passes one of the same shape and dtype
(``Destinations``), else a tensor of its own; record headers and plain
values go into a small scratch buffer. Each image record's header (the
dtype and shape ``torch.save`` wrote) is checked against the manifest.
Other tensors and plain values go through ``torch.load(weights_only=True)``.
DCP's pickled ``.metadata`` is not read.
"""

from __future__ import annotations

import bisect
import io
import mmap
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..errors import SnapshotCorrupt, UnsafeSnapshot
from ..snapshot.flatten import unflatten
from ..snapshot.image import read_header, tensor_dtype
from ..snapshot.manifest import FileEntry, Item, Manifest, require_kind
from .read import Piece, read_pieces


@dataclass
class Destinations:
    """Live tensors a restore may read straight into, by fqn; ``touched`` once any byte went into one.

    A read that fails after touching them leaves them holding part of a snapshot: the caller must then load
    another one into them, or say so.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    touched: bool = False
    _claimed: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    """Memory already given to an item, by storage: a tied weight is read into once, the other copy apart."""

    def fit(self, manifest: Manifest) -> Destinations | None:
        """These destinations if the saved model has the same tensors (names and shapes) as the live one,
        else None: a snapshot that does not fit is then refused by the load without touching the model."""

        def model_of(pairs):
            return {fqn: tuple(shape) for fqn, shape in pairs if fqn.split(".", 1)[0] == "model"}

        saved = model_of((i.fqn, i.shape) for i in manifest.items if i.kind == "tensor")
        self._claimed.clear()  # a new read: nothing is claimed yet
        return self if saved == model_of((fqn, t.shape) for fqn, t in self.tensors.items()) else None

    def take(self, item: Item, dtype: torch.dtype) -> torch.Tensor | None:
        t = self.tensors.get(item.fqn)
        if (
            t is None
            or t.device.type != "cpu"
            or t.dtype != dtype
            or tuple(t.shape) != item.chunk_sizes
            or item.chunk_sizes != item.shape
            or not t.is_contiguous()
        ):
            return None
        start = t.data_ptr()
        end = start + t.nbytes
        claimed = self._claimed.setdefault(t.untyped_storage().data_ptr(), [])
        if any(lo < end and start < hi for lo, hi in claimed):
            return None
        claimed.append((start, end))
        return t


def read_state(
    directory: str,
    manifest: Manifest,
    *,
    select: Callable[[Item], bool] = lambda _i: True,
    into: Destinations | None = None,
) -> dict[str, Any]:
    """The nested state saved in ``directory`` (tensors on CPU), for the selected items."""
    require_kind(manifest, "tensor", source=directory)
    values: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    by_file: dict[str, list[Item]] = {}
    for item in manifest.items:
        if not select(item):
            continue
        paths[item.fqn] = item.path
        if item.kind == "empty":
            values[item.fqn] = {"dict": {}, "list": [], "tuple": ()}[item.empty]
        else:
            by_file.setdefault(item.file, []).append(item)
    entries = {f.name: f for f in manifest.files}
    for name, items in by_file.items():
        plan = _FilePlan(os.path.join(directory, name), entries[name], items, into)
        plan.read(manifest.checksum, into)
        for item, value in plan.values():
            values[item.fqn] = _place(values.get(item.fqn), value, item) if item.kind == "tensor" else value
    return unflatten((paths[fqn], v) for fqn, v in values.items())


class _FilePlan:
    """Where each byte of one data file goes: tensor data into destinations, the rest into scratch."""

    def __init__(self, path: str, entry: FileEntry, items: list[Item], into: Destinations | None) -> None:
        self.path, self.entry, self.items = path, entry, items
        self.dest: dict[str, torch.Tensor] = {}
        self.live: set[str] = set()
        spans = []  # (start, end, item) of raw tensor data read into a destination
        for item in items:
            if item.offset + item.length > entry.size:
                raise SnapshotCorrupt(f"{entry.name} ends before {item.fqn}; the snapshot is truncated")
            if item.kind == "tensor" and item.data_offset >= 0:
                dtype = tensor_dtype(item.dtype)
                nbytes = _numel(item.chunk_sizes) * dtype.itemsize
                start = item.data_offset
                if not item.offset <= start <= start + nbytes <= item.offset + item.length:
                    raise SnapshotCorrupt(
                        f"{item.fqn}: its data at {start}+{nbytes} lies outside its record "
                        f"{item.offset}+{item.length} in {item.file}"
                    )
                live = into.take(item, dtype) if into is not None else None
                if live is not None:
                    self.live.add(item.fqn)
                self.dest[item.fqn] = live if live is not None else torch.empty(item.chunk_sizes, dtype=dtype)
                if nbytes:
                    spans.append((start, start + nbytes, item))
        spans.sort(key=lambda s: s[0])
        self.pieces: list[Piece] = []
        self._gaps: list[tuple[int, int, int]] = []  # (file start, file end, scratch start)
        gaps, cursor = [], 0
        for start, end, item in spans:
            if start < cursor:
                raise SnapshotCorrupt(f"{item.fqn}: its data overlaps another tensor's in {item.file}")
            gaps.append((cursor, start))
            cursor = end
        gaps.append((cursor, entry.size))
        total = sum(b - a for a, b in gaps)
        self._scratch = mmap.mmap(-1, max(total, 1))
        scratch, at = memoryview(self._scratch), 0
        for (lo, hi), span in zip(gaps, spans + [None]):
            if hi > lo:
                self.pieces.append(Piece(lo, scratch[at : at + hi - lo]))
                self._gaps.append((lo, hi, at))
                at += hi - lo
            if span is not None:
                self.pieces.append(Piece(span[0], _bytes_of(self.dest[span[2].fqn])))
        self._starts = [g[0] for g in self._gaps]

    def read(self, algo: str, into: Destinations | None) -> None:
        """Read the file into place, checksummed; SnapshotCorrupt if it is not what the manifest lists."""
        if into is not None and self.live:
            into.touched = True
        try:
            value = read_pieces(self.path, self.pieces, size=self.entry.size, algo=algo)
        except OSError as e:
            raise SnapshotCorrupt(f"{self.path} cannot be read: {e}") from e
        finally:
            self.pieces = []  # the views into destinations and scratch go now
        if value != self.entry.checksum:
            raise SnapshotCorrupt(
                f"{self.path} does not match the manifest ({algo} {value}; manifest says "
                f"{self.entry.checksum}): it changed after it was written"
            )

    def values(self):
        """(item, value) of every item, each image record's header checked against the manifest."""
        headers: dict = {}
        for item in self.items:
            if item.kind == "tensor" and item.data_offset >= 0:
                self._check_header(item, headers)
                yield item, self.dest[item.fqn]
            else:
                yield item, _load(self._bytes(item.offset, item.offset + item.length, item), item)

    def _check_header(self, item: Item, cache: dict) -> None:
        try:
            header = read_header(self._bytes(item.offset, item.data_offset, item), cache)
        except ValueError as e:
            raise SnapshotCorrupt(f"{item.fqn}: its record in {item.file} is not a tensor record: {e}") from e
        dtype = tensor_dtype(item.dtype)
        nbytes = _numel(item.chunk_sizes) * dtype.itemsize
        if header.dtype != dtype or header.shape != item.chunk_sizes or header.nbytes != nbytes:
            raise SnapshotCorrupt(
                f"{item.fqn}: its record in {item.file} holds {tuple(header.shape)} {header.dtype}, the manifest "
                f"says {item.chunk_sizes} {dtype}: the manifest does not describe the data"
            )

    def _bytes(self, lo: int, hi: int, item: Item) -> bytes:
        """File bytes ``lo`` .. ``hi`` from scratch; SnapshotCorrupt when a tensor's data lies among them."""
        i = bisect.bisect_right(self._starts, lo) - 1
        if lo == hi:
            return b""
        if i < 0 or hi > self._gaps[i][1]:
            raise SnapshotCorrupt(f"{item.fqn}: its record in {item.file} overlaps another tensor's data")
        start, _end, at = self._gaps[i]
        return self._scratch[at + lo - start : at + hi - start]


def _bytes_of(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]  # numpy arrays are buffers


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _load(raw: bytes, item: Item) -> Any:
    return load_value(raw, f"{item.fqn} in {item.file}")


def load_value(raw: bytes, what: str) -> Any:
    """One ``torch.save`` record: tensors and plain values only (weights_only); anything else is refused.

    The one place ckptd unpickles store bytes, for its own snapshots and for the formats it converts.
    """
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeSnapshot(
            f"{what} holds something other than tensors and plain values; ckptd refuses to "
            f"unpickle it ({str(e).splitlines()[0]})"
        ) from e
    except Exception as e:
        raise SnapshotCorrupt(f"{what} cannot be read: {e}") from e


def _place(full: torch.Tensor | None, chunk: Any, item: Item) -> torch.Tensor:
    """Put one chunk of a tensor into the whole; a single chunk is the whole."""
    return place_chunk(
        full,
        chunk,
        shape=item.shape,
        offsets=item.chunk_offsets,
        sizes=item.chunk_sizes,
        dtype=tensor_dtype(item.dtype),
        what=item.fqn,
    )


def place_chunk(
    full: torch.Tensor | None,
    chunk: Any,
    *,
    shape: tuple[int, ...],
    offsets: tuple[int, ...],
    sizes: tuple[int, ...],
    dtype: torch.dtype,
    what: str,
) -> torch.Tensor:
    """Put ``chunk`` at ``offsets`` of the whole tensor ``full`` (made on first use); a chunk the size of the
    whole is the whole. The chunk must have the shape and dtype the manifest declares."""
    if not isinstance(chunk, torch.Tensor):
        raise SnapshotCorrupt(f"{what}: expected a tensor, found {type(chunk).__name__}")
    if tuple(chunk.shape) != tuple(sizes) or chunk.dtype != dtype:
        raise SnapshotCorrupt(
            f"{what}: stored chunk is {tuple(chunk.shape)} {chunk.dtype}, manifest says {sizes} {dtype}"
        )
    if tuple(sizes) == tuple(shape):
        return chunk
    if full is None:
        full = torch.empty(shape, dtype=dtype)
    view = full
    for dim, (off, size) in enumerate(zip(offsets, sizes)):
        view = view.narrow(dim, off, size)
    view.copy_(chunk)
    return full
