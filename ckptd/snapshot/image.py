"""The file image: a rank's DCP data file laid out in memory, so staging copies land where they are written from.

Each tensor is a ``torch.save`` record (a stored zip), as DCP's own writer
makes it, so ``dcp.load`` and ``torch.load`` read every item's byte range.
The record's bytes before and after the tensor data depend only on shape
and dtype: they are made once per (shape, dtype) by one ``torch.save`` whose
data write is discarded, and copied into the image when the pool is laid
out. Per snapshot only the zip CRC of each tensor's data changes; the writer
fills it in the same pass that checksums the file (``RecordCrc``).
Non-tensor values (scheduler, extra state) are small ``torch.save`` records
appended after the tensors at every snapshot.
"""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

ALIGN = 4096
"""O_DIRECT's unit: the pool, the file's chunks and large tensors' data start on it."""
_SMALL = 1 << 20
_SMALL_ALIGN = 64
_DATA_NAME = "/data/0"


def align_up(n: int, to: int = ALIGN) -> int:
    return (n + to - 1) // to * to


@dataclass(frozen=True)
class RecordTemplate:
    """The bytes around one tensor's data in its ``torch.save`` record, and where its zip CRC goes."""

    prefix: bytes
    suffix: bytes
    nbytes: int
    crc_at: tuple[int, ...]
    """Offsets in ``suffix`` of the data entry's CRC-32 (data descriptor, central directory)."""

    @property
    def length(self) -> int:
        return len(self.prefix) + self.nbytes + len(self.suffix)


class _Sink:
    """A write-only file for torch.save that keeps the small writes and only counts the large ones."""

    def __init__(self, skip: int) -> None:
        self.skip = skip
        self.parts: list[tuple[int, bytes | None, int]] = []
        self.pos = 0

    def write(self, data) -> int:
        view = memoryview(data)
        n = view.nbytes
        self.parts.append((self.pos, None if n == self.skip and n > 64 else bytes(view), n))
        self.pos += n
        return n

    def flush(self) -> None:
        pass


class _Sparse(io.RawIOBase):
    """The record torch.save wrote, read back with the skipped data as zeros (for zipfile)."""

    def __init__(self, sink: _Sink) -> None:
        self._parts, self._size, self._pos = sink.parts, sink.pos, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        self._pos = {0: pos, 1: self._pos + pos, 2: self._size + pos}[whence]
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, b) -> int:
        out = memoryview(b).cast("B")
        n = max(0, min(len(out), self._size - self._pos))
        out[:n] = b"\0" * n
        for off, data, size in self._parts:
            lo, hi = max(off, self._pos), min(off + size, self._pos + n)
            if data is not None and lo < hi:
                out[lo - self._pos : hi - self._pos] = data[lo - off : hi - off]
        self._pos += n
        return n


def make_template(shape: Sequence[int], dtype: torch.dtype) -> RecordTemplate:
    """The record of a contiguous tensor of ``shape`` and ``dtype``, data left out."""
    like = torch.empty(tuple(shape), dtype=dtype)
    nbytes = like.nbytes
    sink = _Sink(nbytes)
    torch.save(like, sink)  # type: ignore[arg-type]  # _Sink has the file methods torch.save calls
    with zipfile.ZipFile(_Sparse(sink)) as z:
        info = next(i for i in z.infolist() if i.filename.endswith(_DATA_NAME))
    raw = _Sparse(sink)
    local = bytearray(30)
    raw.seek(info.header_offset)
    raw.readinto(local)
    name_len, extra_len = struct.unpack_from("<HH", local, 26)
    start = info.header_offset + 30 + name_len + extra_len
    prefix = _read(raw, 0, start)
    suffix = _read(raw, start + nbytes, sink.pos - start - nbytes)
    crc = struct.pack("<I", info.CRC)
    entry = max(0, suffix.find(b"PK\x01\x02"))  # the central directory starts here
    at = [4] if suffix[:4] == b"PK\x07\x08" and suffix[4:8] == crc else []
    name = info.filename.encode()
    pos = suffix.find(name, entry)
    while pos >= 0:
        head = pos - 46
        if head >= 0 and suffix[head : head + 4] == b"PK\x01\x02" and suffix[head + 16 : head + 20] == crc:
            at.append(head + 16)
            break
        pos = suffix.find(name, pos + 1)
    if nbytes == 0:
        at = []  # an empty entry's CRC is 0 whatever the snapshot holds
    elif len(at) != 2:
        raise RuntimeError(f"torch.save wrote a record ckptd cannot lay out (shape {tuple(shape)}, {dtype})")
    return RecordTemplate(prefix, suffix, nbytes, tuple(at))


def _read(raw: _Sparse, offset: int, n: int) -> bytes:
    buf = bytearray(n)
    raw.seek(offset)
    raw.readinto(buf)
    return bytes(buf)


@dataclass(frozen=True)
class Placed:
    """One tensor's record in the image: record at ``offset``, raw data at ``data``."""

    fqn: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int
    data: int
    template: RecordTemplate

    @property
    def length(self) -> int:
        return self.template.length

    @property
    def nbytes(self) -> int:
        return self.template.nbytes


@dataclass
class Layout:
    """Where each tensor's record sits in one file image; ``size`` is the tensor region, 4 KiB-aligned."""

    placed: list[Placed]
    size: int
    by_fqn: dict[str, Placed] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.by_fqn = {p.fqn: p for p in self.placed}


