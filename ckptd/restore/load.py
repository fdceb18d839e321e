"""Load a verified snapshot directory through the manifest, never through pickle.

Each data file is read once, whole, into a page-aligned buffer with its
checksum computed in the same pass (or taken as verified moments ago in a
``keep_reads()`` block). Tensors written from a file image are views of
that buffer at the data offset the manifest gives, so nothing is
deserialized; other tensors and plain values go through
``torch.load(weights_only=True)``. DCP's pickled ``.metadata`` is not read.
"""

from __future__ import annotations

import io
import os
import pickle
import warnings
from typing import Any, Callable

import torch

from ..errors import ConfigError, SnapshotCorrupt, UnsafeSnapshot
from ..store.checksum import read_checksummed, take_kept
from ..snapshot.flatten import unflatten
from ..snapshot.manifest import Item, Manifest
from ..snapshot.write import tensor_dtype


def read_state(
    directory: str, manifest: Manifest, *, select: Callable[[Item], bool] = lambda _i: True
) -> dict[str, Any]:
    """The nested state saved in ``directory`` (tensors on CPU), for the selected items."""
    files: dict[str, torch.Tensor] = {}
    values: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    entries = {f.name: f for f in manifest.files}
    for item in manifest.items:
        if not select(item):
            continue
        paths[item.fqn] = item.path
        if item.kind == "empty":
            values[item.fqn] = {"dict": {}, "list": [], "tuple": ()}[item.empty]
            continue
        if item.file not in files:
            files[item.file] = _read_file(directory, item.file, entries, manifest.checksum)
        data = files[item.file]
        if item.offset + item.length > data.numel():
            raise SnapshotCorrupt(f"{item.file} ends before {item.fqn}; the snapshot is truncated")
        if item.kind == "tensor" and item.data_offset >= 0:
            value = _view(data, item)
        else:
            value = _load(data[item.offset:item.offset + item.length].numpy().tobytes(), item)
        if item.kind == "tensor":
            value = _place(values.get(item.fqn), value, item)
        values[item.fqn] = value
    return unflatten((paths[fqn], v) for fqn, v in values.items())


def _read_file(directory: str, name: str, entries: dict, algo: str) -> torch.Tensor:
    """A data file's bytes: as verified in the enclosing ``keep_reads()`` block, else read and checked now."""
    path = os.path.join(directory, name)
    buf = take_kept(path)
    if buf is None:
        try:
            buf, value, size = read_checksummed(path, algo)
        except OSError as e:
            raise SnapshotCorrupt(f"{path} cannot be read: {e}") from e
        entry = entries.get(name)
        if entry is not None and (size != entry.size or value != entry.checksum):
            raise SnapshotCorrupt(f"{path} does not match the manifest ({size} bytes, {algo} {value}; manifest "
                                  f"says {entry.size} bytes, {entry.checksum}): it changed after it was verified")
        length = size
    else:
        length = entries[name].size if name in entries else len(buf)
    if length == 0:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "non-writable buffer": the buffer is ours and writable
        return torch.frombuffer(buf, dtype=torch.uint8, count=length)


def _view(data: torch.Tensor, item: Item) -> torch.Tensor:
    """The tensor an image record holds, as a view of the file's bytes (checked against the record's bounds)."""
    dtype = tensor_dtype(item.dtype)
    numel = 1
    for s in item.chunk_sizes:
        numel *= s
    nbytes = numel * dtype.itemsize
    start = item.data_offset
    if not item.offset <= start <= start + nbytes <= item.offset + item.length:
        raise SnapshotCorrupt(f"{item.fqn}: its data at {start}+{nbytes} lies outside its record "
                              f"{item.offset}+{item.length} in {item.file}")
    if start % dtype.itemsize:
        raise SnapshotCorrupt(f"{item.fqn}: data offset {start} is not aligned for {dtype}")
    if nbytes == 0:
        return torch.empty(item.chunk_sizes, dtype=dtype)
    # One copy into the tensor's own memory: a view would keep the whole file alive in whatever holds it
    # (optimizer state) and torch.save of such a view writes the whole buffer.
    return data[start:start + nbytes].view(dtype).view(item.chunk_sizes).clone()


def _load(raw: bytes, item: Item) -> Any:
    try:
        return torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeSnapshot(
            f"{item.fqn} holds something other than tensors and plain values; ckptd refuses to "
            f"unpickle it ({str(e).splitlines()[0]})"
        ) from e
    except Exception as e:
        raise SnapshotCorrupt(f"{item.fqn} in {item.file} cannot be read: {e}") from e


def _place(full: torch.Tensor | None, chunk: Any, item: Item) -> torch.Tensor:
    """Put one chunk of a tensor into the whole; a single chunk is the whole."""
    if not isinstance(chunk, torch.Tensor):
        raise SnapshotCorrupt(f"{item.fqn}: expected a tensor, found {type(chunk).__name__}")
    dtype = tensor_dtype(item.dtype)
    if tuple(chunk.shape) != item.chunk_sizes or chunk.dtype != dtype:
        raise SnapshotCorrupt(
            f"{item.fqn}: stored chunk is {tuple(chunk.shape)} {chunk.dtype}, "
            f"manifest says {item.chunk_sizes} {dtype}"
        )
    if item.chunk_sizes == item.shape:
        return chunk
    if full is None:
        full = torch.empty(item.shape, dtype=dtype)
    view = full
    for dim, (off, size) in enumerate(zip(item.chunk_offsets, item.chunk_sizes)):
        view = view.narrow(dim, off, size)
    view.copy_(chunk)
    return full
