"""Load a verified snapshot directory through the manifest, never through pickle.

Tensors and plain values are read with ``torch.load(weights_only=True)`` at
the offsets the JSON manifest gives; DCP's pickled ``.metadata`` is not read.
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Any, Callable

import torch

from ..errors import SnapshotCorrupt, UnsafeSnapshot
from ..snapshot.flatten import unflatten
from ..snapshot.manifest import Item, Manifest
from ..snapshot.write import tensor_dtype


def read_state(
    directory: str, manifest: Manifest, *, select: Callable[[Item], bool] = lambda _i: True
) -> dict[str, Any]:
    """The nested state saved in ``directory`` (tensors on CPU), for the selected items."""
    fds: dict[str, int] = {}
    values: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    try:
        for item in manifest.items:
            if not select(item):
                continue
            paths[item.fqn] = item.path
            if item.kind == "empty":
                values[item.fqn] = {"dict": {}, "list": [], "tuple": ()}[item.empty]
                continue
            if item.file not in fds:
                fds[item.file] = os.open(os.path.join(directory, item.file), os.O_RDONLY)
            raw = os.pread(fds[item.file], item.length, item.offset)
            if len(raw) != item.length:
                raise SnapshotCorrupt(f"{item.file} ends before {item.fqn}; the snapshot is truncated")
            value = _load(raw, item)
            if item.kind == "tensor":
                value = _place(values.get(item.fqn), value, item)
            values[item.fqn] = value
    finally:
        for fd in fds.values():
            os.close(fd)
    return unflatten((paths[fqn], v) for fqn, v in values.items())


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
