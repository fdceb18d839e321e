"""The manifest ``ckptd.json``: what a committed snapshot holds (no torch here).

It is written last, and a directory without it is not a snapshot. It lists
every file with size and checksum and every saved item with its place in
the DCP files, so ``inspect`` and the restricted reader never need DCP's
pickled ``.metadata``.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Any

from ..errors import IncompatibleSnapshot, SnapshotCorrupt, UnsafeSnapshot
from ..store.keys import check_key

FORMAT = "ckptd/1"
MANIFEST = "ckptd.json"
MAX_MANIFEST_BYTES = 256 << 20
MAX_FILE_BYTES = 1 << 46
"""No data file of a snapshot is larger (64 TiB): a manifest declaring more is damaged or hostile."""
ITEMSIZE = {
    "float64": 8,
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "complex128": 16,
    "complex64": 8,
    "complex32": 4,
    "int64": 8,
    "int32": 4,
    "int16": 2,
    "int8": 1,
    "uint64": 8,
    "uint32": 4,
    "uint16": 2,
    "uint8": 1,
    "bool": 1,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
}
"""Bytes per element of every dtype a snapshot may hold, by the name the manifest uses (no torch here)."""
_STEP_DIR = re.compile(r"^step-(\d{12})$")
_ATTEMPT = re.compile(r"^[0-9a-f]{8,32}$")
_PATH_KINDS = ("d", "l", "t")
KINDS = ("tensor", "process")
"""What a snapshot holds: the hook's tensors (the default, unnamed in the manifest) or a CRIU process image."""


def step_dir(step: int) -> str:
    """The directory (key prefix) of one snapshot: ``step-<12 digits>``."""
    if not isinstance(step, int) or not 0 <= step < 10**12:
        raise ValueError(f"step {step!r} must be an integer in [0, 10**12)")
    return f"step-{step:012d}"


def manifest_key(step: int) -> str:
    """The key of a snapshot's manifest: its existence is the commit."""
    return f"{step_dir(step)}/{MANIFEST}"


def attempt_prefix(step: int, attempt: str) -> str:
    """Where one write attempt of ``step`` keeps its files in an object store: ``step-N/a-<attempt>``.

    Every attempt has its own prefix, so a second writer of a step can never
    overwrite the files of a committed one; only the manifest is shared, and
    it is created exclusively.
    """
    return f"{step_dir(step)}/a-{check_attempt(attempt)}"


def check_attempt(attempt: str) -> str:
    """``attempt`` if it is a valid attempt id (8-32 lowercase hex digits), else ValueError."""
    if not isinstance(attempt, str) or not _ATTEMPT.match(attempt):
        raise ValueError(f"attempt id {attempt!r} is not 8-32 lowercase hex digits")
    return attempt


def parse_step_dir(name: str) -> int | None:
    """The step of a snapshot directory name, or None for any other name."""
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class FileEntry:
    """One data file of a snapshot."""

    name: str
    size: int
    checksum: str
    rank: int = 0


@dataclass(frozen=True)
class Item:
    """One saved value: a tensor chunk or a plain Python object (kind ``object``).

    ``path`` rebuilds the nesting: pairs of (container kind, key) where kind is
    ``d`` (dict, key str or int), ``l`` (list index) or ``t`` (tuple index).
    """

    fqn: str
    path: tuple[tuple[str, Any], ...]
    kind: str
    file: str
    offset: int
    length: int
    shape: tuple[int, ...] = ()
    dtype: str = ""
    nbytes: int = 0
    chunk_offsets: tuple[int, ...] = ()
    chunk_sizes: tuple[int, ...] = ()
    empty: str = ""
    """For kind ``empty``: the empty container (dict, list, tuple) DCP cannot hold."""
    data_offset: int = -1
    """For a tensor written from a file image: where its raw bytes start in ``file`` (-1: not known)."""


