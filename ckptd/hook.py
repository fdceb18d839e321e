"""The hook in the training loop: Checkpointer and attach tie the parts together.

``step()`` asks the policy and, when it says so, captures references, copies
what changes outside ``optimizer.step()`` at once, and leaves parameters and
optimizer state to a background copy that the next ``optimizer.step()``
waits for only if it has not finished. Writing and committing run on a
background thread; errors come back at the next ``step()``, ``wait()`` or
``close()`` with the snapshot's step.
"""

from __future__ import annotations

import copy
import logging
import os
import threading
import time
import warnings
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from typing import Any

import torch
import torch.distributed as dist

from . import _job
from ._persist_client import PersistClient
from ._restore_session import agree, choose
from .config import CheckpointerConfig
from .errors import CkptdError, ConfigError, NoGoodSnapshot, NoSnapshot, SnapshotError
from .ledger.recorders import TrainingRecorder
from .measure import Measurements
from .persist import retention
from .persist.lease import env_job_id
from .persist.tiers import Tiers, default_local_dir
from .persist.uploader import UploadConfig
from .policy import PolicyContext, SnapshotPolicy, parse_policy
from .preempt import EXIT_PREEMPTED, PreemptionWatch
from .progress import ProgressWriter
from .restore.fallback import newest_readable, refetching
from .restore.find import SnapshotInfo
from .restore.load import Destinations, read_state
from .restore.verify import checksums_on_load
from .snapshot.capture import TrainingState, summarize
from .snapshot.direct import DirectWriter
from .snapshot.dirs import LocalCommit
from .snapshot.failures import FailureLog, SnapshotFailedWarning
from .snapshot.flatten import Leaf, flatten
from .snapshot.lifecycle import SnapshotHandle, SnapshotState
from .snapshot.manifest import Manifest, step_dir
from .snapshot.rng import restore_rng
from .snapshot.stage import HostPool, make_stager
from .snapshot.write import write_snapshot
from .store import open_store
from .store.file import FileStore
from .supervisor import run_history

log = logging.getLogger("ckptd")
# boto says at INFO where it found credentials and endpoints, on every client: not the job's business.
for _name in ("botocore.credentials", "botocore.configprovider"):
    if logging.getLogger(_name).level == logging.NOTSET:
        logging.getLogger(_name).setLevel(logging.WARNING)

__all__ = ["Checkpointer", "attach", "SnapshotFailedWarning", "EXIT_PREEMPTED"]


def _resolve_policy(policy: Any) -> SnapshotPolicy:
    if policy is None:
        from .policy import RiskAwarePolicy

        return RiskAwarePolicy()
    if isinstance(policy, str):
        return parse_policy(policy)
    if not callable(getattr(policy, "should_snapshot", None)):
        raise ConfigError(f"policy={policy!r} has no should_snapshot(*, ctx); use 'every:N', 'every:30s' or None")
    return policy


