"""Verify a snapshot directory against its manifest: sizes, checksums, item bounds."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import CkptdError
from ..snapshot.manifest import Manifest, step_dir
from ..store.checksum import file_checksum
from ..store.file import file_kind

_scope = threading.local()


@contextmanager
def checksums_on_load() -> Iterator[None]:
    """In this block (this thread) a committed local snapshot's data files are verified by size only: the load
    that follows checksums each in its one read (``restore/load.py``). Downloads are still checked in full."""
    outer = getattr(_scope, "on", False)
    _scope.on = True
    try:
        yield
    finally:
        _scope.on = outer


def _left_to_load(directory: str, manifest: Manifest) -> set[str]:
    """The files whose checksums the load computes: those items read, in a committed ``step-N`` directory."""
    if not getattr(_scope, "on", False) or os.path.basename(os.path.normpath(directory)) != step_dir(manifest.step):
        return set()
    return {item.file for item in manifest.items if item.kind != "empty"}


def verify_dir(directory: str, manifest: Manifest) -> list[str]:
    """Problems found, one line each; an empty list means the snapshot verifies."""
    problems = []
    sizes = {}
    deferred = _left_to_load(directory, manifest)
    for f in manifest.files:
        path = os.path.join(directory, f.name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            problems.append(f"{f.name}: missing")
            continue
        except OSError as e:
            problems.append(f"{f.name}: cannot be read: {e.strerror or e}")
            continue
        if not stat.S_ISREG(st.st_mode):
            problems.append(f"{f.name}: {file_kind(st.st_mode)}, not a regular file")
            continue
        size = sizes[f.name] = st.st_size
        if size != f.size:
            problems.append(f"{f.name}: {size} bytes, manifest says {f.size}")
            continue
        if f.name in deferred:
            continue
        try:
            value, _ = file_checksum(path, manifest.checksum)
        except (CkptdError, OSError) as e:
            problems.append(f"{f.name}: cannot verify: {e}")
            continue
        if value != f.checksum:
            problems.append(f"{f.name}: {manifest.checksum} {value}, manifest says {f.checksum}")
    return problems + check_items(manifest, sizes)


def check_items(manifest: Manifest, sizes: dict[str, int]) -> list[str]:
    """Items whose bytes lie outside their file (``sizes``: file name → real size); the one bounds check
    that verify, restore and download share."""
    return [
        f"{item.fqn}: bytes {item.offset}+{item.length} lie past the end of {item.file}"
        for item in manifest.items
        if item.kind != "empty" and item.file in sizes and item.offset + item.length > sizes[item.file]
    ]
