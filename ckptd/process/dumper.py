"""Images of a running job into the tiers: dump, commit, persist, retention; and what they cost (no torch).

One ``take()`` is one ``criu dump --leave-running`` into an attempt directory of the local tier, the
commit of ``image.commit``, then the same persist path as a tensor snapshot (the daemon's or this
process's uploader, retention on both tiers). The freeze each dump cost and the time until it was
durable are kept for the policy.
"""

from __future__ import annotations

import logging
import shutil
import statistics
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from .._persist_client import PersistClient
from ..errors import CkptdError, CriuFailed, SnapshotCorrupt, SnapshotExists
from ..persist.tiers import Tiers
from ..snapshot.dirs import LocalCommit
from ..snapshot.manifest import Manifest
from .criu import Criu
from .image import ProcessMeta, commit, kernel, next_step, start_attempt
from .job import JobProcess
from .probe import TreeView

log = logging.getLogger("ckptd")

_KEEP = 16
"""Measurements kept for the medians."""


@dataclass(frozen=True, kw_only=True)
class DumpTarget:
    """Whose images these are and where CRIU keeps its logs."""

    job: str
    command: tuple[str, ...]
    work: str
    """CRIU's work directory (its logs, ``stats-dump``), beside the images in the local tier."""


class Dumper:
    """Takes, commits and persists images of one job. The owner's thread calls ``take`` and ``settle``;
    durability callbacks come from the uploader's thread, hence the lock."""

    def __init__(
        self,
        criu: Criu,
        tiers: Tiers,
        persist: PersistClient,
        target: DumpTarget,
        *,
        fence: Callable[[], None],
    ) -> None:
        self.criu, self.tiers, self.persist, self.target = criu, tiers, persist, target
        self._fence = fence
        remote = [] if tiers.remote is None else [tiers.remote]
        self._next = next_step(tiers.local, *remote)
        self.taken = 0
        self.nbytes: int | None = None
        self._freeze: list[float] = []
        self._persist_s: list[float] = []
        self._pending: list[Future] = []
        self._failures = 0
        self._lock = threading.Lock()

    # -- what the policy reads ---------------------------------------------------------------

    @property
    def last_step(self) -> int:
        """The newest image's number (taken here or before), -1 when there is none."""
        return self._next - 1

    @property
    def freeze(self) -> float | None:
        """Median seconds the job was stopped per image (None before the first)."""
        return statistics.median(self._freeze) if self._freeze else None

    @property
    def persist_s(self) -> float | None:
        with self._lock:
            return statistics.median(self._persist_s) if self._persist_s else None

    @property
    def in_flight(self) -> int:
        with self._lock:
            return sum(not f.done() for f in self._pending)

    def restored(self, manifest: Manifest) -> None:
        """The job came back from ``manifest``: its recorded freeze stands in until one is measured here."""
        if not self._freeze and "freeze_s" in manifest.metrics:
            self._freeze.append(manifest.metrics["freeze_s"])
            self.nbytes = manifest.nbytes

    # -- images ----------------------------------------------------------------------------------

    def has_room(self) -> bool:
        """Room in the local tier for one more image (dropping durable ones if needed)."""
        return not self.nbytes or self.tiers.make_room(int(self.nbytes * 1.1))

    def take(self, job: JobProcess, view: TreeView, *, driver: str, reason: str) -> LocalCommit | None:
        """One image of ``job`` (as ``view`` saw it), committed locally and handed to the persist path;
        None if it failed (said once, then at the 2nd, 10th, 100th... failure)."""
        assert job.pid is not None
        step, self._next = self._next, self._next + 1
        attempt, directory = start_attempt(self.tiers.local, step)
        t0 = time.monotonic()
        try:
            stats = self.criu.dump(
                job.pid,
                directory,
                work=self.target.work,
                tcp_established=view.inside,
                plugins=view.gpu,
            )
            meta = ProcessMeta(
                command=self.target.command,
                criu=self.criu.version_text,
                kernel=kernel(),
                stdio=job.inodes,
                tcp_established=view.inside,
                driver=driver,
            )
            metrics = {"freeze_s": stats.frozen_s, "dump_s": time.monotonic() - t0, "pages": stats.pages_written}
            done = commit(
                self.tiers.local,
                directory,
                step=step,
                attempt=attempt,
                job=self.target.job,
                meta=meta,
                metrics=metrics,
                fence=self._fence,
            )
        except (CriuFailed, SnapshotExists, SnapshotCorrupt, OSError) as e:
            shutil.rmtree(directory, ignore_errors=True)
            self._failures += 1
            if job.alive() and (self._failures in (1, 2, 10, 100) or self._failures % 1000 == 0):
                log.warning("ckptd run: image of job %s failed (%d so far): %s", self.target.job, self._failures, e)
            return None  # a job that died during its dump: its exit is what matters
        self.taken += 1
        self._freeze = (self._freeze + [stats.frozen_s])[-_KEEP:]
        self.nbytes = done.manifest.nbytes
        durable = self.persist.committed(done)
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()] + [durable]
        self._retain(self.tiers.retain_local, step)
        durable.add_done_callback(lambda fut: self._durable(done, t0, fut))
        log.info(
            "ckptd run: image %d of job %s (%s): %.0f MB, frozen %.3f s, dump %.2f s",
            step,
            self.target.job,
            reason,
            done.manifest.nbytes / 1e6,
            stats.frozen_s,
            metrics["dump_s"],
        )
        return done

    def _durable(self, done: LocalCommit, started: float, fut: Future) -> None:
        if fut.exception() is not None:
            log.warning("ckptd run: image %d is local only: %s", done.manifest.step, fut.exception())
            return
        with self._lock:
            self._persist_s = (self._persist_s + [time.monotonic() - started])[-_KEEP:]
        self.tiers.release(done)
        self._retain(self.tiers.retain_remote, done.manifest.step)

    def _retain(self, apply, step: int) -> None:
        try:
            apply(step)
        except (OSError, CkptdError) as e:
            log.warning("ckptd run: retention after image %d failed: %s", step, e)

    def settle(self, deadline: float) -> None:
        """Wait until the images taken are durable, at most until ``deadline``; say which are not."""
        with self._lock:
            pending = [f for f in self._pending if not f.done()]
        if not pending:
            return
        self.persist.wait_reported(pending, self.taken, deadline)
        for f in pending:
            try:
                f.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # reported below: the run is ending anyway
                pass
        late = [f for f in pending if not f.done() or f.exception() is not None]
        if late:
            where = "this node's daemon goes on uploading" if self.persist.uses_daemon else "resume on this node"
            log.warning("ckptd run: %d image(s) not durable in the object store yet: %s", len(late), where)
