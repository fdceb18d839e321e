"""Failures of background snapshots, kept until the caller hears of them."""

from __future__ import annotations

import logging
import re
import threading
import warnings

from ..errors import SnapshotError

log = logging.getLogger("ckptd")


class SnapshotFailedWarning(UserWarning):
    """A snapshot failed in the background; training goes on."""


class FailureLog:
    """Collects failures from any thread; warns once each, raises on demand. Thread-safe.

    A failure is reported once, as a SnapshotFailedWarning (no second log
    line). The same failure again at later steps is counted and summarized
    at its 2nd, 10th, 100th... occurrence instead of warned each step.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._errors: list[SnapshotError] = []
        self._warned: set[int] = set()
        self._seen: dict[str, int] = {}

    def record(self, step: int, what: str, cause: BaseException) -> SnapshotError:
        err = SnapshotError(f"snapshot of step {step} {what}: {cause}")
        err.__cause__ = cause
        with self._lock:
            self._errors.append(err)
        return err

    def warn_new(self) -> None:
        """Warn about each failure not reported yet, repeats summarized; training goes on."""
        with self._lock:
            fresh = [e for e in self._errors if id(e) not in self._warned]
            self._warned.update(id(e) for e in fresh)
        for err in fresh:
            key = _shape(err)
            n = self._seen[key] = self._seen.get(key, 0) + 1
            if n == 1:
                warnings.warn(str(err), SnapshotFailedWarning, stacklevel=4)
            elif n == 2 or _power_of_ten(n):
                warnings.warn(
                    f"{err} (the same failure {n} times so far; reported again at the "
                    f"{'10th' if n < 10 else f'{n * 10}th'})",
                    SnapshotFailedWarning,
                    stacklevel=4,
                )
            else:
                log.debug("ckptd: %s (repeat %d)", err, n)

    def __bool__(self) -> bool:
        with self._lock:
            return bool(self._errors)

    def raise_all(self) -> None:
        """Raise the failures collected so far (the last one, with a count) and forget them."""
        with self._lock:
            errors, self._errors = self._errors, []
            self._warned.clear()
            self._seen.clear()
        if len(errors) == 1:
            raise errors[0]
        if errors:
            raise SnapshotError(f"{len(errors)} snapshots failed; the last: {errors[-1]}") from errors[-1]


def _shape(err: SnapshotError) -> str:
    """The failure without its numbers: the same cause at another step has the same shape."""
    return re.sub(r"\d+", "#", str(err))


def _power_of_ten(n: int) -> bool:
    while n >= 10 and n % 10 == 0:
        n //= 10
    return n == 1
