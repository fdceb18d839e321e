"""Ledger records → where the wall time went, by cause, with GPU-hours, money and energy (no torch, no I/O).

Every second between the first record and the last goes to exactly one
cause. The records are painted onto the timeline, the more specific over the
more general (a hang over the training span it interrupts, a training step
over the daemon's stop that it outlived):

1. ``paused``: the whole window, where nothing else is known: no process of the job.
2. ``startup`` over each ``ckptd run`` session; ``restart`` between a failed
   launch's end and the next launch (detection, backoff).
3. each launch, from its start until its end: ``startup`` for the very first,
   ``restart`` for any later one (process start, imports, restore); the tail
   after the hook's last record is ``lost`` when the process was killed
   (steps it made that no record saw), ``startup`` after a clean close.
4. the daemon's ``stop`` (from the stop to the process gone): ``restart``.
5. the hook's training spans: their snapshot stall first, then ``productive``
   for steps up to the one the next launch restored and ``lost`` beyond it
   (work redone after the restore); ``close`` (waiting for the last snapshot): ``stall``.
6. the daemon's ``hang`` (from the last progress until it was declared).

Energy records spread their joules evenly over their interval and follow the
causes they overlap; time no energy record covers is estimated from a power per
GPU, and says so.
"""

from __future__ import annotations

import heapq
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from ..policy.cost import PriceTable, snapshot_cost
from .causes import BADPUT, CAUSES, Segment
from .energy import attribute_energy
from .record import Record

ACCOUNT_FORMAT = "ckptd-goodput/1"


@dataclass(frozen=True, kw_only=True)
class AccountConfig:
    """What turns seconds into GPU-hours, dollars and estimated joules."""

    gpus: int | None = None
    """GPUs the job holds; None: what the hook recorded (its policy's count), else 1."""
    gpu_hour_usd: float = 2.0
    """Price of one GPU-hour (the policy's default)."""
    gpu_watts: float = 700.0
    """Power per GPU where NVML measured nothing (an estimate: an H100 SXM's limit)."""
    keep_last: int = 3
    """Snapshots retention keeps, for their storage cost."""
    prices: PriceTable = field(default_factory=PriceTable)
    """Object-store prices (the policy's)."""

    def __post_init__(self) -> None:
        if self.gpus is not None and self.gpus < 1:
            raise ConfigError(f"gpus={self.gpus}: must be >= 1 (or None: as recorded)")
        if not self.gpu_hour_usd >= 0 or not self.gpu_watts >= 0 or self.keep_last < 1:
            raise ConfigError("gpu_hour_usd and gpu_watts must be >= 0 and keep_last >= 1")


@dataclass(frozen=True, kw_only=True)
class Failure:
    """One launch that did not finish, and what it cost until the next one trained again."""

    at: float
    cause: str
    lost_s: float
    steps_lost: float | None
    """About how many steps were redone: ``lost_s`` over the median step time (a killed process's last
    steps are in no record, so they cannot be counted)."""
    restart_s: float
    hang_s: float