class Checkpointer:
    """Snapshots training state asynchronously and restores it.

    Use from the training thread only; the background threads it owns are
    released by ``close()`` (or the ``with`` block).
    """

    def __init__(
        self,
        store: str | None = None,
        *,
        model: Any,
        optimizer: Any = None,
        scheduler: Any = None,
        extra: dict[str, Any] | None = None,
        loader: Any = None,
        policy: Any = None,
        **options: Any,
    ) -> None:
        self.config = CheckpointerConfig.from_options(options)
        store = store if store is not None else os.environ.get("CKPTD_STORE")
        if not store:
            raise ConfigError("no store given: pass a path or URI, or set CKPTD_STORE")
        self.state = TrainingState(model=model, optimizer=optimizer, scheduler=scheduler, extra=extra, loader=loader)
        self.policy = _resolve_policy(policy)
        self._closed = True  # until every resource below exists; close() then releases what was made
        self._hooks: list = []
        self._opened: list = []
        try:
            self._open(store)
        except BaseException:
            self._release()
            raise
        self._closed = False

    def _open(self, store: str) -> None:
        """Acquire, in order, everything the Checkpointer owns; ``_release`` undoes it."""
        rule = retention.Retention(
            keep_last=self.config.keep_last, keep_every=self.config.keep_every, grace=self.config.incomplete_grace
        )
        opened = open_store(store)
        self._opened.append(opened.close)
        is_file = isinstance(opened, FileStore)
        if is_file and self.config.local is not None:
            raise ConfigError(
                f"local={self.config.local!r} applies to object stores; {opened.uri} is already local: drop local="
            )
        local = (
            opened.root
            if isinstance(opened, FileStore)
            else (self.config.local or default_local_dir(opened.uri, env_job_id()))
        )
        self._place = _job.join(
            opened, local, take_over=self.config.take_over, lease_ttl=self.config.lease_ttl, shared_store=is_file
        )
        self._opened.append(self._place.close)
        self._ranks, self._decide_group = self._place.ranks, self._place.decide_group
        link = _connect_daemon(store, self._ranks, local)  # the health watcher, and the uploader when remote
        tiers = Tiers(
            opened,
            local=None if is_file else local,
            rank=self._ranks.rank,
            world_size=self._ranks.world_size,
            rule=rule,
            external=link is not None and not is_file,
            upload=UploadConfig(ranks_timeout=self.config.ranks_timeout),
        )
        self._persistence = PersistClient(tiers, link)
        self._opened.append(lambda: self._persistence.close(wait=False))
        self.tiers = tiers
        self.store: FileStore = tiers.local
        self.measure = Measurements()
        self._pool = HostPool(
            pin=torch.cuda.is_available(), budget=self.config.staging_budget, reserve=self.config.memory_reserve
        )
        self._opened.append(self._pool.close)
        self._stager = make_stager()
        self._opened.append(self._stager.close)
        self._writer = DirectWriter()
        self._opened.append(self._writer.close)
        self._persist = ThreadPoolExecutor(1, thread_name_prefix="ckptd-persist")
        self._opened.append(lambda: self._persist.shutdown(wait=True))
        self._pool_free = threading.Event()
        self._pool_free.set()
        self._pending_stage: Future | None = None
        self._inflight: list[SnapshotHandle] = []
        self._failures = FailureLog()
        self._lock = threading.Lock()
        self._force: str | None = None
        self._auto_step: int | None = None
        self._attach_mode = False
        self._warned_backlog = False
        self._pool_prepared = False
        self._step_seen = 0
        self._progress = ProgressWriter(
            ledger=TrainingRecorder.open(
                tiers.remote or tiers.local,
                job=self._ranks.job,
                rank=self._ranks.rank,
                gpus=self.config.gpus or self._ranks.world_size,
                policy=self.policy,
            )
        )
        self._opened.append(self._progress.close)
        self._preempt = PreemptionWatch() if self.config.handle_sigterm else None
        if self._preempt is not None:
            self._opened.append(self._preempt.uninstall)
        self._hooks = [opt.register_step_pre_hook(self._before_optimizer_step) for opt in self.state.optimizers]
        self._failures_told = 0
        restarts, seconds = run_history()
        record_hours = getattr(self.policy, "record_hours", None)
        if seconds and callable(record_hours):
            record_hours(seconds / 3600.0)
        self._record_failures(restarts)

    def _release(self) -> None:
        """Release what ``_open`` acquired, newest first; later failures do not hide earlier ones."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        while self._opened:
            undo = self._opened.pop()
            try:
                undo()
            except Exception:
                log.exception("ckptd: while releasing the Checkpointer's resources")

    # -- the training loop ------------------------------------------------

    def step(self, step: int, **metrics: float) -> bool:
        """Call after step ``step`` finished; True when it started a snapshot."""
        now = time.monotonic()
        self._step_seen = step
        self.measure.step_done(now)
        self._progress.step(step)
        self._talk_to_daemon(step)
        self._report_failures()
        if self._preempt is not None and self._preempt.requested:
            self._exit_preempted(step, metrics)
        if not self._decide(self._wants_snapshot(step, now)):
            self._prepare_pool()
            return False
        self._force = None
        try:
            self._start(step, metrics)
        except CkptdError as e:
            self._failures.record(step, "was not taken", e)
            self._report_failures()
            return False
        return True

    def save(self, step: int, **metrics: float) -> SnapshotHandle:
        """Take a snapshot now; waits until staging memory is free. Returns its handle."""
        self._check_open()
        return self._start(step, metrics)

    def request_snapshot(self, reason: str) -> None:
        """Make the next ``step()`` snapshot whatever the policy says (a fault, a preemption)."""
        log.warning("ckptd: snapshot requested: %s", reason)
        self._force = reason

    def wait(self, timeout: float | None = None) -> None:
        """Wait for every snapshot in flight to be durable; re-raise a failure with its step.

        ``timeout`` defaults to the ``close_timeout`` option; nothing waits forever.
        """
        timeout = self.config.close_timeout if timeout is None else timeout
        deadline = time.monotonic() + timeout
        handles = list(self._inflight)
        wait_futures([h.staged for h in handles], timeout=timeout)
        futures = [h.durable for h in handles]
        self._persistence.wait_reported(futures, self._step_seen, deadline)
        _, pending = wait_futures(futures, timeout=max(0.0, deadline - time.monotonic()))
        if pending:
            late = sorted(h.step for h in handles if h.durable in pending)
            why = "; ".join(f"step {s}: {self.tiers.detail(s)}" for s in late)
            raise SnapshotError(
                f"snapshots of steps {late} are not durable after {timeout:.0f} s ({why}); "
                f"they are kept in {self.store.root}"
            )
        self._prune()
        self._failures.raise_all()

    def close(self, timeout: float | None = None) -> None:
        """Wait (bounded, see ``wait``) until the last snapshot is durable, release everything, re-raise failures."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait(timeout)
        finally:
            self._release()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        try:
            self.close()
        except CkptdError as e:  # the escaping exception matters more
            log.error("ckptd: %s", e)

    def snapshots(self) -> list[SnapshotInfo]:
        """Snapshots in every tier of this Checkpointer's store, oldest first."""
        return self.tiers.list()

    @property
    def backlog(self) -> list[int]:
        """Steps committed locally that are not yet durable in the object store."""
        return self.tiers.backlog

    def stats(self) -> dict[str, Any]:
        """Staging memory, median step/stall/persist seconds, the upload backlog and the daemon in use."""
        return {
            "pool_bytes": self._pool.nbytes,
            "backlog": self.backlog,
            "daemon": self._persistence.uses_daemon,
            **self.measure.summary(),
        }

    # -- restore ------------------------------------------------------------

    def restore(self, step: int | None = None) -> int:
        """Load the newest verified snapshot (or ``step``); return the next step to run, 0 if none."""
        self._check_open()
        with checksums_on_load():  # each file is read once, checksummed as it is loaded
            return self._restore(step)

    def _restore(self, step: int | None) -> int:
        into = self._destinations()
        try:
            manifest, state = self._read_agreed(step, into)
        except NoGoodSnapshot as e:
            if self.config.on_bad_snapshots != "start_over":
                raise
            if into.touched:
                raise NoGoodSnapshot(
                    f"{e}; the model and optimizer now hold part of a snapshot that failed as it "
                    "was read into them, so they cannot start over: build them again and restore, "
                    "or remove the bad snapshots",
                    problems=e.problems,
                ) from e
            log.error("ckptd: %s; starting over from step 0 (on_bad_snapshots='start_over')", e)
            manifest = None
        if manifest is None:
            if step is not None:
                raise NoSnapshot(f"{self.store.uri} has no snapshot of step {step}")
            log.info("ckptd: no snapshot in %s; starting from step 0", self.store.uri)
            self._progress.event("restored", step=None)
            return 0
        directory = self.store.path_of(step_dir(manifest.step))
        rng = self.state.apply(state, rank=self._ranks.rank)
        if self._attach_mode and manifest.meta.get("attach"):
            self._catch_up_schedulers()
        notes = restore_rng(rng or {}, reseed=manifest.step * 1000 + self._ranks.rank)
        if rng is None:
            notes.insert(0, f"no RNG state of rank {self._ranks.rank} in the snapshot: generators reseeded")
        for note in notes:
            warnings.warn(f"ckptd: {note}", stacklevel=2)
        self.measure.snapshot_started(manifest.step, time.monotonic())
        if self._auto_step is not None:
            self._auto_step = manifest.step + 1
        log.info("ckptd: restored step %d from %s", manifest.step, directory)
        self._progress.event("restored", step=manifest.step)
        return manifest.step + 1

    def _read_agreed(self, step: int | None, into: Destinations) -> tuple[Manifest | None, Any]:
        """The snapshot every rank restores and this rank's state of it (see restore/fallback.py)."""
        return newest_readable(
            lambda s, below: choose(self.tiers, self._ranks, self._decide_group, s, below=below),
            refetching(self.tiers, lambda m: read_state(self.store.path_of(step_dir(m.step)), m, into=into.fit(m))),
            step=step,
            where=self.store.uri,
            agree=lambda problem: agree(self._ranks, self._decide_group, problem),
        )

    def _destinations(self) -> Destinations:
        """The model's and optimizers' own tensors, which a restore reads into in place."""
        try:
            leaves = flatten(self.state.capture(self._ranks.rank))
        except CkptdError:
            return Destinations()
        return Destinations(
            {
                leaf.fqn: leaf.value
                for leaf in leaves
                if isinstance(leaf.value, torch.Tensor) and leaf.path[0][1] in ("model", "optimizer")
            }
        )

    def _catch_up_schedulers(self) -> None:
        # attach() snapshots inside optimizer.step(), before the loop's scheduler.step().
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for sched in self.state.schedulers:
                sched.step()

    # -- policy -------------------------------------------------------------

    def context(self, step: int, now: float | None = None) -> PolicyContext:
        """What the policy sees now."""
        now = time.monotonic() if now is None else now
        in_flight = sum(1 for h in self._inflight if not h.durable.done())
        return self.measure.context(
            step,
            now,
            in_flight=in_flight,
            gpus=self.config.gpus or self._ranks.world_size,
            nbytes=self._pool.nbytes or None,
        )

    def _wants_snapshot(self, step: int, now: float) -> bool:
        if self._ranks.rank != 0:
            return False
        if self._force is not None:
            return True
        return bool(self.policy.should_snapshot(ctx=self.context(step, now)))

    def _decide(self, mine: bool) -> bool:
        if not self._ranks.distributed:
            return mine
        flag = torch.tensor([1 if mine else 0], dtype=torch.int32)
        dist.broadcast(flag, src=0, group=self._decide_group)
        return bool(flag.item())

    def _exit_preempted(self, step: int, metrics: dict[str, float]) -> None:
        """SIGTERM arrived: snapshot this step, wait for it within the grace period, exit 75."""
        log.warning("ckptd: SIGTERM: emergency snapshot of step %d", step)
        try:
            self._start(step, metrics)
            self.close(timeout=self._preempt.remaining(self.config.grace) if self._preempt else self.config.grace)
            self._progress.event("preempted", step=step)
        except CkptdError as e:
            log.error("ckptd: emergency snapshot of step %d failed: %s", step, e)
        raise SystemExit(EXIT_PREEMPTED)

    # -- the snapshot data path ---------------------------------------------

    def _start(self, step: int, metrics: dict[str, float]) -> SnapshotHandle:
        t0 = time.perf_counter()
        log.debug("ckptd: step %d: staging", step)
        if not self._pool_free.is_set():
            level = logging.DEBUG if self._warned_backlog else logging.WARNING
            self._warned_backlog = True
            log.log(
                level,
                "ckptd: step %d waits for the previous snapshot's write; snapshots come "
                "faster than they persist, so lengthen the interval",
                step,
            )
            self._pool_free.wait()
        handle = SnapshotHandle(step, started=time.monotonic())
        captured = self.state.capture(self._ranks.rank)
        leaves = flatten(captured)
        tensors = {leaf.fqn: leaf.value for leaf in leaves if isinstance(leaf.value, torch.Tensor)}
        bufs = self._pool.buffers_for(tensors, step=step)
        deferred = self.state.deferred_ptrs() if self.config.overlap else set()
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
        meta = {
            "attach": self._attach_mode,
            "pool_bytes": self._pool.nbytes,
            "pid": os.getpid(),
            "policy": _policy_note(self.policy),
            "groups": summarize(captured),
        }
        handle.stall = time.perf_counter() - t0
        with self._lock:
            self._inflight.append(handle)
        self._persist.submit(self._write, handle, staged, dict(metrics), meta)
        self.measure.snapshot_started(step, time.monotonic())
        self._progress.snapshot(step, handle, self._pool.nbytes)
        return handle

    def _prepare_pool(self) -> None:
        """Lay out the staging pool in the background once, after the optimizer has its state."""
        if self._pool_prepared or not self._pool_free.is_set() or any(not o.state for o in self.state.optimizers):
            return
        self._pool_prepared = True
        try:
            leaves = flatten(self.state.capture(self._ranks.rank))
        except CkptdError:
            return  # the snapshot itself reports what is wrong with the state
        self._pool.prepare({leaf.fqn: leaf.value for leaf in leaves if isinstance(leaf.value, torch.Tensor)})

    def _write(self, handle: SnapshotHandle, leaves: list[Leaf], metrics: dict, meta: dict) -> None:
        try:
            handle.staged.result()
            handle.advance(SnapshotState.STAGED)
            log.debug("ckptd: step %d: staged, writing", handle.step)
            if not self.tiers.make_room(int(self._pool.nbytes * 1.1)):
                raise SnapshotError(
                    f"local tier {self.store.root} is full and holds nothing durable to drop; "
                    "snapshot skipped: free space there or point local= at a larger disk"
                )
            meta["stall_s"] = handle.stall
            done = write_snapshot(
                self.store,
                handle.step,
                leaves,
                self._ranks,
                metrics=metrics,
                meta=meta,
                fence=self._place.fence,
                image=self._pool.image,
                writer=self._writer,
            )
            handle.advance(SnapshotState.WRITTEN)
            handle.advance(SnapshotState.COMMITTED)
        except BaseException as e:
            self._fail(handle, "failed", e)
            return
        finally:  # after a failure is recorded, so the next snapshot's step() sees it
            self._pool_free.set()
        log.debug("ckptd: step %d: committed", handle.step)
        self.measure.stall(handle.stall)
        durable = self._persistence.committed(done)
        self._retain(self.tiers.retain_local, handle.step)
        durable.add_done_callback(lambda fut: self._durable(handle, done, fut))

    def _durable(self, handle: SnapshotHandle, done: LocalCommit, fut: Future) -> None:
        error = fut.exception()
        if error is not None:
            self._fail(handle, "was committed locally but not in the object store", error)
            return
        handle.advance(SnapshotState.DURABLE)
        log.debug("ckptd: step %d: durable", handle.step)
        self.tiers.release(done)
        self._retain(self.tiers.retain_remote, handle.step)
        self.measure.persist(time.monotonic() - handle.started)
        m = done.manifest
        where = self.store if self.tiers.remote is None else self.tiers.remote
        tiers = ("local",) if self.tiers.remote is None else (("local", "s3") if done.whole else ("s3",))
        handle.durable.set_result(
            SnapshotInfo(
                m.step, m.created_at, m.nbytes, True, tiers, f"{where.uri}/{step_dir(m.step)}", m.world_size, m.metrics
            )
        )

    def _fail(self, handle: SnapshotHandle, what: str, e: BaseException) -> None:
        handle.advance(SnapshotState.FAILED)
        handle.durable.set_exception(self._failures.record(handle.step, what, e))

    def _retain(self, apply, step: int) -> None:
        try:
            apply(step)
        except (OSError, CkptdError) as e:
            log.warning("ckptd: retention after step %d failed: %s", step, e)

    def _before_optimizer_step(self, optimizer, args, kwargs) -> None:
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

    # -- the node daemon ------------------------------------------------------

    def _talk_to_daemon(self, step: int) -> None:
        """Heartbeat the node daemon, if any, and act on its commands."""
        for cmd in self._persistence.heartbeat(step, self.measure.summary()["step_time_s"]):
            if cmd.kind == "snapshot_now":
                self.request_snapshot(cmd.reason)
            elif cmd.kind == "raise_risk" and callable(raise_risk := getattr(self.policy, "raise_risk", None)):
                raise_risk(cmd.factor, reason=cmd.reason)
            elif cmd.kind == "failures":  # the restarts under `ckptd run` already counted some of them
                self._record_failures(int(cmd.factor) - self._failures_told)

    def _record_failures(self, n: int) -> None:
        """Tell the policy of ``n`` more failures this job met (restarts, faults the daemon stopped it for)."""
        record_failure = getattr(self.policy, "record_failure", None)
        if n <= 0 or not callable(record_failure):
            return
        self._failures_told += n
        record_failure(n)
        log.info("ckptd: the policy counts %d failure(s) of this job so far", self._failures_told)

    # -- errors -------------------------------------------------------------

    def _report_failures(self) -> None:
        self._prune()
        if self._failures and self.config.on_error == "raise":
            self._failures.raise_all()
        self._failures.warn_new()

    def _prune(self) -> None:
        with self._lock:
            self._inflight = [h for h in self._inflight if not h.durable.done()]

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError("this Checkpointer is closed; create a new one")

    # -- attach -------------------------------------------------------------

    def _drive_from_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self._attach_mode = True
        self._auto_step = 0

        def after_step(opt, args, kwargs) -> None:
            step = self._auto_step or 0
            self._auto_step = step + 1
            self.step(step)

        self._hooks.append(optimizer.register_step_post_hook(after_step))


