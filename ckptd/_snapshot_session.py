"""The hook's snapshot data path: stage into the pool, write and commit in the background, track durability.

``start()`` runs on the training thread: it copies what changes outside
``optimizer.step()`` at once and leaves parameters and optimizer state to a
background copy, which ``before_optimizer_step`` waits for only if it has not
finished. The ``ckptd-persist`` thread writes, commits locally and hands the
commit to persistence; failures are kept in a FailureLog and reach the caller
at the next ``report()`` or ``wait()``.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from typing import Any

import torch

from ._owned import Owned
from ._persist_client import PersistClient
from .errors import CkptdError, SnapshotError
from .measure import Measurements
from .persist.tiers import Tiers
from .restore.find import SnapshotInfo
from .snapshot.assign import Assignment, spec_of
from .snapshot.capture import TrainingState, summarize
from .snapshot.direct import DirectWriter
from .snapshot.dirs import LocalCommit
from .snapshot.failures import FailureLog
from .snapshot.flatten import Leaf, flatten, is_empty
from .snapshot.lifecycle import SnapshotHandle, SnapshotState
from .snapshot.manifest import Manifest, step_dir
from .snapshot.stage import HostPool, make_stager
from .snapshot.write import Ranks, fail_everywhere, write_snapshot

log = logging.getLogger("ckptd")


@dataclass(frozen=True, kw_only=True)
class SessionParts:
    """What a SnapshotSession works with and does not own."""

    state: TrainingState
    ranks: Ranks
    tiers: Tiers
    persistence: PersistClient
    fence: Callable[[], None]
    """Raises when the store's lease is no longer this job's; called before each local commit."""
    measure: Measurements


class SnapshotSession:
    """Owns the staging pool, the stager, the O_DIRECT writer and the persist thread.

    ``start``, ``prepare``, ``report`` and ``wait`` are for the training thread; the
    persist thread completes the handles. ``close()`` releases everything.
    """

    def __init__(self, parts: SessionParts, *, overlap: bool, budget: int | None, reserve: int) -> None:
        self._parts = parts
        self._overlap = overlap
        self._owned = Owned("the snapshot session")
        try:
            self._pool = self._owned.keep(
                HostPool(pin=torch.cuda.is_available(), budget=budget, reserve=reserve), HostPool.close
            )
            self._stager = self._owned.keep(make_stager(), lambda s: s.close())
            self._writer = self._owned.keep(DirectWriter(), DirectWriter.close)
            self._persist = self._owned.keep(
                ThreadPoolExecutor(1, thread_name_prefix="ckptd-persist"), lambda ex: ex.shutdown(wait=True)
            )
        except BaseException:
            self._owned.release()
            raise
        self._pool_free = threading.Event()
        self._pool_free.set()
        self._pending_stage: Future | None = None
        self._inflight: list[SnapshotHandle] = []
        self._lock = threading.Lock()
        self._failures = FailureLog()
        self._warned_backlog = False
        self._pool_prepared = False
        self._assignment: tuple[Assignment, str] | None = None
        """Which rank writes what, learned from the last snapshot DCP wrote (several ranks only)."""

    @property
    def nbytes(self) -> int:
        """Bytes of staging memory held."""
        return self._pool.nbytes

    def in_flight(self) -> int:
        """Snapshots started and not yet durable (or failed)."""
        return sum(1 for h in self._inflight if not h.durable.done())

    # -- the training thread -------------------------------------------------

    def start(self, step: int, metrics: dict[str, float], meta: dict[str, Any]) -> SnapshotHandle:
        """Stage step ``step`` (parameters and optimizer state in the background) and queue its write.

        Every rank of a job starts the same steps; one that cannot stage its share still joins the attempt's
        first collective, with its error, so the others fail the step at once instead of waiting for it.
        """
        t0 = time.perf_counter()
        log.debug("ckptd: step %d: staging", step)
        self._wait_for_pool(step)
        try:
            return self._stage(step, metrics, meta, t0)
        except Exception as e:
            ranks = self._parts.ranks
            if ranks.distributed:
                self._persist.submit(self._fail_everywhere, step, e)
            raise

    def _stage(self, step: int, metrics: dict[str, float], meta: dict[str, Any], t0: float) -> SnapshotHandle:
        p = self._parts
        handle = SnapshotHandle(step, started=time.monotonic())
        captured = p.state.capture(p.ranks.rank)
        everything = flatten(captured)
        leaves, share = self._share_of(everything)
        tensors = {leaf.fqn: leaf.value for leaf in leaves if isinstance(leaf.value, torch.Tensor)}
        bufs = self._pool.buffers_for(tensors, step=step)
        deferred = p.state.deferred_ptrs() if self._overlap else set()
        now_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        later_pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        for fqn, t in tensors.items():
            (later_pairs if t.data_ptr() in deferred else now_pairs).append((t, bufs[fqn]))
        self._stager.copy(now_pairs, wait=True).result()
        staged = [
            Leaf(leaf.fqn, leaf.path, bufs[leaf.fqn] if leaf.fqn in bufs else copy.deepcopy(leaf.value))
            for leaf in leaves
        ]
        self._pool_free.clear()
        handle.staged = self._stager.copy(later_pairs, wait=False)
        self._pending_stage = handle.staged
        meta = {**meta, "pool_bytes": self._pool.nbytes, "pid": os.getpid(), "groups": summarize(captured)}
        handle.stall = time.perf_counter() - t0
        with self._lock:
            self._inflight.append(handle)
        order = [leaf.fqn for leaf in everything]
        self._persist.submit(self._write, handle, staged, dict(metrics), meta, (order, share))
        p.measure.snapshot_started(step, time.monotonic())
        return handle

    def _wait_for_pool(self, step: int) -> None:
        if self._pool_free.is_set():
            return
        level = logging.DEBUG if self._warned_backlog else logging.WARNING
        self._warned_backlog = True
        log.log(
            level,
            "ckptd: step %d waits for the previous snapshot's write; snapshots come "
            "faster than they persist, so lengthen the interval",
            step,
        )
        self._pool_free.wait()

    def prepare(self) -> None:
        """Lay out the staging pool in the background once, after the optimizer has its state."""
        state = self._parts.state
        if self._pool_prepared or not self._pool_free.is_set() or any(not o.state for o in state.optimizers):
            return
        self._pool_prepared = True
        try:
            leaves, _ = self._share_of(flatten(state.capture(self._parts.ranks.rank)))
        except CkptdError:
            return  # the snapshot itself reports what is wrong with the state
        self._pool.prepare({leaf.fqn: leaf.value for leaf in leaves if isinstance(leaf.value, torch.Tensor)})

    def _share_of(self, leaves: list[Leaf]) -> tuple[list[Leaf], str]:
        """This rank's share of the state while the job's assignment fits what it holds, and the attempt the
        assignment was learned from; else all of the state and ''."""
        learned = self._assignment
        if learned is None:
            return leaves, ""
        assignment, source = learned
        share = assignment.share(
            self._parts.ranks.rank,
            {leaf.fqn: spec_of(leaf.value) for leaf in leaves if isinstance(leaf.value, torch.Tensor)},
            [leaf.fqn for leaf in leaves if not isinstance(leaf.value, torch.Tensor) and not is_empty(leaf.value)],
        )
        if share is None:
            log.info("ckptd: the state's names or shapes changed; the next snapshot goes through dcp.save")
            self._assignment = None
            return leaves, ""
        return [leaf for leaf in leaves if leaf.fqn in share or is_empty(leaf.value)], source

    def before_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """The optimizer pre-hook: parameters may change only once the background copy has them."""
        fut = self._pending_stage
        if fut is None:
            return
        if not fut.done():
            t0 = time.perf_counter()
            wait_futures([fut])
            waited = time.perf_counter() - t0
            for h in self._inflight:
                if h.staged is fut:
                    h.stall += waited
        self._pending_stage = None

    def report(self, *, raise_errors: bool) -> None:
        """Warn (or raise, with ``raise_errors``) about background failures not reported yet."""
        self._prune()
        if self._failures and raise_errors:
            self._failures.raise_all()
        self._failures.warn_new()

    def record_failure(self, step: int, what: str, e: BaseException) -> None:
        """A snapshot that failed before it started; reported like a background failure."""
        self._failures.record(step, what, e)

    def wait(self, timeout: float, *, step_seen: int) -> None:
        """Wait up to ``timeout`` seconds for every snapshot in flight to be durable; raise what failed."""
        deadline = time.monotonic() + timeout
        handles = list(self._inflight)
        wait_futures([h.staged for h in handles], timeout=timeout)
        futures = [h.durable for h in handles]
        self._parts.persistence.wait_reported(futures, step_seen, deadline)
        _, pending = wait_futures(futures, timeout=max(0.0, deadline - time.monotonic()))
        if pending:
            tiers = self._parts.tiers
            late = sorted(h.step for h in handles if h.durable in pending)
            why = "; ".join(f"step {s}: {tiers.detail(s)}" for s in late)
            raise SnapshotError(
                f"snapshots of steps {late} are not durable after {timeout:.0f} s ({why}); "
                f"they are kept in {tiers.local.root}"
            )
        self._prune()
        self._failures.raise_all()

    def close(self) -> None:
        self._owned.release()

    def _prune(self) -> None:
        with self._lock:
            self._inflight = [h for h in self._inflight if not h.durable.done()]

    # -- the persist thread ----------------------------------------------------

    def _write(
        self, handle: SnapshotHandle, leaves: list[Leaf], metrics: dict, meta: dict, shared: tuple[list[str], str]
    ) -> None:
        p = self._parts
        try:
            unready = self._ready_to_write(handle)
            meta["stall_s"] = handle.stall
            done = write_snapshot(
                p.tiers.local,
                handle.step,
                leaves,
                p.ranks,
                metrics=metrics,
                meta=meta,
                fence=p.fence,
                image=self._pool.image,
                writer=self._writer,
                order=shared[0],
                share=shared[1],
                failed=unready,
            )
            self._learn(done.manifest)
            handle.advance(SnapshotState.WRITTEN)
            handle.advance(SnapshotState.COMMITTED)
        except BaseException as e:
            self._fail(handle, "failed", e)
            return
        finally:  # after a failure is recorded, so the next snapshot's step() sees it
            self._pool_free.set()
        log.debug("ckptd: step %d: committed", handle.step)
        p.measure.stall(handle.stall)
        durable = p.persistence.committed(done)
        self._retain(p.tiers.retain_local, handle.step)
        durable.add_done_callback(lambda fut: self._durable(handle, done, fut))

    def _ready_to_write(self, handle: SnapshotHandle) -> BaseException | None:
        """None once the background copy is done and the local tier has room; else why not. Several ranks
        hand the reason to write_snapshot, which fails the step on every rank at its first collective."""
        try:
            handle.staged.result()
            handle.advance(SnapshotState.STAGED)
            log.debug("ckptd: step %d: staged, writing", handle.step)
            if not self._parts.tiers.make_room(int(self._pool.nbytes * 1.1)):
                raise SnapshotError(
                    f"local tier {self._parts.tiers.local.root} is full and holds nothing durable to drop; "
                    "snapshot skipped: free space there or point local= at a larger disk"
                )
        except Exception as e:
            if not self._parts.ranks.distributed:
                raise
            return e
        return None

    def _fail_everywhere(self, step: int, e: BaseException) -> None:
        try:
            fail_everywhere(self._parts.tiers.local, step, self._parts.ranks, e)
        except CkptdError as told:  # the training thread reported this rank's own failure already
            log.debug("ckptd: step %d: %s", step, told)

    def _learn(self, manifest: Manifest) -> None:
        """After a snapshot dcp.save wrote for several ranks, each lays out its image for its own share."""
        if manifest.world_size == 1 or manifest.meta.get("io") != "dcp":
            return
        assignment = Assignment.from_items(manifest.items, manifest.world_size)
        if assignment is not None:
            self._assignment = (assignment, manifest.attempt)
            self._pool_prepared = False  # the next step lays out this rank's share in the background

    def _durable(self, handle: SnapshotHandle, done: LocalCommit, fut: Future) -> None:
        error = fut.exception()
        if error is not None:
            self._fail(handle, "was committed locally but not in the object store", error)
            return
        tiers = self._parts.tiers
        handle.advance(SnapshotState.DURABLE)
        log.debug("ckptd: step %d: durable", handle.step)
        tiers.release(done)
        self._retain(tiers.retain_remote, handle.step)
        self._parts.measure.persist(time.monotonic() - handle.started)
        m = done.manifest
        where = tiers.local if tiers.remote is None else tiers.remote
        kept = ("local",) if tiers.remote is None else (("local", "s3") if done.whole else ("s3",))
        handle.durable.set_result(
            SnapshotInfo(
                m.step, m.created_at, m.nbytes, True, kept, f"{where.uri}/{step_dir(m.step)}", m.world_size, m.metrics
            )
        )

    def _fail(self, handle: SnapshotHandle, what: str, e: BaseException) -> None:
        handle.advance(SnapshotState.FAILED)
        handle.durable.set_exception(self._failures.record(handle.step, what, e))

    def _retain(self, apply: Callable[[int], object], step: int) -> None:
        try:
            apply(step)
        except (OSError, CkptdError) as e:
            log.warning("ckptd: retention after step %d failed: %s", step, e)
