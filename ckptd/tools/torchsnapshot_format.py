"""Read torchsnapshot snapshots (its format 0.1.x) so their users can move to ckptd.

The manifest ``.snapshot_metadata`` is JSON-compatible YAML and is read
without the torchsnapshot package. It passes one gate, ``read_metadata``,
which checks every entry (types, shapes, dtypes, byte ranges, keys) before
anything is allocated or opened; the readers below trust only what passed.
Tensors stored with the buffer protocol are raw bytes at a byte range;
anything stored with ``torch_save`` goes through ckptd's one weights-only
loader, so no code is unpickled. Sharded tensors (several ranks' pieces of
one tensor) are not read.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import struct
from typing import Any

from ..errors import ConfigError, NoSnapshot, SnapshotCorrupt, UnsafeSnapshot
from ..snapshot.manifest import ITEMSIZE as _ITEMSIZE
from ..snapshot.manifest import MAX_FILE_BYTES, MAX_MANIFEST_BYTES
from ..store.file import open_regular
from ..store.keys import check_key

METADATA = ".snapshot_metadata"
_CONTAINERS = ("dict", "OrderedDict", "list")
_PRIMITIVES = ("int", "float", "bool", "str", "bytes")
_TENSORS = ("Tensor", "ChunkedTensor", "ShardedTensor")
_MAX_DIMS = 64
_MAX_DEPTH = 256


def is_torchsnapshot(path: str) -> bool:
    return os.path.isfile(os.path.join(path, METADATA))


def read_metadata(path: str) -> dict[str, Any]:
    """The parsed and checked manifest of the torchsnapshot at ``path``; SnapshotCorrupt naming the first
    entry that is not what torchsnapshot writes."""
    where = os.path.join(path, METADATA)
    try:
        with open_regular(where) as f:
            text = f.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError as e:
        raise NoSnapshot(f"{path} is not a torchsnapshot snapshot (no {METADATA})") from e
    if len(text) > MAX_MANIFEST_BYTES:
        raise SnapshotCorrupt(f"{where} is larger than any manifest ({MAX_MANIFEST_BYTES} bytes)")
    try:
        meta = json.loads(text)
    except ValueError:
        import yaml

        try:
            meta = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise SnapshotCorrupt(f"{where} is neither JSON nor YAML: {str(e).splitlines()[0]}") from e
    if not isinstance(meta, dict) or not isinstance(meta.get("manifest"), dict):
        raise SnapshotCorrupt(f"{where} is not a torchsnapshot manifest")
    manifest = meta["manifest"]
    for key, entry in manifest.items():
        try:
            _check_entry(key, entry, manifest)
        except (TypeError, ValueError, KeyError) as e:
            raise SnapshotCorrupt(f"{where}: entry {str(key)[:200]!r}: {e}") from None
    return meta


def _check_entry(key: Any, entry: Any, manifest: dict) -> None:
    if not isinstance(key, str) or not isinstance(entry, dict):
        raise TypeError("not a named entry")
    kind = entry.get("type")
    if kind in ("dict", "OrderedDict"):
        keys = entry.get("keys", [])
        if not isinstance(keys, list) or not all(isinstance(k, (str, int)) for k in keys):
            raise TypeError("keys is not a list of names")
        missing = [k for k in keys if f"{key}/{k}" not in manifest]
        if missing:
            raise KeyError(f"lists {missing[0]!r}, which has no entry")
    elif kind in ("Tensor", "object"):
        _check_stored(entry, tensor=kind == "Tensor")
    elif kind in ("ChunkedTensor", "ShardedTensor"):
        shape, dtype = _shape(entry), _dtype(entry)
        chunks = entry.get("chunks" if kind == "ChunkedTensor" else "shards", [])
        if not isinstance(chunks, list):
            raise TypeError("chunks is not a list")
        if kind == "ChunkedTensor":
            for chunk in chunks:
                _check_chunk(chunk, shape, dtype)
            if sum(math.prod(c["sizes"]) for c in chunks) != math.prod(shape):
                raise ValueError(f"its chunks do not cover shape {shape} once")
    elif kind in _PRIMITIVES:
        raw = entry.get("serialized_value")
        if not isinstance(raw, str):
            raise TypeError(f"{kind} entry has no serialized_value string")
        try:
            _decode(kind, raw)
        except (ValueError, struct.error, binascii.Error) as e:
            raise ValueError(f"{kind} value {raw[:40]!r} does not decode ({e})") from None
    elif kind != "list":
        raise ValueError(f"type {str(kind)[:40]!r} is not one torchsnapshot writes")


def _check_stored(entry: dict, *, tensor: bool) -> None:
    """A stored object: a key inside the snapshot, a sane byte range, and for tensors a shape that fits it."""
    location = entry.get("location")
    if not isinstance(location, str):
        raise TypeError("no location")
    check_key(location)
    byte_range = entry.get("byte_range")
    if byte_range is not None:
        if not (isinstance(byte_range, list) and len(byte_range) == 2 and all(_is_int(b) for b in byte_range)):
            raise TypeError("byte_range is not [start, end]")
        start, end = byte_range
        if not 0 <= start <= end <= MAX_FILE_BYTES:
            raise ValueError(f"byte_range {byte_range} is not within a file")
    serializer = entry.get("serializer")
    if not tensor:
        return
    if serializer not in ("buffer_protocol", "torch_save"):
        raise ValueError(f"serializer {str(serializer)[:40]!r} is not one ckptd reads")
    nbytes = math.prod(_shape(entry)) * _ITEMSIZE[_dtype(entry)]
    if nbytes > MAX_FILE_BYTES:
        raise ValueError(f"shape {entry['shape']} declares {nbytes} bytes, more than any snapshot holds")
    if serializer == "buffer_protocol" and byte_range is not None and byte_range[1] - byte_range[0] != nbytes:
        raise ValueError(f"byte_range {byte_range} holds {byte_range[1] - byte_range[0]} bytes, shape needs {nbytes}")


def _check_chunk(chunk: Any, shape: list[int], dtype: str) -> None:
    if not isinstance(chunk, dict) or not isinstance(chunk.get("tensor"), dict):
        raise TypeError("a chunk is not {offsets, sizes, tensor}")
    offsets, sizes = chunk.get("offsets"), chunk.get("sizes")
    if not (isinstance(offsets, list) and isinstance(sizes, list) and len(offsets) == len(sizes) == len(shape)):
        raise TypeError("a chunk's offsets and sizes do not match the shape's dimensions")
    if not all(
        _is_int(o) and _is_int(s) and 0 <= o and 0 <= s and o + s <= d for o, s, d in zip(offsets, sizes, shape)
    ):
        raise ValueError(f"chunk at {offsets} of size {sizes} lies outside shape {shape}")
    _check_stored(chunk["tensor"], tensor=True)
    if _shape(chunk["tensor"]) != sizes or _dtype(chunk["tensor"]) != dtype:
        raise ValueError(f"chunk tensor is {chunk['tensor'].get('shape')}, sizes say {sizes}")


def _shape(entry: dict) -> list[int]:
    shape = entry.get("shape")
    if not (isinstance(shape, list) and len(shape) <= _MAX_DIMS and all(_is_int(d) and d >= 0 for d in shape)):
        raise TypeError(f"shape {str(shape)[:80]} is not a list of sizes")
    return shape


def _dtype(entry: dict) -> str:
    dtype = str(entry.get("dtype", "")).removeprefix("torch.")
    if dtype not in _ITEMSIZE:
        raise ValueError(f"dtype {dtype[:40]!r} is not one ckptd reads")
    return dtype


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def describe(path: str, rank: int = 0) -> dict[str, Any]:
    """Tensor tree and metadata of a torchsnapshot, without reading tensor data."""
    meta = read_metadata(path)
    tensors = []
    for key, entry in meta["manifest"].items():
        rank_str, _, name = key.partition("/")
        if rank_str != str(rank) or entry.get("type") not in _TENSORS:
            continue
        shape, dtype = _shape(entry), _dtype(entry)
        tensors.append(
            {
                "name": name.replace("/", "."),
                "group": name.split("/")[0],
                "shape": shape,
                "dtype": dtype,
                "nbytes": math.prod(shape) * _ITEMSIZE[dtype],
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


def read_state(path: str, rank: int = 0) -> dict[str, Any]:
    """The app state of one rank, rebuilt as nested dicts and lists of tensors and plain values."""
    meta = read_metadata(path)["manifest"]
    prefix = f"{rank}/"
    roots = [k for k in meta if k.startswith(prefix) and "/" not in k[len(prefix) :]]
    if not roots:
        raise NoSnapshot(f"{path} holds nothing of rank {rank}")
    return {k[len(prefix) :]: _build(path, meta, k, 0) for k in roots}


def _build(path: str, meta: dict, key: str, depth: int) -> Any:
    entry = meta.get(key)
    if entry is None:
        raise SnapshotCorrupt(f"{path}/{METADATA}: {key[:200]!r} is listed in its container but has no entry")
    if depth > _MAX_DEPTH:
        raise SnapshotCorrupt(f"{path}/{METADATA}: {key[:200]!r} is nested more than {_MAX_DEPTH} deep")
    kind = entry.get("type")
    if kind in _CONTAINERS:
        if kind == "list":
            n = sum(1 for k in meta if k.startswith(key + "/") and "/" not in k[len(key) + 1 :])
            return [_build(path, meta, f"{key}/{i}", depth + 1) for i in range(n)]
        return {k: _build(path, meta, f"{key}/{k}", depth + 1) for k in entry.get("keys", [])}
    if kind == "Tensor":
        return _tensor(path, entry, key)
    if kind == "ChunkedTensor":
        return _chunked(path, entry, key)
    if kind == "object":
        return _torch_load(path, entry, key)
    if kind in _PRIMITIVES:
        return _decode(kind, entry["serialized_value"])
    raise ConfigError(f"{key}: torchsnapshot entry type {kind!r} is not supported (sharded tensors are not)")


def _read(path: str, entry: dict, key: str) -> bytes:
    """The stored bytes of one checked entry: a regular file inside the snapshot, exactly its byte range."""
    location = entry["location"]
    start, end = entry.get("byte_range") or (0, None)
    try:
        with open_regular(os.path.join(path, *location.split("/"))) as f:
            size = os.fstat(f.fileno()).st_size
            end = size if end is None else end
            if end > size:
                raise SnapshotCorrupt(f"{key}: {location} holds {size} bytes, the manifest reads up to {end}")
            f.seek(start)
            return f.read(end - start)
    except FileNotFoundError as e:
        raise SnapshotCorrupt(f"{key}: {location} is missing from {path}") from e


def _tensor(path: str, entry: dict, key: str):
    import torch

    from ..snapshot.image import tensor_dtype

    data = _read(path, entry, key)
    dtype = tensor_dtype(_dtype(entry))
    if entry["serializer"] == "torch_save":
        from ..restore.load import place_chunk

        shape = tuple(entry["shape"])
        return place_chunk(
            None, _load(data, key), shape=shape, offsets=(0,) * len(shape), sizes=shape, dtype=dtype, what=key
        )
    need = math.prod(entry["shape"]) * _ITEMSIZE[_dtype(entry)]
    if len(data) != need:
        raise SnapshotCorrupt(
            f"{key}: {entry['location']} holds {len(data)} bytes, shape {entry['shape']} needs {need}"
        )
    if not data:
        return torch.empty(entry["shape"], dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).reshape(entry["shape"])


def _chunked(path: str, entry: dict, key: str):
    from ..restore.load import place_chunk
    from ..snapshot.image import tensor_dtype

    shape, dtype = tuple(entry["shape"]), tensor_dtype(_dtype(entry))
    full = None
    for chunk in entry["chunks"]:
        full = place_chunk(
            full,
            _tensor(path, chunk["tensor"], key),
            shape=shape,
            offsets=tuple(chunk["offsets"]),
            sizes=tuple(chunk["sizes"]),
            dtype=dtype,
            what=key,
        )
    if full is None:  # no chunks: the gate let this through only for a tensor of no elements
        import torch

        return torch.empty(shape, dtype=dtype)
    return full


def _torch_load(path: str, entry: dict, key: str) -> Any:
    if entry.get("serializer") != "torch_save":
        raise UnsafeSnapshot(f"{key}: object serialized with {entry.get('serializer')!r}; ckptd reads only torch_save")
    return _load(_read(path, entry, key), key)


def _load(data: bytes, key: str) -> Any:
    from ..restore.load import load_value

    return load_value(data, key)


def _decode(kind: str, raw: str) -> Any:
    if kind == "float":
        return struct.unpack("<d", base64.b64decode(raw, validate=True))[0]
    if kind == "int":
        return int(raw)
    if kind == "bool":
        return raw == "True"
    if kind == "bytes":
        return base64.b64decode(raw, validate=True)
    return str(raw)