class Templates:
    """Record templates, made once per (shape, dtype) and kept. Not thread-safe."""

    def __init__(self) -> None:
        self._made: dict[tuple, RecordTemplate] = {}

    def get(self, shape: Sequence[int], dtype: torch.dtype) -> RecordTemplate:
        key = (tuple(shape), dtype)
        if key not in self._made:
            self._made[key] = make_template(shape, dtype)
        return self._made[key]


def plan(specs: Sequence[tuple[str, Sequence[int], torch.dtype]], templates: Templates) -> Layout:
    """Lay out the records of ``specs`` (fqn, shape, dtype) in order; large tensors' data on 4 KiB."""
    placed, cursor = [], 0
    for fqn, shape, dtype in specs:
        t = templates.get(shape, dtype)
        align = ALIGN if t.nbytes >= _SMALL else _SMALL_ALIGN
        data = align_up(cursor + len(t.prefix), align)
        placed.append(Placed(fqn, tuple(shape), dtype, data - len(t.prefix), data, t))
        cursor = data + t.nbytes + len(t.suffix)
    return Layout(placed, align_up(cursor))


def fill_headers(image: memoryview, layout: Layout) -> None:
    """Write every record's constant bytes into the image (once, when the pool is laid out)."""
    for p in layout.placed:
        image[p.offset : p.data] = p.template.prefix
        end = p.data + p.nbytes
        image[end : end + len(p.template.suffix)] = p.template.suffix


def object_record(value) -> bytes:
    """A non-tensor value as DCP writes it: the bytes of ``torch.save(value)``."""
    buf = io.BytesIO()
    torch.save(value, buf)
    return buf.getvalue()


# -- the read side: what a record's header says, checked against the manifest at restore --

_LOCAL = b"PK\x03\x04"


@dataclass(frozen=True)
class RecordHeader:
    """What a tensor's ``torch.save`` record says about it, read from the bytes before its data."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    """Bytes of the storage the record holds."""


def read_header(prefix: bytes | memoryview, cache: dict | None = None) -> RecordHeader:
    """The dtype and shape a record's ``data.pkl`` declares, and check that its data entry ends ``prefix``.

    ValueError when the bytes are not a tensor record laid out as the image writes it. ``data.pkl`` is read
    with torch's weights-only unpickler over a storage on the meta device, so no data is touched and nothing
    but tensors is accepted; ``cache`` (prefix bytes → header) makes repeated shapes free.
    """
    prefix = bytes(prefix)
    if cache is not None and prefix in cache:
        return cache[prefix]
    if len(prefix) < 30 or prefix[:4] != _LOCAL:
        raise ValueError("no zip entry at the record's start")
    name_len, extra_len = struct.unpack_from("<HH", prefix, 26)
    first = prefix[30 : 30 + name_len]
    if not first.endswith(b"/data.pkl"):
        raise ValueError(f"the record's first entry is {first[:64]!r}, not data.pkl")
    last = prefix.rfind(_LOCAL)
    if last <= 0 or len(prefix) - last < 30:
        raise ValueError("no data entry before the tensor's data")
    d_name, d_extra = struct.unpack_from("<HH", prefix, last + 26)
    data_name = prefix[last + 30 : last + 30 + d_name]
    if data_name != first[: -len(b"data.pkl")] + b"data/0" or last + 30 + d_name + d_extra != len(prefix):
        raise ValueError("the tensor's data does not start where its record's data entry does")
    header = _unpickle_header(prefix[30 + name_len + extra_len : last])
    if cache is not None:
        cache[prefix] = header
    return header


def _unpickle_header(pickled: bytes) -> RecordHeader:
    from torch import _weights_only_unpickler

    storages: list[tuple[torch.dtype, int]] = []

    def persistent_load(saved_id):
        kind, storage_type, key, _location, numel = saved_id
        if kind != "storage" or str(key) != "0" or storages:
            raise ValueError(f"unexpected storage {saved_id!r}")
        dtype = torch.uint8 if storage_type is torch.UntypedStorage else storage_type.dtype
        storages.append((dtype, int(numel)))
        meta = torch.UntypedStorage(int(numel) * dtype.itemsize, device="meta")
        return torch.storage.TypedStorage(wrap_storage=meta, dtype=dtype, _internal=True)

    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(pickled), encoding="utf-8")
    unpickler.persistent_load = persistent_load  # type: ignore[method-assign]  # pickle's documented hook
    try:
        value = unpickler.load()
    except Exception as e:  # the weights-only unpickler raises many kinds for hostile bytes
        raise ValueError(f"its data.pkl does not load as a tensor ({str(e).splitlines()[0][:120]})") from e
    if not isinstance(value, torch.Tensor) or not storages:
        raise ValueError(f"its data.pkl holds a {type(value).__name__}, not a tensor")
    if value.storage_offset() != 0 or not value.is_contiguous():
        raise ValueError("its tensor is not the whole of its storage, contiguous")
    dtype, numel = storages[0]
    return RecordHeader(value.dtype, tuple(value.shape), numel * dtype.itemsize)


def tensor_dtype(name: str) -> torch.dtype:
    """The torch dtype a manifest names; ValueError for anything else."""
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"{name!r} is not a torch dtype")
    return dtype
