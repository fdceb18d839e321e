"""Validation of object keys, so no key can leave its store or snapshot."""

from __future__ import annotations

from ..errors import UnsafeSnapshot

_MAX_KEY = 1024


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe relative key, else raise UnsafeSnapshot.

    A safe key is non-empty, relative, ``/``-separated, has no ``.``/``..``
    or empty segment, no backslash or NUL, and does not end in ``/``.
    """
    if not isinstance(key, str) or not key:
        raise UnsafeSnapshot(f"invalid key {key!r}: keys are non-empty strings")
    if len(key.encode()) > _MAX_KEY:
        raise UnsafeSnapshot(f"invalid key {key[:60]!r}...: longer than {_MAX_KEY} bytes")
    if "\\" in key or "\x00" in key or key.startswith("/") or key.endswith("/"):
        raise UnsafeSnapshot(f"invalid key {key!r}: keys are relative, '/'-separated, without backslash or NUL")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise UnsafeSnapshot(f"invalid key {key!r}: '.', '..' and empty segments are not allowed")
    return key


def join(*parts: str) -> str:
    """Join key parts with ``/``, skipping empty ones, and validate the result."""
    return check_key("/".join(p.strip("/") for p in parts if p and p.strip("/")))
