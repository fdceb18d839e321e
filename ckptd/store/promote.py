"""Promote: upload committed local snapshots to the object store, in step order.

Each rank uploads its own files and then a marker; rank 0 commits the
manifest once every rank's marker is there, so a snapshot is committed in
the object store only when it is whole. Store errors are retried with
backoff while training goes on; the backlog is reported.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable

from ..errors import ConfigError, SnapshotCorrupt, SnapshotExists, StoreError
from ..snapshot.manifest import MANIFEST, Manifest, step_dir
from .base import Store
from .file import FileStore
from .transfer import already_committed, commit_once, upload_files

log = logging.getLogger("ckptd")


@dataclass(frozen=True, kw_only=True)
class PromoteConfig:
    """How the uploader retries and waits."""

    retry_initial: float = 0.5
    """Seconds before the first retry after a store error; doubles each time."""
    retry_max: float = 30.0
    """Longest wait between retries."""
    ranks_timeout: float = 600.0
    """Seconds rank 0 waits for every rank's files before it gives the snapshot up."""

    def __post_init__(self) -> None:
        if not 0 < self.retry_initial <= self.retry_max:
            raise ConfigError("PromoteConfig: need 0 < retry_initial <= retry_max")
        if self.ranks_timeout <= 0:
            raise ConfigError("PromoteConfig: ranks_timeout must be > 0 seconds")


def rank_marker(step: int, rank: int) -> str:
    return f"{step_dir(step)}/.rank-{rank}.done"


@dataclass
class _Job:
    step: int
    manifest: Manifest
    data: bytes
    future: Future


class Promoter:
    """Owns one upload thread; ``submit`` queues a committed local snapshot. Thread-safe."""

    def __init__(self, local: FileStore, remote: Store, *, rank: int = 0, world_size: int = 1,
                 on_durable: Callable[[int], None] | None = None, config: PromoteConfig | None = None) -> None:
        self.local, self.remote = local, remote
        self.rank, self.world_size = rank, world_size
        self.config = config or PromoteConfig()
        self._on_durable = on_durable
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._backlog: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failing_since: float | None = None
        self._thread = threading.Thread(target=self._run, name="ckptd-promote", daemon=True)
        self._thread.start()

    @property
    def backlog(self) -> list[int]:
        """Steps committed locally and not yet durable in the object store."""
        with self._lock:
            return list(self._backlog)

    @property
    def outage_seconds(self) -> float:
        """How long uploads have been failing, 0 when they are not."""
        return 0.0 if self._failing_since is None else time.monotonic() - self._failing_since

    def submit(self, manifest: Manifest, data: bytes) -> Future:
        """Queue a locally committed snapshot; the future completes when it is durable."""
        job = _Job(manifest.step, manifest, data, Future())
        with self._lock:
            self._backlog.append(job.step)
        self._queue.put(job)
        return job.future

    def close(self, *, wait: bool = True) -> None:
        """Stop after the queue drains (``wait``) or at once; unfinished futures fail."""
        if not wait:
            self._stop.set()
        self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._stop.is_set():
                job.future.set_exception(StoreError(f"snapshot of step {job.step} was not promoted: uploader closed"))
                continue
            try:
                self._promote_with_retry(job)
            except BaseException as e:
                job.future.set_exception(e)
            else:
                if self._on_durable is not None:
                    self._on_durable(job.step)
                job.future.set_result(job.step)
            finally:
                with self._lock:
                    self._backlog.remove(job.step)
        while not self._queue.empty():
            left = self._queue.get_nowait()
            if left is not None:
                left.future.set_exception(StoreError(f"snapshot of step {left.step} was not promoted: uploader closed"))

    def _promote_with_retry(self, job: _Job) -> None:
        delay = self.config.retry_initial
        while True:
            try:
                self._promote(job)
                if self._failing_since is not None:
                    log.warning("ckptd: object store reachable again after %.0f s", self.outage_seconds)
                self._failing_since = None
                return
            except (SnapshotExists, SnapshotCorrupt):
                raise
            except StoreError as e:
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                log.warning("ckptd: upload of step %d failed (%s); retrying in %.1f s; backlog %s",
                            job.step, e, delay, self.backlog)
                if self._stop.wait(delay):
                    raise StoreError(f"snapshot of step {job.step} was not promoted: uploader closed") from e
                delay = min(delay * 2, self.config.retry_max)

    def _promote(self, job: _Job) -> None:
        manifest_key = f"{step_dir(job.step)}/{MANIFEST}"
        if self.rank == 0 and already_committed(self.remote, job.step, job.data):
            return
        if self.rank != 0 and self.remote.exists(manifest_key):
            return
        upload_files(self.local, job.manifest, self.remote, rank=self.rank)
        if self.world_size > 1:
            self.remote.put_bytes(rank_marker(job.step, self.rank), b"")
        if self.rank == 0:
            if self.world_size > 1:
                self._wait_for(lambda: all(self.remote.exists(rank_marker(job.step, r))
                                           for r in range(self.world_size)), f"every rank's files of step {job.step}")
            commit_once(self.remote, job.step, job.data)
        else:
            self._wait_for(lambda: self.remote.exists(manifest_key), f"rank 0's commit of step {job.step}")

    def _wait_for(self, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + self.config.ranks_timeout
        while not done():
            if time.monotonic() > deadline:
                raise SnapshotCorrupt(f"gave up waiting for {what} in {self.remote.uri}")
            if self._stop.wait(0.2):
                raise StoreError(f"stopped while waiting for {what}")
