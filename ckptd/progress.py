"""Progress events of a supervised trainer: the hook appends, ``ckptd run`` reads (no torch).

One JSON object per line: ``start``, ``restored`` (step), ``step`` (at most
once a second, and the first after a start), ``preempted``. The supervisor
derives lost work and recovery time from them.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field

ENV = "CKPTD_PROGRESS"
_STEP_EVERY = 1.0


class ProgressWriter:
    """Appends events to the file named by $CKPTD_PROGRESS; a no-op when unset. Not thread-safe."""

    def __init__(self, path: str | None = None) -> None:
        path = path if path is not None else os.environ.get(ENV)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600) if path else None
        self._last_step_at = 0.0
        self._steps_since_start = 0
        self.event("start", pid=os.getpid())

    def event(self, kind: str, **fields) -> None:
        if self._fd is None:
            return
        line = json.dumps({"t": time.time(), "kind": kind, **fields}) + "\n"
        os.write(self._fd, line.encode())

    def step(self, step: int) -> None:
        """Record progress, throttled: the first step after a start, then once a second."""
        now = time.monotonic()
        self._steps_since_start += 1
        if self._steps_since_start == 1 or now - self._last_step_at >= _STEP_EVERY:
            self._last_step_at = now
            self.event("step", step=step)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


@dataclass
class Attempt:
    """What one launch of the trainer reported."""

    started: float | None = None
    restored: int | None = None
    restored_at: float | None = None
    first_step_at: float | None = None
    last_step: int | None = None
    preempted: bool = False
    events: list[dict] = field(default_factory=list)


def read_attempts(path: str) -> list[Attempt]:
    """Split the event file into one Attempt per ``start``; torn last lines are skipped."""
    attempts: list[Attempt] = []
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return attempts
    for line in lines:
        try:
            ev = json.loads(line)
        except ValueError:
            continue
        kind = ev.get("kind")
        if kind == "start" or not attempts:
            attempts.append(Attempt(started=ev.get("t")))
        a = attempts[-1]
        a.events.append(ev)
        if kind == "restored":
            a.restored, a.restored_at = ev.get("step"), ev.get("t")
        elif kind == "step":
            if a.first_step_at is None:
                a.first_step_at = ev.get("t")
            a.last_step = ev.get("step")
        elif kind == "preempted":
            a.preempted = True
    return attempts
