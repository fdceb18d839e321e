"""What the hook and ``ckptd run`` write into the ledger (no torch).

:class:`TrainingRecorder` is fed by the hook's ``ProgressWriter`` (start,
restored, every step, every snapshot, close) and turns it into training
spans: one ends at each snapshot's step, so the step a later launch restores
is always a span boundary, and at least every ``span_every`` seconds, so a
killed process loses at most that much of its record. :class:`RunRecorder`
writes ``ckptd run``'s launches and exits. :class:`PolicyFeed` reads the
ledger once at start and hands the policy what it measured.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from ..daemon.host import started_at
from ..errors import CkptdError
from ..store.base import Store
from .account import account
from .book import LedgerBook, LedgerReader
from .record import Record

log = logging.getLogger("ckptd")

SPAN_EVERY = 30.0
"""Seconds at most between two training records of a process (and its pages: ``LedgerBook.flush_every``).
A killed process's steps since its last page are counted lost, which they are: every snapshot closes a
span and flushes at once, so the steps after the newest flushed snapshot are the ones a restore redoes."""
FEED_PAGES = 2000
"""Newest ledger pages a starting hook reads for its policy."""


class TrainingRecorder:
    """Rank 0's training spans. Called from the training thread only; its book writes from its own thread."""

    def __init__(self, book: LedgerBook, *, gpus: int, feed: PolicyFeed | None = None) -> None:
        self._book, self._gpus, self._feed = book, gpus, feed
        self._pid = os.getpid()
        self._t0: float | None = None
        self._step0: int | None = None
        self._step1: int | None = None
        self._steps = 0
        self._last_step_at: float | None = None
        self._handles: list[list[Any]] = []  # [handle, its stall already in a span]

    @classmethod
    def open(cls, store: Store, *, job: str, rank: int, gpus: int, policy: Any = None) -> TrainingRecorder | None:
        """Rank 0's recorder of ``job`` in ``store``; None on other ranks (rank 0's time is the job's)."""
        if rank != 0:
            return None
        book = LedgerBook(store, job=job, source="hook", flush_every=SPAN_EVERY)
        return cls(book, gpus=gpus, feed=PolicyFeed(store, policy))

    def event(self, kind: str, t: float, fields: dict[str, Any]) -> None:
        if kind == "start":  # from the process's creation (its imports are the job's time too), if it is the first
            global _started
            since, _started = (min(_created(t), t) if not _started else t), True
            self._append("start", since, t, gpus=self._gpus)
            self._t0 = t
        elif kind == "restored":
            step = fields.get("step")
            self._append("restored", self._t0 or t, t, step=-1 if step is None else int(step))
            self._t0 = t
            self._book.flush_soon()

    def step(self, step: int, t: float) -> None:
        if self._t0 is None:
            self._t0 = t
        if self._step0 is None:
            self._step0 = step
        self._step1, self._steps, self._last_step_at = step, self._steps + 1, t
        if t - self._t0 >= SPAN_EVERY:
            self._close_span(t)
        if self._feed is not None and self._feed.ready():
            self._feed.apply()
            self._feed = None

    def snapshot(self, step: int, handle: Any, nbytes: int) -> None:
        """A snapshot of ``step`` started: the span of the steps up to it ends where the step did."""
        end = self._last_step_at if self._step1 == step and self._last_step_at is not None else time.time()
        self._close_span(end, snapshots=1, nbytes=nbytes)
        self._handles.append([handle, 0.0])
        self._book.flush_soon()

    def close(self) -> None:
        """The Checkpointer closed: the last span, then the wait for the last snapshot, and the book."""
        now = time.time()
        end = self._last_step_at if self._last_step_at is not None else now
        self._close_span(end)
        self._append("close", min(end, now), now)
        self._book.close()

    def _close_span(self, t: float, *, snapshots: int = 0, nbytes: int = 0) -> None:
        if self._t0 is None or self._step0 is None or self._step1 is None or not self._steps or t < self._t0:
            return
        self._append(
            "train",
            self._t0,
            t,
            step0=self._step0,
            step1=self._step1,
            steps=self._steps,
            stall_s=self._new_stall(),
            snapshots=snapshots,
            nbytes=nbytes,
        )
        self._t0, self._step0, self._step1, self._steps = t, None, None, 0

    def _new_stall(self) -> float:
        """Stall of the snapshots since the last span; a snapshot's stall grows until its copy is staged."""
        total, keep = 0.0, []
        for entry in self._handles:
            handle, counted = entry
            stall = float(getattr(handle, "stall", 0.0) or 0.0)
            total += max(0.0, stall - counted)
            entry[1] = max(counted, stall)
            staged = getattr(handle, "staged", None)
            if staged is None or not staged.done():
                keep.append(entry)
        self._handles = keep
        return total

    def _append(self, kind: str, t0: float, t1: float, **fields: Any) -> None:
        self._book.append(Record(kind=kind, pid=self._pid, t0=t0, t1=max(t0, t1), **fields))


