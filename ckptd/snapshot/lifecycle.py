"""A snapshot's lifecycle and the handle returned to the caller."""

from __future__ import annotations

import enum
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field


class SnapshotState(enum.Enum):
    """staging → staged → written → committed → durable, or failed from any but durable."""

    STAGING = "staging"
    STAGED = "staged"
    WRITTEN = "written"
    COMMITTED = "committed"
    DURABLE = "durable"
    FAILED = "failed"


_NEXT = {
    SnapshotState.STAGING: {SnapshotState.STAGED},
    SnapshotState.STAGED: {SnapshotState.WRITTEN},
    SnapshotState.WRITTEN: {SnapshotState.COMMITTED},
    SnapshotState.COMMITTED: {SnapshotState.DURABLE},
    SnapshotState.DURABLE: set(),
    SnapshotState.FAILED: set(),
}


@dataclass(eq=False)
class SnapshotHandle:
    """One snapshot in flight. Thread-safe.

    ``staged`` completes when training may change state again; ``durable``
    when the snapshot is committed where it must be (its result is the
    snapshot's SnapshotInfo). Errors arrive through the futures.
    """

    step: int
    staged: Future = field(default_factory=Future)
    durable: Future = field(default_factory=Future)
    stall: float = 0.0
    """Seconds training waited for this snapshot."""
    started: float = 0.0
    _state: SnapshotState = SnapshotState.STAGING
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def state(self) -> SnapshotState:
        return self._state

    def advance(self, new: SnapshotState) -> None:
        """Move to ``new``; an illegal move is a bug and raises."""
        with self._lock:
            if new is not SnapshotState.FAILED and new not in _NEXT[self._state]:
                raise RuntimeError(f"snapshot of step {self.step}: illegal move {self._state.value} → {new.value}")
            if new is SnapshotState.FAILED and self._state is SnapshotState.DURABLE:
                raise RuntimeError(f"snapshot of step {self.step} is durable; it cannot fail now")
            self._state = new