def attach(model: Any, optimizer: torch.optim.Optimizer, *, store: str | None = None, **kw: Any) -> Checkpointer:
    """A Checkpointer driven by ``optimizer.step()``: no ``ckpt.step`` call in the loop.

    Call ``restore()`` on the result before training; the step counter lives in the snapshot.
    """
    ckpt = Checkpointer(store, model=model, optimizer=optimizer, **kw)
    ckpt._drive_from_optimizer(optimizer)
    return ckpt


def _policy_note(policy: Any) -> dict[str, Any]:
    """The policy's last interval and risk, for the snapshot timeline (plain JSON values only)."""
    explain = getattr(policy, "explain", None)
    note = explain() if callable(explain) else {}
    return {k: note[k] for k in ("interval", "risk", "bound", "reason") if isinstance(note.get(k), (int, float, str))}


def _connect_daemon(store: str, ranks, local: str):
    """The node daemon's link when $CKPTD_SOCKET is set or the default socket exists, else None."""
    from .daemon.client import DaemonLink
    from .daemon.server import default_socket

    path = default_socket()
    if not os.environ.get("CKPTD_SOCKET") and not os.path.exists(path):
        return None
    devices = (torch.cuda.current_device(),) if torch.cuda.is_available() and torch.cuda.is_initialized() else ()
    link = DaemonLink.connect(
        path, rank=ranks.rank, devices=devices, store=store, local=local, job=ranks.job, world_size=ranks.world_size
    )
    if link is not None and threading.current_thread() is threading.main_thread():
        import faulthandler
        import signal

        faulthandler.register(signal.SIGUSR1, all_threads=True)  # the daemon's hang report
    return link
