"""Running measurements the policy decides from: step time, stall, persist time (no torch)."""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque

from .policy.base import PolicyContext

_RECENT = 16


def _median(values) -> float | None:
    return statistics.median(values) if values else None


class Measurements:
    """Medians of recent steps and snapshots. Thread-safe (the writer thread adds too)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._step_times: deque[float] = deque(maxlen=64)
        self._stalls: deque[float] = deque(maxlen=_RECENT)
        self._persists: deque[float] = deque(maxlen=_RECENT)
        self._last_step_at: float | None = None
        self.last_snapshot: tuple[int, float] | None = None
        self.started = time.monotonic()

    def step_done(self, now: float) -> None:
        with self._lock:
            if self._last_step_at is not None:
                self._step_times.append(now - self._last_step_at)
            self._last_step_at = now

    def snapshot_started(self, step: int, now: float) -> None:
        self.last_snapshot = (step, now)

    def stall(self, seconds: float) -> None:
        with self._lock:
            self._stalls.append(seconds)

    def persist(self, seconds: float) -> None:
        with self._lock:
            self._persists.append(seconds)

    def summary(self) -> dict[str, float | None]:
        with self._lock:
            return {
                "step_time_s": _median(self._step_times),
                "stall_s": _median(self._stalls),
                "persist_s": _median(self._persists),
            }

    def context(self, step: int, now: float, *, in_flight: int, gpus: int, nbytes: int | None = None) -> PolicyContext:
        last = self.last_snapshot
        s = self.summary()
        return PolicyContext(
            step=step,
            now=now,
            steps_since=None if last is None else step - last[0],
            seconds_since=now - (self.started if last is None else last[1]),
            step_time=s["step_time_s"],
            stall=s["stall_s"],
            persist=s["persist_s"],
            in_flight=in_flight,
            gpus=gpus,
            nbytes=nbytes,
        )
