"""Progress events of a supervised trainer: the hook appends, ``ckptd run`` reads (no torch).

One JSON object per line: ``start``, ``restored`` (step), ``step`` (at most
once a second, and the first after a start), ``preempted``. Every step also
lands in a 16-byte counter file per launch (``<file>.<launch>.step``, a shared
mapping, so a SIGKILL loses none of it), which is how the supervisor knows
the last step a dead launch finished. The supervisor
derives lost work and recovery time from them. The same events, every step
and every snapshot go to the goodput ledger's recorder when the hook gives one
(``ckptd/ledger/recorders.py``), with or without ``ckptd run``.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol

ENV = "CKPTD_PROGRESS"
_STEP_EVERY = 1.0
_COUNTER = struct.Struct("<qd")
"""The last step a process finished and when (time.time())."""


def counter_path(path: str, launch: str) -> str:
    return f"{path}.{launch}.step"


class StepCounter:
    """The last finished step in a small shared file mapping: one memory store per step, no system call."""

    def __init__(self, path: str) -> None:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.ftruncate(fd, _COUNTER.size)
            self._mm: mmap.mmap | None = mmap.mmap(fd, _COUNTER.size)
        finally:
            os.close(fd)
        _COUNTER.pack_into(self._mm, 0, -1, 0.0)

    def set(self, step: int) -> None:
        if self._mm is not None:
            _COUNTER.pack_into(self._mm, 0, step, time.time())

    def close(self) -> None:
        if self._mm is not None:
            self._mm.close()
            self._mm = None


def read_counter(path: str) -> tuple[int, float] | None:
    """(step, time) a process's counter holds; None when it has none, or no step yet."""
    try:
        with open(path, "rb") as f:
            data = f.read(_COUNTER.size)
    except OSError:
        return None
    if len(data) != _COUNTER.size:
        return None
    step, t = _COUNTER.unpack(data)
    return (step, t) if step >= 0 else None


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
        launch = uuid.uuid4().hex[:12]
        self._counter = StepCounter(counter_path(path, launch)) if path else None
        self._ledger = ledger
        self._last_step_at = 0.0
        self._steps_since_start = 0
        self.event("start", pid=os.getpid(), launch=launch)

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
        if self._counter is not None:
            self._counter.set(step)
        now = time.monotonic()
        self._steps_since_start += 1
        if self._steps_since_start == 1 or now - self._last_step_at >= _STEP_EVERY:
            self._last_step_at = now
            self.event("step", step=step)

    def close(self) -> None:
        if self._ledger is not None:
            ledger, self._ledger = self._ledger, None
            ledger.close()
        if self._counter is not None:
            self._counter.close()
            self._counter = None
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
    launch: str | None = None
    """The id the launch's counter file is named by."""
    last_step_at: float | None = None
    """When ``last_step`` finished, where the counter said (the events are throttled)."""

    def when_step(self, target: int) -> float | None:
        """When this launch finished step ``target``: a recorded time, or one interpolated between the two
        recorded steps around it (events come at most once a second); None if it never got there."""
        points = [(e["step"], e["t"]) for e in self.events if e.get("kind") == "step" and "t" in e and "step" in e]
        if self.last_step is not None and self.last_step_at is not None:
            points.append((self.last_step, self.last_step_at))
        before = None
        for step, t in sorted(points, key=lambda p: p[1]):
            if step >= target:
                if before is None or step == before[0]:
                    return t
                return before[1] + (t - before[1]) * (target - before[0]) / (step - before[0])
            before = (step, t)
        return None

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
            attempts.append(Attempt(started=ev.get("t"), launch=ev.get("launch")))
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
    for a in attempts:  # the throttled events lag; the counter has the very last step
        launch = a.launch if isinstance(a.launch, str) and a.launch.isalnum() else None
        last = read_counter(counter_path(path, launch)) if launch else None
        if last is not None and (a.last_step is None or last[0] > a.last_step):
            a.last_step, a.last_step_at = last
    return attempts
