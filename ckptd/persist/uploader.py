"""Upload committed local snapshots to the object store and commit them there (no torch).

One thread per object store: it uploads ranks' parts in the order they were
committed locally (retrying store errors with backoff while training goes
on), and between uploads it checks the attempts still waiting for other
ranks' parts, committing each as soon as it is whole. Waiting never holds
up later uploads, so two ranks of one node behind one uploader (the daemon)
cannot wait on each other; and it is bounded: a snapshot still missing
parts after ``ranks_timeout`` fails, naming what is missing.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from ..errors import ConfigError, SnapshotCorrupt, SnapshotError, SnapshotExists, StoreError
from ..snapshot.manifest import Manifest
from ..store.base import Store
from .commit import try_commit, upload_part

log = logging.getLogger("ckptd")


@dataclass(frozen=True, kw_only=True)
class UploadConfig:
    """How the uploader retries and waits."""

    retry_initial: float = 0.5
    """Seconds before the first retry after a store error; doubles each time."""
    retry_max: float = 30.0
    """Longest wait between retries."""
    ranks_timeout: float = 600.0
    """Seconds an attempt may wait for the other ranks' parts after this uploader's last one."""
    poll: float = 0.2
    """Seconds before the first check for other ranks' parts; grows to ``poll_max``."""
    poll_max: float = 5.0
    """Longest wait between checks."""

    def __post_init__(self) -> None:
        if not 0 < self.retry_initial <= self.retry_max:
            raise ConfigError("UploadConfig: need 0 < retry_initial <= retry_max")
        if self.ranks_timeout <= 0:
            raise ConfigError("UploadConfig: ranks_timeout must be > 0 seconds")
        if not 0 < self.poll <= self.poll_max:
            raise ConfigError("UploadConfig: need 0 < poll <= poll_max")


@dataclass(eq=False)
class UploadJob:
    """Some ranks' parts of one locally committed snapshot; ``future`` completes when it is committed."""

    manifest: Manifest
    data: bytes
    directory: str
    ranks: tuple[int, ...]
    future: Future = field(default_factory=Future)

    @property
    def step(self) -> int:
        return self.manifest.step


@dataclass(eq=False)
class _Waiting:
    """An attempt whose parts from this uploader are up, waiting to be whole."""

    jobs: list[UploadJob]
    deadline: float
    next_check: float
    interval: float
    problems: list[str] = field(default_factory=list)


