"""ckptd: asynchronous training snapshots, object storage, health-aware policy, restore.

``import ckptd`` stays light: names that need torch load on first use, so
the CLI lists and inspects snapshots without importing torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .config import CheckpointerConfig
from .errors import (
    CkptdError,
    ConfigError,
    CriuFailed,
    DaemonUnavailable,
    IncompatibleSnapshot,
    InsufficientMemory,
    LeaseLost,
    LedgerCorrupt,
    NoGoodSnapshot,
    NoSnapshot,
    ProtocolError,
    SnapshotCorrupt,
    SnapshotError,
    SnapshotExists,
    StoreError,
    StoreInUse,
    StoreUnreachable,
    TransparentRefused,
    UnsafeSnapshot,
)
from .preempt import EXIT_PREEMPTED
from .restore.find import SnapshotInfo, list_snapshots

__version__ = "0.1.0"

__all__ = [
    "EXIT_PREEMPTED",
    "Checkpointer",
    "CheckpointerConfig",
    "SnapshotHandle",
    "SnapshotInfo",
    "SnapshotState",
    "attach",
    "list_snapshots",
    "load",
    "CkptdError",
    "ConfigError",
    "CriuFailed",
    "DaemonUnavailable",
    "IncompatibleSnapshot",
    "InsufficientMemory",
    "LeaseLost",
    "LedgerCorrupt",
    "NoGoodSnapshot",
    "NoSnapshot",
    "ProtocolError",
    "SnapshotCorrupt",
    "SnapshotError",
    "SnapshotExists",
    "StoreError",
    "StoreInUse",
    "StoreUnreachable",
    "TransparentRefused",
    "UnsafeSnapshot",
]

_LAZY = {
    "Checkpointer": "ckptd.hook",
    "attach": "ckptd.hook",
    "load": "ckptd.restore.api",
    "SnapshotHandle": "ckptd.snapshot.lifecycle",
    "SnapshotState": "ckptd.snapshot.lifecycle",
}

if TYPE_CHECKING:
    from .hook import Checkpointer, attach
    from .restore.api import load
    from .snapshot.lifecycle import SnapshotHandle, SnapshotState


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'ckptd' has no attribute {name!r}")
