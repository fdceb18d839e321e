"""Errors ckptd raises, one base and a short tree.

    CkptdError
    ├── ConfigError            bad argument or combination; says which and the fix
    │   └── TransparentRefused CRIU cannot snapshot this job here; names what is missing, or the hook
    ├── StoreError             the store (disk, S3) failed or refused
    │   ├── StoreUnreachable   endpoint, bucket or path cannot be used
    │   └── SnapshotExists     another writer already committed this step
    ├── StoreInUse             another job holds the store's lease
    ├── SnapshotError          a snapshot could not be taken or persisted
    │   ├── InsufficientMemory staging would exceed host memory or the budget
    │   ├── LeaseLost          this job's lease was taken over; it may not commit
    │   └── CriuFailed         criu dump or restore failed; names its first error and its log
    ├── SnapshotCorrupt        checksums or manifest do not verify
    ├── NoSnapshot             the store holds no (such) committed snapshot
    │   └── NoGoodSnapshot     snapshots exist, and none of them verifies
    ├── IncompatibleSnapshot   a snapshot does not fit the objects to restore
    ├── UnsafeSnapshot         a snapshot asks to unpickle code or escape its directory
    ├── LedgerCorrupt          an object of the goodput ledger is not a valid record page
    ├── DaemonUnavailable      no node daemon answers at the socket (also an OSError)
    └── ProtocolError          a daemon message or frame is not valid (also a ValueError)

Messages name the thing and what to do; errors from boto3, the OS and torch
are wrapped at the boundary with ``raise ... from e``.
"""

from __future__ import annotations

import logging
import warnings

__all__ = [
    "CkptdError",
    "ConfigError",
    "StoreError",
    "StoreUnreachable",
    "SnapshotExists",
    "StoreInUse",
    "SnapshotError",
    "InsufficientMemory",
    "LeaseLost",
    "SnapshotCorrupt",
    "NoSnapshot",
    "NoGoodSnapshot",
    "IncompatibleSnapshot",
    "UnsafeSnapshot",
    "LedgerCorrupt",
    "DaemonUnavailable",
    "ProtocolError",
    "TransparentRefused",
    "CriuFailed",
]


class CkptdError(Exception):
    """Base of every error ckptd raises on purpose."""


class ConfigError(CkptdError, ValueError):
    """An argument or a combination of them is invalid."""


class TransparentRefused(ConfigError):
    """Transparent mode cannot snapshot this job here (no CRIU >= 4, no privileges, sockets to other hosts,
    no GPU tooling); the message names what is missing, or the hook (ckptd.Checkpointer) as the way."""


class StoreError(CkptdError):
    """The store failed or refused an operation."""


class StoreUnreachable(StoreError):
    """The store's path, endpoint or bucket cannot be used."""


class SnapshotExists(StoreError):
    """A committed snapshot of this step is already in the store."""


class SnapshotError(CkptdError):
    """A snapshot could not be taken or persisted."""


class InsufficientMemory(SnapshotError):
    """Staging the snapshot would exceed host memory or the staging budget."""


class StoreInUse(CkptdError):
    """Another job holds the store's lease."""


class LeaseLost(SnapshotError):
    """This job's lease was taken over; it may no longer commit to the store."""


class CriuFailed(SnapshotError):
    """``criu dump`` or ``criu restore`` failed; the message carries CRIU's first error line and its log."""


class SnapshotCorrupt(CkptdError):
    """A snapshot's files or manifest do not verify."""


class NoSnapshot(CkptdError, LookupError):
    """The store holds no committed snapshot, or none of the asked step."""


class NoGoodSnapshot(NoSnapshot):
    """Committed snapshots exist, and every one of them is corrupt or unreadable."""

    def __init__(self, message: str, *, problems: list[str] | None = None) -> None:
        super().__init__(message)
        self.problems = list(problems or [])


class IncompatibleSnapshot(CkptdError):
    """A snapshot does not fit the objects it is restored into."""


class UnsafeSnapshot(SnapshotCorrupt):
    """A snapshot names a path outside itself or a type that is not plain data."""


class LedgerCorrupt(CkptdError):
    """An object under the store's goodput ledger is not a valid page of records."""


class DaemonUnavailable(CkptdError, OSError):
    """No node daemon answers at the socket; an OSError too, as socket errors are."""


class ProtocolError(CkptdError, ValueError):
    """A frame or message that is not valid in the daemon protocol's version."""


def warn(log: logging.Logger, message: str, category: type[Warning] = UserWarning, *, stacklevel: int = 2) -> None:
    """Tell the user once: a Python warning, and a log line where logging has a handler.

    Without a handler the log line would reach stderr through logging's last
    resort and repeat the warning beside it.
    """
    warnings.warn(message, category, stacklevel=stacklevel + 1)
    if log.hasHandlers():
        log.warning("%s", message)
