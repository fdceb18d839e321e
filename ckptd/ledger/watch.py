"""The daemon's part of the goodput ledger: hangs, stops and GPU energy per job, and each job's figures (no torch).

The daemon calls :meth:`LedgerWatch.tick` once per poll with the GPUs' energy
readings and its jobs; the watch meters the GPUs of every job it has seen
(while the job is between launches too, for ``linger`` seconds, since a
restart's GPUs still draw power), and writes through one LedgerBook per job.
A thread of its own reads each job's ledger back every ``every`` seconds and
accounts it, for ``ckptd status`` and the Prometheus metrics; nothing here
does network I/O on the caller's thread.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import CkptdError
from .account import account
from .book import LedgerBook, LedgerReader
from .energy import EnergyMeter, GpuEnergy
from .record import Record, job_name

log = logging.getLogger("ckptd.daemon")

LINGER = 300.0
"""Seconds a job's GPUs are still metered after its last process left (the restart in between)."""
FORGET = 3600.0
"""Seconds after which a job that left is no longer accounted."""


def ledger_uri(store: str) -> str | None:
    """The store a daemon may write a job's ledger to: an s3:// or file:// URI or an absolute path (as a file://
    URI), else None: a relative path means the job's directory, which the daemon does not know."""
    if store.startswith(("s3://", "file:///")):
        return store
    return "file://" + os.path.normpath(store) if os.path.isabs(store) else None


@dataclass
class _Track:
    """A job the daemon has seen: where its ledger is, which GPUs it used, when it was last alive."""

    uri: str
    job: str
    gpus: set[int] | None = None
    """The GPUs its processes registered; None: every GPU not marked bad."""
    last_seen: float = 0.0
    pinned: bool = False
    """The daemon was started for this job (``ckptd run``): metered from the start, until the daemon stops."""
    stops: dict[int, tuple[float, str]] = field(default_factory=dict)


