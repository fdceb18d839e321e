"""Preemption: SIGTERM asks the hook for an emergency snapshot, then a resumable exit.

The handler only sets a flag; the snapshot is taken at the next step
boundary, where the state is consistent. The process then exits with
EXIT_PREEMPTED (75, EX_TEMPFAIL: "try again"), which ``ckptd run``,
Slurm's requeue and Kubernetes' restart policy treat as resumable.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

log = logging.getLogger("ckptd")

EXIT_PREEMPTED = 75


class PreemptionWatch:
    """Installs a SIGTERM handler if none is set and this is the main thread. Not thread-safe."""

    def __init__(self) -> None:
        self.requested_at: float | None = None
        self._previous = None
        self.installed = False
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
            log.info("ckptd: SIGTERM already has a handler; preemption snapshots are left to it")
            return
        self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        self.installed = True

    def _on_sigterm(self, signum, frame) -> None:
        if self.requested_at is None:
            self.requested_at = time.monotonic()

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def remaining(self, grace: float) -> float:
        """Seconds left of the grace period since the signal arrived."""
        if self.requested_at is None:
            return grace
        return max(0.0, grace - (time.monotonic() - self.requested_at))

    def uninstall(self) -> None:
        if self.installed and threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._previous)
            self.installed = False
