"""Failures of background snapshots, kept until the caller hears of them."""

from __future__ import annotations

import logging
import threading
import warnings

from ..errors import SnapshotError

log = logging.getLogger("ckptd")


class SnapshotFailedWarning(UserWarning):
    """A snapshot failed in the background; training goes on."""


class FailureLog:
    """Collects failures from any thread; warns once each, raises on demand. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._errors: list[SnapshotError] = []
        self._warned: set[int] = set()

    def record(self, step: int, what: str, cause: BaseException) -> SnapshotError:
        err = SnapshotError(f"snapshot of step {step} {what}: {cause}")
        err.__cause__ = cause
        with self._lock:
            self._errors.append(err)
        return err

    def warn_new(self) -> None:
        """Log and warn about each failure not reported yet; training goes on."""
        with self._lock:
            fresh = [e for e in self._errors if id(e) not in self._warned]
            self._warned.update(id(e) for e in fresh)
        for err in fresh:
            log.error("ckptd: %s", err)
            warnings.warn(str(err), SnapshotFailedWarning, stacklevel=4)

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._errors)

    def raise_all(self) -> None:
        """Raise the failures collected so far (the last one, with a count) and forget them."""
        with self._lock:
            errors, self._errors = self._errors, []
            self._warned.clear()
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise SnapshotError(f"{len(errors)} snapshots failed; the last: {errors[-1]}") from errors[-1]