@dataclass(frozen=True)
class Manifest:
    """Everything ckptd needs to list, verify and load one snapshot."""

    step: int
    created: str
    world_size: int
    host: str
    checksum: str
    files: tuple[FileEntry, ...]
    items: tuple[Item, ...]
    metrics: dict[str, float] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    format: str = FORMAT
    attempt: str = ""
    """The write attempt that made it; in an object store its files live under ``a-<attempt>/``."""
    job: str = ""
    """The job that wrote it (the lease holder's job id)."""
    kind: str = "tensor"
    """``tensor`` (the hook's) or ``process`` (a CRIU image of ``ckptd run --transparent``); written only
    when not ``tensor``, so a tensor snapshot's manifest is what it always was."""

    @property
    def nbytes(self) -> int:
        return sum(f.size for f in self.files)

    def object_key(self, name: str) -> str:
        """The key of data file ``name`` in an object store (local tiers keep files flat in ``step-N/``)."""
        if self.attempt:
            return f"{attempt_prefix(self.step, self.attempt)}/{name}"
        return f"{step_dir(self.step)}/{name}"

    def files_of(self, rank: int) -> tuple[FileEntry, ...]:
        """The data files rank ``rank`` wrote."""
        return tuple(f for f in self.files if f.rank == rank)

    @property
    def created_at(self) -> datetime:
        return datetime.fromisoformat(self.created.replace("Z", "+00:00"))

    def to_json(self) -> bytes:
        body = asdict(self)
        if body["kind"] == "tensor":
            del body["kind"]
        return json.dumps({**body, "digest": _digest(body)}, separators=(",", ":"), allow_nan=False).encode()

    @staticmethod
    def from_json(data: bytes, *, source: str = "manifest") -> Manifest:
        """Parse and validate; any defect raises SnapshotCorrupt naming ``source``."""
        if len(data) > MAX_MANIFEST_BYTES:
            raise SnapshotCorrupt(f"{source} is {len(data)} bytes, larger than any real manifest")
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict):
                raise ValueError("top level is not an object")
            digest = raw.pop("digest", None)
            if digest != _digest(raw):
                raise SnapshotCorrupt(f"{source} does not match its digest: it was changed or damaged")
            return _parse(raw, source)
        except SnapshotCorrupt:
            raise
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise SnapshotCorrupt(f"{source} is not a valid ckptd manifest: {e}") from e


def require_kind(manifest: Manifest, kind: str, *, source: str) -> Manifest:
    """``manifest`` if it holds a snapshot of ``kind``, else IncompatibleSnapshot saying which tool reads it."""
    if manifest.kind == kind:
        return manifest
    if manifest.kind == "process":
        raise IncompatibleSnapshot(
            f"{source} is a process image of `ckptd run --transparent`, not a tensor snapshot: resume it with "
            "that same command, or give the hook a store of its own"
        )
    raise IncompatibleSnapshot(
        f"{source} is a tensor snapshot of the hook (ckptd.Checkpointer), not a process image: run that job "
        "under plain `ckptd run`, or give --transparent a store of its own"
    )


def _digest(body: dict) -> str:
    """SHA-256 of the manifest's canonical JSON, so a flipped byte anywhere is caught."""
    canon = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(canon.encode()).hexdigest()


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse(raw: dict, source: str) -> Manifest:
    if raw.get("format") != FORMAT:
        raise ValueError(f"format {raw.get('format')!r}, expected {FORMAT!r}; upgrade ckptd")
    files = tuple(_file(f) for f in raw["files"])
    names = {f.name for f in files}
    items = tuple(_item(i, names, source) for i in raw["items"])
    m = Manifest(
        step=_int(raw["step"], "step"),
        created=str(raw["created"]),
        world_size=_int(raw["world_size"], "world_size", low=1),
        host=str(raw["host"]),
        checksum=str(raw["checksum"]),
        files=files,
        items=items,
        metrics={str(k): float(v) for k, v in dict(raw.get("metrics", {})).items()},
        meta=dict(raw.get("meta", {})),
        attempt=check_attempt(raw["attempt"]) if raw.get("attempt", "") != "" else "",
        job=_short_str(raw.get("job", ""), "job"),
        kind=raw.get("kind", "tensor"),
    )
    if m.kind not in KINDS:
        raise ValueError(f"kind {m.kind!r}, expected one of {KINDS}; upgrade ckptd")
    if m.kind == "process" and items:
        raise ValueError("a process image lists no items")
    if any(f.rank >= m.world_size for f in files):
        raise ValueError(f"a file names a rank >= world_size {m.world_size}")
    for item in items:
        if item.kind == "tensor" and item.nbytes > m.nbytes:
            raise ValueError(f"tensor {item.fqn!r} declares {item.nbytes} bytes, more than the snapshot's {m.nbytes}")
    _ = m.created_at  # validates the timestamp
    return m


