"""Progress events of a supervised trainer: the hook appends, ``ckptd run`` reads (no torch).

One JSON object per line: ``start``, ``restored`` (step), ``step`` (at most
once a second, and the first after a start), ``preempted``. The supervisor
derives lost work and recovery time from them. The same events, every step
and every snapshot go to the goodput ledger's recorder when the hook gives one
(``ckptd/ledger/recorders.py``), with or without ``ckptd run``.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

ENV = "CKPTD_PROGRESS"
_STEP_EVERY = 1.0


class ProgressSink(Protocol):
    """What else hears the events: the goodput ledger's TrainingRecorder."""

    def event(self, kind: str, t: float, fields: dict[str, Any]) -> None: ...

    def step(self, step: int, t: float) -> None: ...

    def snapshot(self, step: int, handle: Any, nbytes: int) -> None: ...

    def close(self) -> None: ...


class ProgressWriter:
    """Appends events to the file named by $CKPTD_PROGRESS (a no-op when unset) and to ``ledger``. Not thread-safe."""

    def __init__(self, path: str | None = None, *, ledger: ProgressSink | None = None) -> None:
        path = path if path is not None else os.environ.get(ENV)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600) if path else None
        self._ledger = ledger
        self._last_step_at = 0.0
        self._steps_since_start = 0
        self.event("start", pid=os.getpid())

    def event(self, kind: str, **fields) -> None:
        t = time.time()
        if self._ledger is not None:
            self._ledger.event(kind, t, fields)
        if self._fd is None:
            return
        line = json.dumps({"t": t, "kind": kind, **fields}) + "\n"
        os.write(self._fd, line.encode())

    def snapshot(self, step: int, handle: Any, nbytes: int) -> None:
        """A snapshot of ``step`` started (``handle.stall`` grows until it is staged); for the ledger only."""
        if self._ledger is not None:
            self._ledger.snapshot(step, handle, nbytes)

    def step(self, step: int) -> None:
        """Record progress, throttled: the first step after a start, then once a second (every step to the ledger)."""
        if self._ledger is not None:
            self._ledger.step(step, time.time())
        now = time.monotonic()
        self._steps_since_start += 1
        if self._steps_since_start == 1 or now - self._last_step_at >= _STEP_EVERY:
            self._last_step_at = now
            self.event("step", step=step)

    def close(self) -> None:
        if self._ledger is not None:
            ledger, self._ledger = self._ledger, None
            ledger.close()
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
