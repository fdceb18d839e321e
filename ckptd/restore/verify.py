"""Verify a snapshot directory against its manifest: sizes, checksums, item bounds."""

from __future__ import annotations

import os

from ..errors import ConfigError
from ..snapshot.manifest import Manifest
from ..store.checksum import file_checksum


def verify_dir(directory: str, manifest: Manifest) -> list[str]:
    """Problems found, one line each; an empty list means the snapshot verifies."""
    problems = []
    sizes = {}
    for f in manifest.files:
        path = os.path.join(directory, f.name)
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            problems.append(f"{f.name}: missing")
            continue
        sizes[f.name] = size
        if size != f.size:
            problems.append(f"{f.name}: {size} bytes, manifest says {f.size}")
            continue
        try:
            value, _ = file_checksum(path, manifest.checksum)
        except ConfigError as e:
            problems.append(f"{f.name}: cannot verify: {e}")
            continue
        if value != f.checksum:
            problems.append(f"{f.name}: {manifest.checksum} {value}, manifest says {f.checksum}")
    for item in manifest.items:
        if item.kind != "empty" and item.file in sizes and item.offset + item.length > sizes[item.file]:
            problems.append(f"{item.fqn}: bytes {item.offset}+{item.length} lie past the end of {item.file}")
    return problems
