"""The store interface: a flat space of byte objects under one URI.

Keys and URIs are plain ``str``, never ``pathlib.Path``: ``Path("s3://b/k")``
collapses the ``//`` and a key is not a local path on every backend.
"""

from __future__ import annotations

import builtins
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

Progress = Callable[[int], None]
"""Called with the number of bytes just transferred."""


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key, size in bytes and modification time (Unix s)."""

    key: str
    size: int
    mtime: float


@runtime_checkable
class Store(Protocol):
    """A flat key space of byte objects; a snapshot is the keys under one prefix.

    The call sequence a writer relies on:

    1. ``put_file`` / ``put_bytes`` every data file of a snapshot, in any
       order and from several threads.
    2. ``commit(manifest_key, data)`` last: an exclusive create that raises
       :class:`~ckptd.errors.SnapshotExists` if the key exists, so two writers
       cannot both commit one step.

    Readers call ``children`` / ``list`` to find snapshots, then ``get_*``.
    ``delete`` removes keys and ignores those already gone. Implementations
    are thread-safe.
    """

    uri: str

    def put_file(self, key: str, path: str, *, progress: Progress | None = None) -> None: ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def commit(self, key: str, data: bytes) -> None: ...

    def get_bytes(self, key: str) -> bytes: ...

    def get_range(self, key: str, offset: int, length: int) -> bytes: ...

    def get_file(self, key: str, path: str, *, progress: Progress | None = None) -> None: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> list[ObjectInfo]: ...

    def children(self, prefix: str = "") -> builtins.list[str]: ...

    def delete(self, keys: Sequence[str]) -> None: ...

    def close(self) -> None: ...
