"""GPU energy: NVML's counters turned into ledger records, and records spread over the causes (no torch).

The daemon reads each GPU's total-energy counter (``nvmlDeviceGetTotalEnergyConsumption``,
millijoules since the driver loaded) every poll; :class:`EnergyMeter` turns the
differences into joules per job. A GPU whose counter is not supported (before
Volta) is estimated from its enforced power limit × time, and the record says
``estimate``. Where no record covers the job's time at all, the account
estimates from a power per GPU and says so.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

from .causes import CAUSES, Segment
from .record import Record


@dataclass(frozen=True)
class GpuEnergy:
    """One GPU's reading: its energy counter in mJ (None: not supported) and power limit in W (None: unknown)."""

    index: int
    millijoules: int | None
    limit_w: float | None


@dataclass
class _Window:
    t0: float
    measured_j: float = 0.0
    estimated_j: float = 0.0
    gpus: int = 0


class EnergyMeter:
    """Joules each job's GPUs used, in windows of ``every`` seconds. Not thread-safe: one owner (the daemon loop)."""

    def __init__(self, every: float) -> None:
        self.every = every
        self._last: dict[int, tuple[float, GpuEnergy]] = {}
        self._windows: dict[str, _Window] = {}

    def read(self, now: float, readings: Sequence[GpuEnergy]) -> dict[int, tuple[float, bool]]:
        """Each GPU's joules since the previous reading and whether that is an estimate."""
        out: dict[int, tuple[float, bool]] = {}
        for g in readings:
            prev = self._last.get(g.index)
            self._last[g.index] = (now, g)
            if prev is None:
                continue
            dt = now - prev[0]
            if g.millijoules is not None and prev[1].millijoules is not None and g.millijoules >= prev[1].millijoules:
                out[g.index] = ((g.millijoules - prev[1].millijoules) / 1000.0, False)
            elif g.limit_w is not None and dt > 0:
                out[g.index] = (g.limit_w * dt, True)
        return out

    def add(self, key: str, now: float, joules: dict[int, tuple[float, bool]], gpus: Sequence[int]) -> list[Record]:
        """Add ``gpus``' joules to job ``key``'s window; the records of a window that is full."""
        w = self._windows.setdefault(key, _Window(now))
        used = [joules[g] for g in gpus if g in joules]
        w.measured_j += sum(j for j, est in used if not est)
        w.estimated_j += sum(j for j, est in used if est)
        w.gpus = max(w.gpus, len(used))
        if now - w.t0 < self.every:
            return []
        return self.flush(key, now)

    def flush(self, key: str, now: float) -> list[Record]:
        """Close job ``key``'s window at ``now``: an energy record for the measured joules, one for the estimated."""
        w = self._windows.pop(key, None)
        if w is None or now <= w.t0 or not w.gpus:
            return []
        self._windows[key] = _Window(now)
        return [
            Record(kind="energy", pid=0, t0=w.t0, t1=now, joules=j, gpus=w.gpus, estimate=est)
            for j, est in ((w.measured_j, False), (w.estimated_j, True))
            if j > 0
        ]

    def forget(self, key: str) -> None:
        self._windows.pop(key, None)


def attribute_energy(
    records: Sequence[Record], segments: list[Segment], gpus: int, watts: float
) -> tuple[dict[str, float], float, float, tuple[str, ...]]:
    """Joules by cause (measured, estimated, how): the daemon's records where they cover the time, else
    ``watts`` × ``gpus`` × time; none for paused time (the job holds no GPU then)."""
    out = {c: 0.0 for c in CAUSES}
    measured = estimated = 0.0
    how: list[str] = []
    energy = [r for r in records if r.kind == "energy" and r.t1 > r.t0]
    kinds = {r.estimate for r in energy}
    if False in kinds:
        how.append("measured: NVML total energy counters")
    if True in kinds:
        how.append("estimated: NVML power limit x time, where the counter is not supported")
    starts = [s.t0 for s in segments]
    for r in energy:
        rate = r.joules / r.seconds
        i = max(0, bisect.bisect_right(starts, r.t0) - 1)
        while i < len(segments) and segments[i].t0 < r.t1:
            s = segments[i]
            i += 1
            if s.cause == "paused":  # the job held no GPU then: what they drew was someone else's
                continue
            j = rate * max(0.0, min(s.t1, r.t1) - max(s.t0, r.t0))
            out[s.cause] += j
            if r.estimate:
                estimated += j
            else:
                measured += j
    guessed = 0.0
    for s, covered in zip(segments, _coverage(segments, [(r.t0, r.t1) for r in energy])):
        bare = (s.t1 - s.t0) - covered
        if s.cause != "paused" and bare > 1e-9:
            out[s.cause] += bare * gpus * watts
            guessed += bare * gpus * watts
    if guessed > 0:
        how.append(f"estimated: {watts:g} W x {gpus} GPU(s) x time where no daemon measured")
        estimated += guessed
    return out, measured, estimated, tuple(how)


def _coverage(segments: list[Segment], spans: list[tuple[float, float]]) -> list[float]:
    """Seconds of each segment that the union of ``spans`` covers (both sorted: one merge pass)."""
    union: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if union and a <= union[-1][1]:
            union[-1] = (union[-1][0], max(union[-1][1], b))
        else:
            union.append((a, b))
    out, k = [], 0
    for s in segments:
        while k < len(union) and union[k][1] <= s.t0:
            k += 1
        covered, m = 0.0, k
        while m < len(union) and union[m][0] < s.t1:
            covered += max(0.0, min(union[m][1], s.t1) - max(union[m][0], s.t0))
            m += 1
        out.append(covered)
    return out
