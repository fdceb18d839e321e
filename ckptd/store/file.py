"""A store on a local or shared file system: the embedded default and the local tier."""

from __future__ import annotations

import builtins
import ctypes
import errno
import io
import os
import shutil
import stat
import tempfile
import uuid
from collections.abc import Sequence
from typing import Any, BinaryIO

from ..errors import SnapshotExists, StoreError, StoreUnreachable, UnsafeSnapshot
from .base import ObjectInfo, Progress
from .keys import check_key

_COPY_CHUNK = 8 << 20


def fsync_dir(path: str) -> None:
    """Make a rename or create inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
try:
    _renameat2: Any = ctypes.CDLL(None, use_errno=True).renameat2
except (AttributeError, OSError):  # pragma: no cover - glibc < 2.28
    _renameat2 = None


def rename_noreplace(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``; FileExistsError if ``dst`` exists, never replacing it.

    renameat2(RENAME_NOREPLACE) makes it atomic; where the file system refuses
    the flag, a check-then-rename is the fallback (racy only against another
    writer of the same name in the same instant).
    """
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST or err == errno.ENOTEMPTY:
            raise FileExistsError(err, os.strerror(err), dst)
        if err not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(err, os.strerror(err), src)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


def open_regular(path: str) -> io.BufferedReader:
    """Open a file of a store for reading; UnsafeSnapshot unless it is a regular file.

    A store is hostile ground: ``O_NOFOLLOW`` refuses a symlink (or a loop of
    them) and ``O_NONBLOCK`` keeps a FIFO from blocking the open forever.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeSnapshot(
                f"{path} is a symbolic link; ckptd reads only regular files from a store, "
                "so replace it with the file itself"
            ) from e
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise UnsafeSnapshot(f"{path} is {file_kind(mode)}, not a regular file; remove it")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def file_kind(mode: int) -> str:
    """What a non-regular file is, in words."""
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


class FileStore:
    """Objects as files under one directory; keys map to relative paths.

    ``commit`` is an exclusive create (write a temporary file, fsync, then
    ``os.link``, which fails if the name exists). Thread-safe.
    """

    def __init__(self, root: str, *, create: bool = True) -> None:
        self.root = os.path.abspath(os.path.expanduser(root))
        self.uri = "file://" + self.root
        if create:
            self._check_writable()
        elif not os.path.isdir(self.root):
            raise StoreUnreachable(f"store {self.root!r} does not exist; check the path or create it")

    def _check_writable(self) -> None:
        try:
            os.makedirs(self.root, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=self.root, prefix=".ckptd-probe-"):
                pass
        except OSError as e:
            raise StoreUnreachable(
                f"cannot write to store {self.root!r}: {e.strerror or e}; "
                "choose a writable directory or fix its permissions"
            ) from e

    def path_of(self, key: str) -> str:
        """The local path of ``key``; the key is validated against traversal."""
        return os.path.join(self.root, *check_key(key).split("/"))

    def put_file(self, key: str, path: str, *, progress: Progress | None = None) -> None:
        dest = self.path_of(key)
        if os.path.abspath(path) == dest:
            return
        self._atomic_write(dest, lambda f: _copy_into(path, f, progress))

    def put_bytes(self, key: str, data: bytes) -> None:
        self._atomic_write(self.path_of(key), lambda f: f.write(data))

    def commit(self, key: str, data: bytes) -> None:
        dest = self.path_of(key)
        tmp = self._write_temp(dest, lambda f: f.write(data))
        try:
            os.link(tmp, dest)
        except FileExistsError as e:
            raise SnapshotExists(
                f"{self.uri}/{key} is already committed by another writer; "
                "a step is committed once, so this copy was discarded"
            ) from e
        finally:
            os.unlink(tmp)
        fsync_dir(os.path.dirname(dest))

    def get_bytes(self, key: str) -> bytes:
        with self._open(key) as f:
            return f.read()

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        with self._open(key) as f:
            f.seek(offset)
            return f.read(length)

    def get_file(self, key: str, path: str, *, progress: Progress | None = None) -> None:
        src = self.path_of(key)
        if os.path.abspath(path) == src:
            return
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open_regular(src) as s, open(path, "wb") as f:
            _copy(s, f, progress)

    def exists(self, key: str) -> bool:
        """True if anything is at ``key``: a FIFO or a directory there is a defect for the reader, not absence."""
        return os.path.lexists(self.path_of(key))

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        base = self.path_of(prefix) if prefix else self.root
        out = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                full = os.path.join(dirpath, name)
                try:
                    st = os.lstat(full)  # a symlink is listed as itself; reading it is refused
                except FileNotFoundError:
                    continue
                rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                out.append(ObjectInfo(rel, st.st_size, st.st_mtime))
        return sorted(out, key=lambda o: o.key)

    def children(self, prefix: str = "") -> builtins.list[str]:
        base = self.path_of(prefix) if prefix else self.root
        try:
            return sorted(e.name for e in os.scandir(base) if e.is_dir(follow_symlinks=False))
        except FileNotFoundError:
            return []

    def delete(self, keys: Sequence[str]) -> None:
        for key in keys:
            try:
                os.unlink(self.path_of(key))
            except FileNotFoundError:
                pass

    def delete_prefix(self, prefix: str) -> None:
        """Remove everything under ``prefix`` (a snapshot directory)."""
        shutil.rmtree(self.path_of(prefix), ignore_errors=True)

    def close(self) -> None:
        pass

    def _open(self, key: str) -> BinaryIO:
        try:
            return open_regular(self.path_of(key))
        except FileNotFoundError as e:
            raise StoreError(f"{self.uri}/{key} does not exist") from e
        except OSError as e:
            raise StoreError(f"cannot read {self.uri}/{key}: {e.strerror or e}") from e

    def _write_temp(self, dest: str, write) -> str:
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        tmp = f"{dest}.tmp-{uuid.uuid4().hex[:12]}"
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            _unlink_quietly(tmp)
            hint = "free space on it" if e.errno == errno.ENOSPC else "check the path"
            raise StoreError(f"cannot write {dest}: {e.strerror or e}; {hint}") from e
        return tmp

    def _atomic_write(self, dest: str, write) -> None:
        tmp = self._write_temp(dest, write)
        os.replace(tmp, dest)
        fsync_dir(os.path.dirname(dest))


def _copy_into(src: str, f, progress: Progress | None) -> None:
    with open_regular(src) as s:
        _copy(s, f, progress)


def _copy(src: BinaryIO, f, progress: Progress | None) -> None:
    while chunk := src.read(_COPY_CHUNK):
        f.write(chunk)
        if progress is not None:
            progress(len(chunk))


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