class LedgerWatch:
    """Per-job ledger writing and accounting inside the daemon. Thread-safe."""

    def __init__(self, *, every: float = 30.0, linger: float = LINGER) -> None:
        self.every, self.linger = every, linger
        self._meter = EnergyMeter(every)
        self._tracks: dict[tuple[str, str], _Track] = {}
        self._books: dict[tuple[str, str], LedgerBook] = {}
        self._figures: dict[str, dict[str, Any]] = {}
        self._readers: dict[str, LedgerReader] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh_loop, name="ckptd-ledger-watch", daemon=True)
        self._thread.start()

    # -- what the daemon tells it --------------------------------------------

    def expect(self, store: str, job: str) -> None:
        """Meter ``job``'s GPUs from now on, before its first process registers (the daemon ``ckptd run`` started)."""
        with self._lock:
            t = self._track(_Seen(store, job))
            if t is not None:
                t.pinned = True

    def tick(self, now: float, energy: Sequence[GpuEnergy], jobs: Iterable[Any], bad: set[int]) -> None:
        """One poll: which jobs run on which GPUs, and the joules each GPU used since the last poll."""
        all_gpus = {g.index for g in energy}
        with self._lock:
            used: dict[tuple[str, str], set[int] | None] = {}  # every rank's devices; none named: all of them
            for j in jobs:
                t = self._track(j)
                if t is not None:
                    key, had = self._key(t), used.get(self._key(t), set())
                    used[key] = None if had is None or not j.devices else had | set(j.devices)
                    t.last_seen = now
            for key, devices in used.items():
                self._tracks[key].gpus = devices
            joules = self._meter.read(now, energy)
            for key, t in list(self._tracks.items()):
                if t.pinned:
                    t.last_seen = now
                if now - t.last_seen > self.linger:
                    self._close_window(key, now)
                    continue
                metered = sorted(all_gpus - bad if t.gpus is None else t.gpus)
                self._write(key, self._meter.add(_mkey(key), now, joules, metered))

    def hang(self, job: Any, silent_s: float, now: float) -> None:
        """The daemon declared ``job`` hung after ``silent_s`` seconds without progress."""
        with self._lock:
            t = self._track(job)
            if t is not None:
                self._write(self._key(t), [Record(kind="hang", pid=job.pid, t0=now - silent_s, t1=now)])

    def stopping(self, job: Any, reason: str, now: float) -> None:
        """The daemon is stopping ``job``'s process (a fault or a hang); :meth:`gone` closes the record."""
        with self._lock:
            t = self._track(job)
            if t is not None:
                t.stops[job.pid] = (now, reason[:200])

    def gone(self, job: Any, now: float) -> None:
        """``job``'s process is gone: the stop record, from the stop until now."""
        with self._lock:
            t = self._track(job)
            if t is not None and job.pid in t.stops:
                since, reason = t.stops.pop(job.pid)
                self._write(self._key(t), [Record(kind="stop", pid=job.pid, t0=since, t1=now, note=reason)])
                self._books[self._key(t)].flush_soon()

    # -- what it tells the daemon ----------------------------------------------

    def figures(self) -> dict[str, dict[str, Any]]:
        """Each job's goodput figures as of the last refresh (``Account.to_dict`` without segments)."""
        with self._lock:
            return {k: dict(v) for k, v in self._figures.items()}

    def close(self) -> None:
        """Write every open energy window and every book (the daemon is stopping)."""
        self._stop.set()
        self._thread.join(timeout=30)
        now = time.time()
        with self._lock:
            for key in list(self._tracks):
                self._close_window(key, now, keep=True)
            books = list(self._books.values())
        for book in books:
            book.close()

    # -- inside ------------------------------------------------------------------

    def _track(self, job: Any) -> _Track | None:
        uri = ledger_uri(getattr(job, "store", "") or "")
        if uri is None or not getattr(job, "job", ""):
            return None
        key = (uri, job_name(job.job))
        t = self._tracks.get(key)
        if t is None:
            t = self._tracks[key] = _Track(uri, key[1])
            self._books[key] = LedgerBook(uri, job=key[1], source="daemon", flush_every=self.every)
        return t

    @staticmethod
    def _key(t: _Track) -> tuple[str, str]:
        return (t.uri, t.job)

    def _write(self, key: tuple[str, str], records: list[Record]) -> None:
        for r in records:
            self._books[key].append(r)

    def _close_window(self, key: tuple[str, str], now: float, *, keep: bool = False) -> None:
        self._write(key, self._meter.flush(_mkey(key), now))
        self._meter.forget(_mkey(key))
        if not keep and now - self._tracks[key].last_seen > FORGET:
            del self._tracks[key]
            book = self._books.pop(key)
            threading.Thread(target=book.close, name="ckptd-ledger-close", daemon=True).start()  # no I/O under the lock

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.every):
            self.refresh()

    def refresh(self) -> None:
        """Read back and account every job seen within the last hour (this thread, or a test's)."""
        with self._lock:
            tracks = [(t.uri, t.job) for t in self._tracks.values()]
        for uri, job in tracks:
            try:
                reader = self._readers.get(uri)
                if reader is None:
                    from ..store import open_store

                    reader = self._readers[uri] = LedgerReader(open_store(uri))
                records = reader.read(job).records(job)
                _bundle(reader, uri)
                if not any(r.kind != "energy" for r in records):
                    continue
                figures = account(records).to_dict(segments=False)
            except (CkptdError, OSError, ValueError) as e:
                log.info("ckptd daemon: goodput of job %s in %s: %s", job, uri, e)
                continue
            with self._lock:
                self._figures[job] = figures


def _bundle(reader: LedgerReader, uri: str) -> None:
    """Bundle a job's loose ledger pages once there are many (``bundle.py``); a failure is only logged."""
    try:
        for job, done in reader.bundle().items():
            log.info("ckptd daemon: bundled %d ledger pages of job %s in %s", done.pages, job, uri)
    except (CkptdError, OSError) as e:
        log.warning("ckptd daemon: cannot bundle the goodput ledger in %s: %s", uri, e)


@dataclass(frozen=True)
class _Seen:
    """A job known by its store and id only."""

    store: str
    job: str


def _mkey(key: tuple[str, str]) -> str:
    return f"{key[0]}\n{key[1]}"
