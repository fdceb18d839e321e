"""Stores behind one small interface: a file system path and S3 (no torch here)."""

from __future__ import annotations

from ..errors import ConfigError
from .base import ObjectInfo, Store
from .file import FileStore

__all__ = ["ObjectInfo", "Store", "FileStore", "open_store"]

_SCHEMES = "a path, file:///abs/path or s3://bucket/prefix"


def open_store(uri: str, *, create: bool = True) -> Store:
    """Open the store a URI names: a bare path, ``file://`` or ``s3://``."""
    if not isinstance(uri, str) or not uri.strip():
        raise ConfigError(f"store {uri!r} is empty; give {_SCHEMES}")
    if uri.startswith("s3://"):
        from .s3 import S3Store

        return S3Store.from_uri(uri, create=create)
    if uri.startswith("file://"):
        path = uri[len("file://") :]
        if not path.startswith("/"):
            raise ConfigError(f"store {uri!r}: file:// URIs need an absolute path (file:///abs/path)")
        return FileStore(path, create=create)
    if "://" in uri:
        scheme = uri.split("://", 1)[0]
        raise ConfigError(f"store {uri!r}: unknown scheme {scheme!r}; give {_SCHEMES}")
    return FileStore(uri, create=create)
