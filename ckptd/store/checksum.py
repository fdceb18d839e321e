"""Checksums of snapshot files: CRC32C where awscrt is present, else CRC32.

The algorithm's name is stored in the manifest beside each value, so a
reader on a machine without awscrt still verifies a CRC32 snapshot and says
clearly when it cannot verify a CRC32C one.
"""

from __future__ import annotations

import mmap
import os
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Iterator

from ..errors import ConfigError
from .file import open_regular

_CHUNK = 8 << 20

try:  # awscrt comes with boto3[crt]; it is about twice as fast as zlib here.
    from awscrt.checksums import crc32c as _crc32c
except ImportError:  # pragma: no cover - depends on the installation
    _crc32c = None

_ALGOS: dict[str, Callable[[bytes, int], int]] = {"crc32": lambda b, c: zlib.crc32(b, c)}
if _crc32c is not None:
    _ALGOS["crc32c"] = lambda b, c: _crc32c(b, c)

DEFAULT_ALGO = "crc32c" if "crc32c" in _ALGOS else "crc32"


class Checksum:
    """A running checksum over bytes fed in order; ``hexdigest()`` gives 8 hex digits."""

    def __init__(self, algo: str = DEFAULT_ALGO) -> None:
        if algo not in _ALGOS:
            raise ConfigError(
                f"checksum algorithm {algo!r} is not available here; "
                f"install boto3[crt] (awscrt) for crc32c, or use one of {sorted(_ALGOS)}"
            )
        self.algo = algo
        self._fn = _ALGOS[algo]
        self._value = 0

    def update(self, data: bytes | memoryview) -> None:
        self._value = self._fn(data, self._value)

    def hexdigest(self) -> str:
        return f"{self._value & 0xFFFFFFFF:08x}"


def file_checksum(path: str, algo: str = DEFAULT_ALGO) -> tuple[str, int]:
    """Return (hex checksum, size) of a file, read through a page-aligned buffer.

    Inside a ``keep_reads()`` block the whole file is read into memory and
    kept for one ``take_kept(path)``, so a restore verifies and loads a file
    with one read.
    """
    kept = getattr(_scope, "kept", None)
    if kept is not None:
        buf, value, size = read_checksummed(path, algo)
        where = os.path.dirname(path)
        for other in [k for k in kept if os.path.dirname(k) != where]:
            del kept[other]  # only one snapshot's files are ever held
        kept[path] = (_identity(path), buf)
        return value, size
    cs = Checksum(algo)
    buf = mmap.mmap(-1, _CHUNK)
    view = memoryview(buf)
    size = 0
    try:
        with open_regular(path) as f:
            while n := f.readinto(view):
                cs.update(view[:n])
                size += n
    finally:
        view.release()
        buf.close()
    return cs.hexdigest(), size


def read_checksummed(path: str, algo: str = DEFAULT_ALGO) -> tuple[mmap.mmap, str, int]:
    """The whole file in a page-aligned buffer, its checksum computed in the same pass, and its size.

    Large sequential reads on one thread overlap the checksum of the previous
    chunk on the caller's (both release the GIL).
    """
    cs = Checksum(algo)
    with open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        buf = mmap.mmap(-1, max(size, 1), flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0))
        view = memoryview(buf)
        try:
            with ThreadPoolExecutor(1, thread_name_prefix="ckptd-read") as reader:
                starts = range(0, size, _READ_CHUNK)
                ahead = reader.submit(_fill, f, view, 0, size) if size else None
                for start in starts:
                    n = ahead.result()
                    if n < min(_READ_CHUNK, size - start):
                        raise OSError(f"{path} shrank while it was read")
                    nxt = start + _READ_CHUNK
                    ahead = reader.submit(_fill, f, view, nxt, size) if nxt < size else None
                    cs.update(view[start:start + n])
            if os.pread(f.fileno(), 1, size):
                raise OSError(f"{path} grew while it was read")
        finally:
            view.release()
    return buf, cs.hexdigest(), size


_READ_CHUNK = 16 << 20


def _fill(f, view: memoryview, start: int, size: int) -> int:
    """Read the chunk at ``start`` into ``view``; the number of bytes read."""
    end = min(start + _READ_CHUNK, size)
    done = start
    while done < end:
        n = os.preadv(f.fileno(), [view[done:end]], done)
        if n == 0:
            break
        done += n
    return done - start


_scope = threading.local()


@contextmanager
def keep_reads() -> Iterator[None]:
    """Files checksummed in this block (on this thread) keep their bytes for one ``take_kept``."""
    outer = getattr(_scope, "kept", None)
    _scope.kept = {} if outer is None else outer
    try:
        yield
    finally:
        if outer is None:
            _scope.kept = None


def take_kept(path: str) -> mmap.mmap | None:
    """The bytes of ``path`` as verified in the enclosing ``keep_reads()`` block, if it has not changed since."""
    kept = getattr(_scope, "kept", None)
    if not kept or path not in kept:
        return None
    ident, buf = kept.pop(path)
    try:
        same = _identity(path) == ident
    except OSError:
        same = False
    return buf if same else None


def _identity(path: str) -> tuple[int, int, int, int]:
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