@dataclass(frozen=True, kw_only=True)
class Account:
    """Where a job's wall time went, and what it cost."""

    start: float
    end: float
    seconds: dict[str, float]
    segments: tuple[Segment, ...]
    gpus: int
    config: AccountConfig
    energy_j: dict[str, float]
    energy_measured_j: float
    energy_estimated_j: float
    energy_how: tuple[str, ...]
    storage_usd: float
    snapshots: int
    failures: tuple[Failure, ...]
    step_time_s: float | None
    stall_per_snapshot_s: float | None
    snapshot_bytes: float | None
    """Mean size of a snapshot."""
    launches: int

    @property
    def wall_s(self) -> float:
        return self.end - self.start

    @property
    def held_s(self) -> float:
        """Wall time the job held its GPUs (all but paused)."""
        return self.wall_s - self.seconds["paused"]

    @property
    def goodput_ratio(self) -> float:
        """Productive time over the time the job held its GPUs."""
        return self.seconds["productive"] / self.held_s if self.held_s > 0 else 0.0

    def gpu_hours(self, cause: str) -> float:
        return 0.0 if cause == "paused" else self.seconds[cause] * self.gpus / 3600.0

    def dollars(self, cause: str) -> float:
        return self.gpu_hours(cause) * self.config.gpu_hour_usd

    def policy_inputs(self) -> dict[str, Any]:
        """What the snapshot policy should use, measured: stall per snapshot, restart and lost work per failure."""
        n = len(self.failures)
        return {
            "stall_s": self.stall_per_snapshot_s,
            "snapshots": self.snapshots,
            "snapshot_bytes": self.snapshot_bytes,
            "restart_s": statistics.fmean(f.restart_s for f in self.failures) if n else None,
            "lost_s": statistics.fmean(f.lost_s for f in self.failures) if n else None,
            "failures": n,
            "hours": self.held_s / 3600.0,
        }

    def to_dict(self, *, segments: bool = True) -> dict[str, Any]:
        """The figures as plain JSON values (``ckptd goodput --json``, ``ckptd status``, Prometheus)."""
        out: dict[str, Any] = {
            "format": ACCOUNT_FORMAT,
            "start": self.start,
            "end": self.end,
            "wall_s": self.wall_s,
            "held_s": self.held_s,
            "goodput_ratio": self.goodput_ratio,
            "seconds": dict(self.seconds),
            "badput_s": {c: self.seconds[c] for c in BADPUT},
            "gpus": self.gpus,
            "gpu_hours": {c: self.gpu_hours(c) for c in CAUSES},
            "gpu_hour_usd": self.config.gpu_hour_usd,
            "dollars": {c: self.dollars(c) for c in CAUSES},
            "storage_usd": self.storage_usd,
            "energy_j": dict(self.energy_j),
            "energy_measured_j": self.energy_measured_j,
            "energy_estimated_j": self.energy_estimated_j,
            "energy_how": list(self.energy_how),
            "snapshots": self.snapshots,
            "launches": self.launches,
            "step_time_s": self.step_time_s,
            "stall_per_snapshot_s": self.stall_per_snapshot_s,
            "failures": [vars(f) for f in self.failures],
            "policy_inputs": self.policy_inputs(),
        }
        if segments:
            out["segments"] = [[s.t0, s.t1, s.cause] for s in self.segments]
        return out


@dataclass
class _Attempt:
    """One launch of the job: its process's hook records and how it ended."""

    launch: float
    session: int | None
    hook: list[Record] = field(default_factory=list)
    daemon: list[Record] = field(default_factory=list)
    """The daemon's hang and stop records of this launch's process."""
    exit: Record | None = None
    end: float = 0.0

    @property
    def restored(self) -> int | None:
        return next((r.step for r in self.hook if r.kind == "restored"), None)

    @property
    def closed(self) -> bool:
        """Its Checkpointer closed: whatever ended the process then, no work was left unsaved."""
        return any(r.kind == "close" for r in self.hook)


@dataclass
class _Session:
    start: float
    pid: int
    end: float | None = None
    launches: list[Record] = field(default_factory=list)
    exits: list[Record] = field(default_factory=list)


def account(records: Iterable[Record], config: AccountConfig | None = None) -> Account:
    """Attribute every second from the first record to the last; see the module's docstring."""
    config = config or AccountConfig()
    records = sorted(records, key=lambda r: (r.t0, r.t1))
    timed = [r for r in records if r.kind != "energy"]
    if not timed:
        raise ConfigError("the ledger holds no record of the job's time yet; run the job (or wait for its first page)")
    t_start, t_end = min(r.t0 for r in timed), max(r.t1 for r in timed)
    sessions = _sessions(records)
    attempts = _attempts(records, sessions, t_end)
    paint = _paint(records, sessions, attempts, t_start, t_end)
    segments = _sweep(paint, t_start, t_end)
    seconds = {c: 0.0 for c in CAUSES}
    for s in segments:
        seconds[s.cause] += s.t1 - s.t0
    gpus = config.gpus or max((r.gpus for r in records if r.kind == "start"), default=0) or 1
    energy, measured, estimated, how = attribute_energy(records, segments, gpus, config.gpu_watts)
    trains = [r for r in records if r.kind == "train"]
    snaps = sum(r.snapshots for r in trains)
    rates = [max(0.0, r.seconds - min(r.stall_s, r.seconds)) / r.steps for r in trains]
    step_time = statistics.median(rates) if rates else None
    return Account(
        start=t_start,
        end=t_end,
        seconds=seconds,
        segments=tuple(segments),
        gpus=gpus,
        config=config,
        energy_j=energy,
        energy_measured_j=measured,
        energy_estimated_j=estimated,
        energy_how=how,
        storage_usd=_storage_usd(trains, gpus, config, t_end),
        snapshots=snaps,
        failures=tuple(_failures(attempts, segments, step_time)),
        step_time_s=step_time,
        stall_per_snapshot_s=sum(r.stall_s for r in trains) / snaps if snaps else None,
        snapshot_bytes=sum(r.nbytes * r.snapshots for r in trains) / snaps if snaps else None,
        launches=len(attempts),
    )


