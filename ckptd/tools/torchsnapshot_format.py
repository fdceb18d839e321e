"""Read torchsnapshot snapshots (its format 0.1.x) so their users can move to ckptd.

The manifest ``.snapshot_metadata`` is JSON-compatible YAML and is read
without the torchsnapshot package. Tensors stored with the buffer protocol
are raw bytes at a byte range; anything stored with ``torch_save`` is read
with ``torch.load(weights_only=True)``, so no code is unpickled. Sharded
tensors (several ranks' pieces of one tensor) are not read.
"""

from __future__ import annotations

import base64
import json
import os
import struct
from typing import Any

from ..errors import ConfigError, NoSnapshot, SnapshotCorrupt, UnsafeSnapshot
from ..store.keys import check_key

METADATA = ".snapshot_metadata"
_CONTAINERS = ("dict", "OrderedDict", "list")


def is_torchsnapshot(path: str) -> bool:
    return os.path.isfile(os.path.join(path, METADATA))


def read_metadata(path: str) -> dict[str, Any]:
    """The parsed manifest of the torchsnapshot at ``path``."""
    try:
        with open(os.path.join(path, METADATA)) as f:
            text = f.read()
    except FileNotFoundError as e:
        raise NoSnapshot(f"{path} is not a torchsnapshot snapshot (no {METADATA})") from e
    try:
        meta = json.loads(text)
    except ValueError:
        import yaml

        meta = yaml.safe_load(text)
    if not isinstance(meta, dict) or "manifest" not in meta:
        raise SnapshotCorrupt(f"{path}/{METADATA} is not a torchsnapshot manifest")
    return meta


def describe(path: str, rank: int = 0) -> dict[str, Any]:
    """Tensor tree and metadata of a torchsnapshot, without reading tensor data."""
    meta = read_metadata(path)
    tensors = []
    for key, entry in meta["manifest"].items():
        rank_str, _, name = key.partition("/")
        if rank_str != str(rank) or entry.get("type") not in ("Tensor", "ChunkedTensor", "ShardedTensor"):
            continue
        shape = entry.get("shape", [])
        dtype = str(entry.get("dtype", "")).removeprefix("torch.")
        count = 1
        for d in shape:
            count *= d
        tensors.append(
            {
                "name": name.replace("/", "."),
                "group": name.split("/")[0],
                "shape": shape,
                "dtype": dtype,
                "nbytes": count * _itemsize(dtype),
            }
        )
    return {
        "format": f"torchsnapshot {meta.get('version')}",
        "world_size": meta.get("world_size"),
        "step": None,
        "nbytes": sum(t["nbytes"] for t in tensors),
        "tensors": tensors,
        "rng": [],
    }


def _itemsize(dtype: str) -> int:
    import re

    m = re.search(r"(\d+)$", dtype)
    return {"bool": 1, "uint8": 1, "int8": 1}.get(dtype, int(m.group(1)) // 8 if m else 4)


def read_state(path: str, rank: int = 0) -> dict[str, Any]:
    """The app state of one rank, rebuilt as nested dicts and lists of tensors and plain values."""
    meta = read_metadata(path)["manifest"]
    prefix = f"{rank}/"
    roots = [k for k in meta if k.startswith(prefix) and "/" not in k[len(prefix) :]]
    if not roots:
        raise NoSnapshot(f"{path} holds nothing of rank {rank}")
    return {k[len(prefix) :]: _build(path, meta, k) for k in roots}


def _build(path: str, meta: dict, key: str) -> Any:
    entry = meta[key]
    kind = entry.get("type")
    if kind in _CONTAINERS:
        if kind == "list":
            n = sum(1 for k in meta if k.startswith(key + "/") and "/" not in k[len(key) + 1 :])
            return [_build(path, meta, f"{key}/{i}") for i in range(n)]
        return {k: _build(path, meta, f"{key}/{k}") for k in entry.get("keys", [])}
    if kind == "Tensor":
        return _tensor(path, entry, key)
    if kind == "ChunkedTensor":
        return _chunked(path, entry, key)
    if kind == "object":
        return _torch_load(path, entry, key)
    if kind in ("int", "float", "bool", "str", "bytes"):
        return _primitive(entry, key)
    raise ConfigError(f"{key}: torchsnapshot entry type {kind!r} is not supported (sharded tensors are not)")


def _read(path: str, entry: dict, key: str) -> bytes:
    location = check_key(entry["location"])
    start, end = entry.get("byte_range") or (0, None)
    try:
        with open(os.path.join(path, *location.split("/")), "rb") as f:
            f.seek(start)
            return f.read() if end is None else f.read(end - start)
    except FileNotFoundError as e:
        raise SnapshotCorrupt(f"{key}: {location} is missing from {path}") from e


def _tensor(path: str, entry: dict, key: str):
    import torch

    data = _read(path, entry, key)
    if entry.get("serializer") == "torch_save":
        return _load_bytes(data, key)
    dtype = getattr(torch, str(entry["dtype"]).removeprefix("torch."), None)
    if not isinstance(dtype, torch.dtype):
        raise SnapshotCorrupt(f"{key}: unknown dtype {entry['dtype']!r}")
    if not data:
        return torch.empty(entry["shape"], dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(entry["shape"]).clone()


def _chunked(path: str, entry: dict, key: str):
    import torch

    dtype = getattr(torch, str(entry["dtype"]).removeprefix("torch."))
    full = torch.empty(entry["shape"], dtype=dtype)
    for chunk in entry["chunks"]:
        part = _tensor(path, chunk["tensor"], key)
        view = full
        for dim, (off, size) in enumerate(zip(chunk["offsets"], chunk["sizes"])):
            view = view.narrow(dim, off, size)
        view.copy_(part)
    return full


def _torch_load(path: str, entry: dict, key: str) -> Any:
    if entry.get("serializer") != "torch_save":
        raise UnsafeSnapshot(f"{key}: object serialized with {entry.get('serializer')!r}; ckptd reads only torch_save")
    return _load_bytes(_read(path, entry, key), key)


def _load_bytes(data: bytes, key: str) -> Any:
    import io
    import pickle

    import torch

    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeSnapshot(
            f"{key}: holds a Python object that is not plain data; ckptd will not unpickle it "
            f"({str(e).splitlines()[0]})"
        ) from e


def _primitive(entry: dict, key: str) -> Any:
    kind, raw = entry["type"], entry.get("serialized_value")
    if not isinstance(raw, str):
        raise SnapshotCorrupt(f"{key}: torchsnapshot {kind} entry has no serialized_value string")
    try:
        return _decode(kind, raw)
    except (ValueError, struct.error) as e:  # binascii.Error is a ValueError
        raise SnapshotCorrupt(f"{key}: torchsnapshot {kind} value {raw[:40]!r} does not decode ({e})") from e


def _decode(kind: str, raw: str) -> Any:
    if kind == "float":
        return struct.unpack("<d", base64.b64decode(raw))[0]
    if kind == "int":
        return int(raw)
    if kind == "bool":
        return raw == "True"
    if kind == "bytes":
        return base64.b64decode(raw)
    return str(raw)
