"""Checksums of snapshot files: CRC32C where awscrt is present, else CRC32.

The algorithm's name is stored in the manifest beside each value, so a
reader on a machine without awscrt still verifies a CRC32 snapshot and says
clearly when it cannot verify a CRC32C one.
"""

from __future__ import annotations

import mmap
import zlib
from collections.abc import Callable

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
        self._value = self._fn(data, self._value)  # type: ignore[arg-type]  # zlib and awscrt take any buffer

    def hexdigest(self) -> str:
        return f"{self._value & 0xFFFFFFFF:08x}"


def file_checksum(path: str, algo: str = DEFAULT_ALGO) -> tuple[str, int]:
    """Return (hex checksum, size) of a file, read through a page-aligned buffer."""
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