def _sessions(records: Sequence[Record]) -> list[_Session]:
    """``ckptd run`` sessions: its run record opens one, its launches, exits and run_end belong to it."""
    sessions: list[_Session] = []
    open_by_pid: dict[int, _Session] = {}
    for r in records:
        if r.kind == "run":
            open_by_pid[r.pid] = s = _Session(r.t0, r.pid)
            sessions.append(s)
            continue
        s_or_none = open_by_pid.get(r.pid)
        if s_or_none is None or r.kind not in ("launch", "exit", "run_end"):
            continue
        if r.kind == "launch":
            s_or_none.launches.append(r)
        elif r.kind == "exit":
            s_or_none.exits.append(r)
        else:
            s_or_none.end = r.t1
            del open_by_pid[r.pid]
    return sessions


def _attempts(records: Sequence[Record], sessions: list[_Session], t_end: float) -> list[_Attempt]:
    """One attempt per launch (or per hook start outside ``ckptd run``), with its process's hook records."""
    attempts: list[_Attempt] = []
    for i, s in enumerate(sessions):
        for launch in s.launches:
            a = _Attempt(launch.t0, i)
            a.exit = next((e for e in s.exits if e.attempt == launch.attempt and e.t1 >= launch.t0), None)
            attempts.append(a)
    attempts.sort(key=lambda a: a.launch)
    current: dict[int, _Attempt] = {}  # the attempt each hook pid's records go to
    for r in records:
        if r.kind not in ("start", "restored", "train", "close"):
            continue
        if r.kind == "start":  # t0: the process's creation, t1: the Checkpointer's
            owner = _launch_before(attempts, sessions, r.t1)
            if owner is None or (owner.hook and owner.hook[0].pid != r.pid):
                owner = _Attempt(r.t0, None)
                attempts.append(owner)
                attempts.sort(key=lambda a: a.launch)
            current[r.pid] = owner
        owner = current.get(r.pid)
        if owner is not None:
            owner.hook.append(r)
    by_pid: dict[int, list[_Attempt]] = {}
    for a in attempts:
        for pid in dict.fromkeys(r.pid for r in a.hook):
            by_pid.setdefault(pid, []).append(a)
    for r in records:  # a pid can come back in a later launch: the latest launch before the record's
        owners = [a for a in by_pid.get(r.pid, []) if a.launch <= r.t0] if r.kind in ("hang", "stop") else []
        if owners:
            owners[-1].daemon.append(r)
    for i, a in enumerate(attempts):
        nxt = attempts[i + 1].launch if i + 1 < len(attempts) else t_end
        last_seen = max((r.t1 for r in a.hook + a.daemon), default=a.launch)
        a.end = a.exit.t1 if a.exit is not None else min(nxt, max(last_seen, a.launch))
    return attempts


def _launch_before(attempts: list[_Attempt], sessions: list[_Session], t: float) -> _Attempt | None:
    """The latest launch of a still-running session at or before ``t``."""
    for a in reversed(attempts):
        if a.session is None or a.launch > t:
            continue
        s = sessions[a.session]
        if s.end is None or t <= s.end:
            return a
        return None
    return None


_Paint = tuple[float, float, int, str]


def _paint(
    records: Sequence[Record], sessions: list[_Session], attempts: list[_Attempt], t0: float, t1: float
) -> list[_Paint]:
    out: list[_Paint] = [(t0, t1, 0, "paused")]
    for s in sessions:
        out.append((s.start, s.end if s.end is not None else t1, 1, "startup"))
    for i, a in enumerate(attempts):
        nxt = attempts[i + 1] if i + 1 < len(attempts) else None
        same_session = nxt is not None and a.session is not None and nxt.session == a.session
        if nxt is not None and (same_session or (a.session is None and nxt.session is None and not a.closed)):
            out.append((a.end, nxt.launch, 2, "restart"))
        out.append((a.launch, a.end, 3, "startup" if i == 0 else "restart"))
        last_hook = max((r.t1 for r in a.hook), default=None)
        if last_hook is not None and last_hook < a.end:
            clean = a.closed or (a.exit is not None and a.exit.code == 0)
            out.append((last_hook, a.end, 4, "startup" if clean else "lost"))
        if a.exit is not None and same_session:
            out.append((a.exit.t0, a.exit.t1, 5, "restart"))
        redo_after = _resumed_from(attempts[i + 1 :])
        for r in a.hook:
            if r.kind == "train":
                out.extend(_train(r, redo_after))
            elif r.kind == "close":
                out.append((r.t0, r.t1, 7, "stall"))
    for r in records:
        if r.kind == "stop":
            out.append((r.t0, r.t1, 6, "restart"))
        elif r.kind == "hang":
            out.append((r.t0, r.t1, 8, "hang"))
    return out


