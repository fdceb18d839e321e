"""The hook in the training loop: Checkpointer and attach tie the parts together.

``step()`` asks the policy and, when it says so, captures references, copies
what changes outside ``optimizer.step()`` at once, and leaves parameters and
optimizer state to a background copy that the next ``optimizer.step()``
waits for only if it has not finished. Writing and committing run on a
background thread; errors come back at the next ``step()``, ``wait()`` or
``close()`` with the snapshot's step.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import warnings
from typing import Any

import torch
import torch.distributed as dist

from . import _job
from ._owned import Owned
from ._persist_client import PersistClient
from ._restore_session import Restorer
from ._snapshot_session import SessionParts, SnapshotSession
from .config import CheckpointerConfig
from .errors import CkptdError, ConfigError, NoSnapshot
from .ledger.recorders import TrainingRecorder
from .measure import Measurements
from .persist import retention
from .persist.lease import env_job_id
from .persist.tiers import Tiers, default_local_dir
from .persist.uploader import UploadConfig
from .policy import PolicyContext, SnapshotPolicy, parse_policy
from .preempt import EXIT_PREEMPTED, PreemptionWatch
from .progress import ProgressWriter
from .restore.find import SnapshotInfo
from .snapshot.capture import TrainingState
from .snapshot.failures import SnapshotFailedWarning
from .snapshot.lifecycle import SnapshotHandle
from .snapshot.manifest import step_dir
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
        self._owned = Owned("the Checkpointer's resources")
        self._force: str | None = None
        self._auto_step: int | None = None
        self._attach_mode = False
        self._step_seen = 0
        self._failures_told = 0
        try:
            self._open(store)
        except BaseException:
            self._owned.release()
            raise
        self._closed = False

    def _open(self, store: str) -> None:
        """Acquire, in order, everything the Checkpointer owns; ``_owned.release()`` undoes it."""
        rule = retention.Retention(
            keep_last=self.config.keep_last, keep_every=self.config.keep_every, grace=self.config.incomplete_grace
        )
        # first: the daemon may SIGTERM this job as soon as it registers (its GPU went bad before)
        self._preempt = PreemptionWatch() if self.config.handle_sigterm else None
        if self._preempt is not None:
            self._owned.keep(self._preempt, PreemptionWatch.uninstall)
        opened = self._owned.keep(open_store(store), lambda s: s.close())
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
        self._place = self._owned.keep(
            _job.join(
                opened, local, take_over=self.config.take_over, lease_ttl=self.config.lease_ttl, shared_store=is_file
            ),
            lambda place: place.close(),
        )
        self._ranks, self._decide_group = self._place.ranks, self._place.decide_group
        link = _connect_daemon(store, self._ranks, local)  # the health watcher, and the uploader when remote
        if link is not None:  # until PersistClient owns it (closing a socket twice is harmless)
            self._owned.keep(link, lambda lk: lk.close())
        tiers = Tiers(
            opened,
            local=None if is_file else local,
            rank=self._ranks.rank,
            world_size=self._ranks.world_size,
            rule=rule,
            external=link is not None and not is_file,
            upload=UploadConfig(ranks_timeout=self.config.ranks_timeout),
        )
        self._persistence = self._owned.keep(PersistClient(tiers, link), lambda p: p.close(wait=False))
        self.tiers = tiers
        self.store: FileStore = tiers.local
        self.measure = Measurements()
        parts = SessionParts(
            state=self.state,
            ranks=self._ranks,
            tiers=tiers,
            persistence=self._persistence,
            fence=self._place.fence,
            measure=self.measure,
        )
        self._session = self._owned.keep(
            SnapshotSession(
                parts,
                overlap=self.config.overlap,
                budget=self.config.staging_budget,
                reserve=self.config.memory_reserve,
            ),
            SnapshotSession.close,
        )
        self._restorer = Restorer(
            state=self.state,
            tiers=tiers,
            ranks=self._ranks,
            group=self._decide_group,
            on_bad_snapshots=self.config.on_bad_snapshots,
        )
        recorder = TrainingRecorder.open(  # the goodput ledger's training spans, in the store
            tiers.remote or tiers.local,
            job=self._ranks.job,
            rank=self._ranks.rank,
            gpus=self.config.gpus or self._ranks.world_size,
            policy=self.policy,
        )
        self._progress = self._owned.keep(ProgressWriter(ledger=recorder), ProgressWriter.close)
        for opt in self.state.optimizers:
            self._owned.keep(opt.register_step_pre_hook(self._session.before_optimizer_step), lambda h: h.remove())
        restarts, seconds = run_history()
        record_hours = getattr(self.policy, "record_hours", None)
        if seconds and callable(record_hours):
            record_hours(seconds / 3600.0)
        self._record_failures(restarts)

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
            self._session.prepare()
            return False
        self._force = None
        try:
            self._start(step, metrics)
        except CkptdError as e:
            self._session.record_failure(step, "was not taken", e)
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
        self._session.wait(self.config.close_timeout if timeout is None else timeout, step_seen=self._step_seen)

    def close(self, timeout: float | None = None) -> None:
        """Wait (bounded, see ``wait``) until the last snapshot is durable, release everything, re-raise failures."""
        if self._closed:
            return
        self._closed = True
        try:
            self.wait(timeout)
        finally:
            self._owned.release()

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
            "pool_bytes": self._session.nbytes,
            "backlog": self.backlog,
            "daemon": self._persistence.uses_daemon,
            **self.measure.summary(),
        }

    # -- restore ------------------------------------------------------------

    def restore(self, step: int | None = None) -> int:
        """Load the newest verified snapshot (or ``step``); return the next step to run, 0 if none."""
        self._check_open()
        manifest = self._restorer.restore(step)
        if manifest is None:
            if step is not None:
                raise NoSnapshot(f"{self.store.uri} has no snapshot of step {step}")
            log.info("ckptd: no snapshot in %s; starting from step 0", self.store.uri)
            self._progress.event("restored", step=None)
            return 0
        if self._attach_mode and manifest.meta.get("attach"):
            self._catch_up_schedulers()
        self.measure.snapshot_started(manifest.step, time.monotonic())
        if self._auto_step is not None:
            self._auto_step = manifest.step + 1
        log.info("ckptd: restored step %d from %s", manifest.step, self.store.path_of(step_dir(manifest.step)))
        self._progress.event("restored", step=manifest.step)
        return manifest.step + 1

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
        return self.measure.context(
            step,
            now,
            in_flight=self._session.in_flight(),
            gpus=self.config.gpus or self._ranks.world_size,
            nbytes=self._session.nbytes or None,
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
        meta = {"attach": self._attach_mode, "policy": _policy_note(self.policy)}
        handle = self._session.start(step, metrics, meta)
        self._progress.snapshot(step, handle, self._session.nbytes)
        return handle

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
        self._session.report(raise_errors=self.config.on_error == "raise")

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

        self._owned.keep(optimizer.register_step_post_hook(after_step), lambda h: h.remove())


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
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = physical_gpus(torch.cuda.current_device(), os.environ.get("CUDA_VISIBLE_DEVICES")) if cuda else ()
    link = DaemonLink.connect(
        path, rank=ranks.rank, devices=devices, store=store, local=local, job=ranks.job, world_size=ranks.world_size
    )
    if link is not None and threading.current_thread() is threading.main_thread():
        import faulthandler
        import signal

        faulthandler.register(signal.SIGUSR1, all_threads=True)  # the daemon's hang report
    return link


def physical_gpus(device: int, visible: str | None) -> tuple[int, ...]:
    """The NVML index of CUDA device ``device`` under ``CUDA_VISIBLE_DEVICES=visible``, which the daemon
    watches; () (every GPU) where the list names GPUs by UUID or MIG instance, which this cannot map."""
    if visible is None:
        return (device,)
    entries = [e.strip() for e in visible.split(",") if e.strip()]
    try:
        return (int(entries[device]),)
    except (IndexError, ValueError):
        return ()