def _file(f: dict) -> FileEntry:
    name = f["name"]
    if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
        raise UnsafeSnapshot(f"manifest names file {name!r} outside its snapshot directory")
    check_key(name)
    size = _int(f["size"], "size")
    if size > MAX_FILE_BYTES:
        raise ValueError(f"file {name!r} declares {size} bytes, more than any snapshot file ({MAX_FILE_BYTES})")
    return FileEntry(name, size, str(f["checksum"]), _int(f.get("rank", 0), "rank"))


def _item(i: dict, files: set[str], source: str) -> Item:
    if i["kind"] not in ("tensor", "object", "empty"):
        raise ValueError(f"item kind {i['kind']!r}")
    if i["kind"] == "empty" and i.get("empty") not in ("dict", "list", "tuple"):
        raise ValueError(f"empty item {i.get('fqn')!r} of type {i.get('empty')!r}")
    if i["kind"] != "empty" and i["file"] not in files:
        raise UnsafeSnapshot(f"{source}: item {i.get('fqn')!r} reads {i['file']!r}, not a file of the snapshot")
    path = tuple(_path_part(p) for p in i["path"])
    if not path or path[0][0] != "d" or not isinstance(path[0][1], str):
        raise ValueError(f"item {i.get('fqn')!r} has no top-level key")
    item = Item(
        fqn=str(i["fqn"]),
        path=path,
        kind=i["kind"],
        file=i["file"],
        offset=_int(i["offset"], "offset"),
        length=_int(i["length"], "length"),
        shape=tuple(_int(s, "shape") for s in i.get("shape", ())),
        dtype=str(i.get("dtype", "")),
        nbytes=_int(i.get("nbytes", 0), "nbytes"),
        chunk_offsets=tuple(_int(s, "chunk_offsets") for s in i.get("chunk_offsets", ())),
        chunk_sizes=tuple(_int(s, "chunk_sizes") for s in i.get("chunk_sizes", ())),
        empty=str(i.get("empty", "")),
        data_offset=_int(i.get("data_offset", -1), "data_offset", low=-1),
    )
    if item.kind == "tensor":
        _check_tensor(item)
    return item


def _check_tensor(item: Item) -> None:
    """A tensor item's shape, chunk, dtype and sizes agree, so nothing absurd is ever allocated."""
    if item.dtype not in ITEMSIZE:
        raise ValueError(f"tensor {item.fqn!r} has dtype {item.dtype!r}, not one ckptd reads")
    dims = len(item.shape)
    if len(item.chunk_offsets) != dims or len(item.chunk_sizes) != dims:
        raise ValueError(f"tensor {item.fqn!r}: its chunk has another number of dimensions than its shape")
    if any(o + n > d for o, n, d in zip(item.chunk_offsets, item.chunk_sizes, item.shape)):
        raise ValueError(f"tensor {item.fqn!r}: its chunk lies outside its shape {item.shape}")
    size = ITEMSIZE[item.dtype]
    if _numel(item.shape) * size != item.nbytes:
        raise ValueError(f"tensor {item.fqn!r}: shape {item.shape} of {item.dtype} is not its {item.nbytes} bytes")
    if _numel(item.chunk_sizes) * size > item.length:
        raise ValueError(f"tensor {item.fqn!r}: its chunk needs more bytes than its record's {item.length}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _path_part(p) -> tuple[str, Any]:
    kind, key = p
    if kind not in _PATH_KINDS:
        raise ValueError(f"path kind {kind!r}")
    if kind == "d" and not isinstance(key, (str, int)) or kind != "d" and not isinstance(key, int):
        raise ValueError(f"path key {key!r} for kind {kind!r}")
    if isinstance(key, bool) or (isinstance(key, int) and kind != "d" and not 0 <= key < 1 << 31):
        raise ValueError(f"path key {key!r}")
    return (kind, key)


def _short_str(v, name: str, limit: int = 256) -> str:
    if not isinstance(v, str) or len(v) > limit:
        raise ValueError(f"{name} must be a string of at most {limit} characters")
    return v


def _int(v, name: str, low: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{name} {v!r} is not an integer >= {low}")
    return v