_started = False
"""A Checkpointer of this process has started: a later one's start record begins when it does."""


def _created(default: float) -> float:
    """This process's creation time (Unix s) to a clock tick, or ``default``."""
    created = started_at()
    return default if created is None else created


class PolicyFeed:
    """Reads the store's ledger in the background once; ``apply()`` (training thread) gives the policy its
    figures, if it takes them (``use_measured``), and says what they are either way."""

    def __init__(self, store: Store, policy: Any) -> None:
        self._store, self._policy = store, policy
        self._inputs: dict[str, Any] | None = None
        self._done = threading.Event()
        threading.Thread(target=self._read, name="ckptd-ledger-feed", daemon=True).start()

    def ready(self) -> bool:
        return self._done.is_set()

    def _read(self) -> None:
        try:
            records = LedgerReader(self._store).read(newest=FEED_PAGES).records()
            if any(r.kind == "train" for r in records):
                self._inputs = account(records).policy_inputs()
        except (CkptdError, OSError, ValueError) as e:
            log.info("ckptd: the goodput ledger of %s could not be read for the policy: %s", self._store.uri, e)
        finally:
            self._done.set()

    def apply(self) -> None:
        i = self._inputs
        if not i:
            return
        use = getattr(self._policy, "use_measured", None)
        taken = "feed the policy" if callable(use) else f"(the policy {type(self._policy).__name__} does not use them)"
        if callable(use):
            try:
                use(stall=i["stall_s"], restart=i["restart_s"], lost=i["lost_s"], source=f"ledger of {self._store.uri}")
            except (CkptdError, ValueError) as e:
                log.warning("ckptd: the policy refused the ledger's figures: %s", e)
                return
        log.info(
            "ckptd: goodput ledger of %s: stall %s per snapshot (%d snapshots), restart %s and lost work %s "
            "per failure (%d failures) %s",
            self._store.uri,
            _s(i["stall_s"]),
            i["snapshots"],
            _s(i["restart_s"]),
            _s(i["lost_s"]),
            i["failures"],
            taken,
        )


def _s(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f} s"


class RunRecorder:
    """``ckptd run``'s records: its start, each launch and exit, its end. Thread-safe enough: one caller."""

    def __init__(self, store: str, job: str) -> None:
        self._book = LedgerBook(store, job=job, source="run", flush_every=5.0)
        self._pid = os.getpid()
        self._attempt = 0
        created = _created(time.time())  # the ledger starts when `ckptd run` did, its imports included
        self._append("run", created, created)

    def launched(self) -> None:
        self._attempt += 1
        now = time.time()
        self._append("launch", now, now, attempt=self._attempt)

    def exited(self, code: int, cause: str, seen_alive: float, noticed: float) -> None:
        self._append("exit", min(seen_alive, noticed), noticed, attempt=self._attempt, code=code, note=cause[:200])
        self._book.flush_soon()

    def close(self, code: int | None = None, outcome: str = "") -> None:
        now = time.time()
        self._append("run_end", now, now, code=code, note=outcome[:200])
        self._book.close()

    def _append(self, kind: str, t0: float, t1: float, **fields: Any) -> None:
        if "code" in fields and fields["code"] is not None:
            fields["code"] = max(-255, min(255, int(fields["code"])))
        self._book.append(Record(kind=kind, pid=self._pid, t0=t0, t1=t1, **fields))