class Uploader:
    """Owns one upload thread for one object store; ``submit`` queues parts. Thread-safe."""

    def __init__(
        self,
        remote: Store,
        *,
        config: UploadConfig | None = None,
        on_durable: Callable[[UploadJob], None] | None = None,
    ) -> None:
        self.remote = remote
        self.config = config or UploadConfig()
        self._on_durable = on_durable
        self._queue: queue.Queue[UploadJob | None] = queue.Queue()
        self._queued: list[UploadJob] = []
        self._waiting: dict[tuple[int, str], _Waiting] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failing_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="ckptd-upload", daemon=True)
        self._thread.start()

    # -- what callers see -------------------------------------------------------

    def submit(self, manifest: Manifest, data: bytes, directory: str, ranks: tuple[int, ...]) -> Future:
        """Queue ``ranks``' parts of a locally committed snapshot; the future gets the step once committed."""
        job = UploadJob(manifest, data, directory, tuple(ranks))
        with self._lock:
            self._queued.append(job)
        self._queue.put(job)
        return job.future

    @property
    def backlog(self) -> list[int]:
        """Steps queued or waiting for other ranks, not yet committed in the object store."""
        with self._lock:
            return sorted({j.step for j in self._queued} | {s for s, _a in self._waiting})

    def detail(self, step: int) -> str:
        """What step ``step`` waits for, in words."""
        with self._lock:
            if any(j.step == step for j in self._queued):
                return "its upload is queued" + (
                    f" (the store has failed for {self.outage_seconds:.0f} s)" if self._failing_since else ""
                )
            for (s, _a), w in self._waiting.items():
                if s == step:
                    return "; ".join(w.problems) or "waiting for the other ranks' parts"
        return "nothing: it is not in this uploader"

    @property
    def outage_seconds(self) -> float:
        """How long uploads have been failing, 0 when they are not."""
        since = self._failing_since
        return 0.0 if since is None else time.monotonic() - since

    def close(self, *, wait: bool = True) -> None:
        """Stop: with ``wait``, after the queue is uploaded and waiting attempts settle (each bounded by
        ``ranks_timeout``); without, at once. Unfinished futures fail."""
        if not wait:
            self._stop.set()
        self._queue.put(None)
        self._thread.join()

    # -- the thread ---------------------------------------------------------------

    def _run(self) -> None:
        closing = False
        while not (closing and not self._waiting) and not self._stop.is_set():
            try:
                job: UploadJob | str | None = self._queue.get(timeout=self._until_next_check())
            except queue.Empty:
                job = "tick"
            if job is None:
                closing = True
            elif isinstance(job, UploadJob):
                self._upload(job)
            self._check_waiting()
        self._fail_rest()

    def _until_next_check(self) -> float | None:
        with self._lock:
            if not self._waiting:
                return None
            return max(0.0, min(w.next_check for w in self._waiting.values()) - time.monotonic())

    def _upload(self, job: UploadJob) -> None:
        delay = self.config.retry_initial
        try:
            while True:
                try:
                    for rank in job.ranks:
                        upload_part(self.remote, job.directory, job.manifest, job.data, rank)
                    break
                except (SnapshotExists, SnapshotCorrupt):
                    raise
                except StoreError as e:
                    self._failing_since = self._failing_since or time.monotonic()
                    log.warning(
                        "ckptd: upload of step %d failed (%s); retrying in %.1f s; backlog %s",
                        job.step,
                        e,
                        delay,
                        self.backlog,
                    )
                    if self._stop.wait(delay):
                        raise SnapshotError(f"snapshot of step {job.step} was not promoted: uploader closed") from e
                    delay = min(delay * 2, self.config.retry_max)
            if self._failing_since is not None:
                log.warning("ckptd: object store reachable again after %.0f s", self.outage_seconds)
                self._failing_since = None
        except Exception as e:
            self._settle([job], error=e)
            return
        now = time.monotonic()
        with self._lock:
            self._queued.remove(job)
            key = (job.step, job.manifest.attempt)
            waiting = self._waiting.setdefault(key, _Waiting([], 0.0, now, self.config.poll))
            waiting.jobs.append(job)
            waiting.deadline, waiting.next_check, waiting.interval = (
                now + self.config.ranks_timeout,
                now,
                self.config.poll,
            )

    def _check_waiting(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [(k, w) for k, w in self._waiting.items() if w.next_check <= now]
        for key, w in due:
            first = w.jobs[0]
            try:
                w.problems = try_commit(self.remote, first.manifest, first.data)
            except StoreError as e:
                w.problems = [f"the store failed: {e}"]
            except Exception as e:
                self._settle(w.jobs, error=e, key=key)
                continue
            if not w.problems:
                self._settle(w.jobs, key=key)
            elif time.monotonic() > w.deadline:
                self._settle(
                    w.jobs,
                    key=key,
                    error=SnapshotError(
                        f"snapshot of step {key[0]} was not committed in {self.remote.uri}: after "
                        f"{self.config.ranks_timeout:.0f} s, " + "; ".join(w.problems)
                    ),
                )
            else:
                w.interval = min(w.interval * 1.5, self.config.poll_max)
                w.next_check = time.monotonic() + w.interval

    def _settle(
        self, jobs: list[UploadJob], *, error: BaseException | None = None, key: tuple[int, str] | None = None
    ) -> None:
        with self._lock:
            if key is not None:
                self._waiting.pop(key, None)
            for j in jobs:
                if j in self._queued:
                    self._queued.remove(j)
        for j in jobs:
            if error is not None:
                j.future.set_exception(error)
                continue
            if self._on_durable is not None:
                try:
                    self._on_durable(j)
                except Exception:  # retention after a commit must not fail the commit
                    log.exception("ckptd: after step %d became durable", j.step)
            j.future.set_result(j.step)

    def _fail_rest(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                self._settle(
                    [job], error=SnapshotError(f"snapshot of step {job.step} was not promoted: uploader closed")
                )
        with self._lock:
            queued, self._queued = list(self._queued), []
            waiting, self._waiting = dict(self._waiting), {}
        for j in queued:
            j.future.set_exception(SnapshotError(f"snapshot of step {j.step} was not promoted: uploader closed"))
        for (step, _a), w in waiting.items():
            err = SnapshotError(
                f"snapshot of step {step} was not committed in {self.remote.uri} before the "
                "uploader closed: " + ("; ".join(w.problems) or "other ranks' parts missing")
            )
            for j in w.jobs:
                j.future.set_exception(err)