def _train(r: Record, redo_after: int | None) -> list[_Paint]:
    """A training span: its stall first, then kept steps, then steps redone after the next restore."""
    assert r.step0 is not None and r.step1 is not None
    stall_end = r.t0 + min(r.stall_s, r.seconds)
    out: list[_Paint] = [(r.t0, stall_end, 7, "stall")]
    kept = 1.0 if redo_after is None else min(1.0, max(0.0, (redo_after - r.step0 + 1) / r.steps))
    split = stall_end + kept * (r.t1 - stall_end)
    out += [(stall_end, split, 7, "productive"), (split, r.t1, 7, "lost")]
    return [p for p in out if p[1] > p[0]]


def _sweep(paint: list[_Paint], t0: float, t1: float) -> list[Segment]:
    """The highest-priority cause at every instant, as merged segments (the latest painted wins a tie)."""
    bounds = sorted({t for p in paint for t in (p[0], p[1]) if t0 <= t <= t1} | {t0, t1})
    starts = sorted(
        ((max(p[0], t0), min(p[1], t1), p[2], i, p[3]) for i, p in enumerate(paint) if p[1] > p[0]),
        key=lambda p: p[0],
    )
    active: list[tuple[int, int, float, str]] = []
    out: list[Segment] = []
    j = 0
    for a, b in zip(bounds, bounds[1:]):
        while j < len(starts) and starts[j][0] <= a:
            _, end, prio, i, cause = starts[j]
            heapq.heappush(active, (-prio, -i, end, cause))
            j += 1
        while active and active[0][2] <= a:
            heapq.heappop(active)
        cause = active[0][3] if active else "paused"
        if out and out[-1].cause == cause and out[-1].t1 == a:
            out[-1] = Segment(out[-1].t0, b, cause)
        else:
            out.append(Segment(a, b, cause))
    return out


def _failures(attempts: list[_Attempt], segments: list[Segment], step_time: float | None) -> list[Failure]:
    """Each launch that was killed, or that ``ckptd run`` relaunched: what it lost, and its way back."""
    out = []
    for a, nxt in zip(attempts, attempts[1:]):
        relaunched = a.exit is not None and a.exit.code != 0 and a.session is not None and nxt.session == a.session
        if a.closed and not relaunched:
            continue  # finished or preempted cleanly, then launched again later: a pause, not a failure
        back = min((r.t0 for r in nxt.hook if r.kind == "train"), default=nxt.end)
        last_hook = max((r.t1 for r in a.hook), default=a.launch)
        stops = [r.note for r in a.daemon if r.kind == "stop" and r.note]
        exit_note = a.exit.note if a.exit is not None and a.exit.note else "the process ended"
        lost = _within(segments, a.launch, a.end, "lost")
        out.append(
            Failure(
                at=a.end,
                cause=f"{stops[0]}; {exit_note}" if stops else exit_note,
                lost_s=lost,
                steps_lost=lost / step_time if step_time else None,
                restart_s=_within(segments, last_hook, back, "restart"),
                hang_s=_within(segments, a.launch, a.end, "hang"),
            )
        )
    return out


def _resumed_from(later: Sequence[_Attempt]) -> int | None:
    """The last step whose work the first later launch that trained kept (-1: none), None if none trained."""
    for a in later:
        if a.restored is not None:
            return a.restored
        first = next((r.step0 for r in a.hook if r.kind == "train" and r.step0 is not None), None)
        if first is not None:
            return first - 1
    return None


def _within(segments: list[Segment], t0: float, t1: float, cause: str) -> float:
    return sum(max(0.0, min(s.t1, t1) - max(s.t0, t0)) for s in segments if s.cause == cause)


def _storage_usd(trains: list[Record], gpus: int, config: AccountConfig, t_end: float) -> float:
    """Requests, transfer and storage of every snapshot, at the policy's prices."""
    total, previous = 0.0, None
    for r in trains:
        if not r.snapshots or not r.nbytes:
            continue
        interval = max(1.0, r.t1 - previous) if previous is not None else max(1.0, r.seconds)
        previous = r.t1
        cost = snapshot_cost(
            stall=0.0,
            nbytes=r.nbytes,
            gpus=gpus,
            gpu_hour_usd=max(config.gpu_hour_usd, 1e-9),
            interval=interval,
            keep_last=config.keep_last,
            prices=config.prices,
        )
        total += cost.dollars * r.snapshots
    return total
