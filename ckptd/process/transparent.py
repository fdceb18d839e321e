"""``ckptd run --transparent``: CRIU images of an unmodified job, restored when it dies (no torch).

The job runs in a PID namespace of its own (``launch.py``), a child of this process (its subreaper),
its stdout and stderr pumped through pipes. On the policy (the measured freeze is the cost; the
daemon's risk signals raise the rate and ask for an image now) or every ``interval`` seconds, the
whole tree is dumped with ``criu dump --leave-running`` and committed as a snapshot of kind
``process``; the persist path makes it durable and applies retention. A job that dies by a signal or
a non-zero exit is restored from the newest image that verifies (downloaded from the object store on
a node that lacks it), up to ``max_restarts``. SIGTERM (preemption) and ``ckptd pause`` (SIGUSR2) dump
the job once more, stop it, wait until that image is durable within ``grace`` and exit 75.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any, NoReturn

from .._persist_client import PersistClient
from ..errors import ConfigError, CriuFailed, NoGoodSnapshot, SnapshotCorrupt, TransparentRefused
from ..persist import retention
from ..persist.lease import Lease, env_job_id
from ..persist.tiers import Tiers, default_local_dir
from ..policy import EverySeconds, PolicyContext, RiskAwarePolicy, SnapshotPolicy
from ..preempt import EXIT_PREEMPTED
from ..snapshot.manifest import Manifest, step_dir
from ..store import FileStore, open_store
from ..supervisor import Restart, RunConfig, RunSummary, Supervisor, describe_exit, exhausted_code
from . import control, probe
from .criu import HOOK, Criu
from .dumper import Dumper, DumpTarget
from .gpu import GpuTools, gpu_tools
from .image import ProcessMeta, done_step, mark_done
from .job import JobProcess, become_subreaper

log = logging.getLogger("ckptd")

_TICK = 0.1


class Phase(Enum):
    """Where the job is; ``advance`` refuses a move the loop never makes."""

    STARTING = "starting"
    RUNNING = "running"
    DUMPING = "dumping"
    STOPPING = "stopping"
    ENDED = "ended"


_MOVES = {
    Phase.STARTING: {Phase.RUNNING, Phase.ENDED},
    Phase.RUNNING: {Phase.DUMPING, Phase.STOPPING, Phase.ENDED},
    Phase.DUMPING: {Phase.RUNNING, Phase.STOPPING, Phase.ENDED},
    Phase.STOPPING: {Phase.ENDED},
    Phase.ENDED: {Phase.STARTING},
}


@dataclass(frozen=True, kw_only=True)
class TransparentConfig(RunConfig):
    """``ckptd run``'s options plus what transparent mode adds."""

    interval: float | None = None
    """Seconds between images; None: the default cost-vs-risk policy (RiskAwarePolicy)."""
    local: str | None = None
    """The local tier for an object store; None: under $CKPTD_LOCAL or the temp dir."""
    keep_last: int = 3
    """Images kept in each tier."""
    first_after: float = 10.0
    """Seconds a fresh launch runs before the default policy's first image, which measures the freeze."""
    probe_every: float = 1.0
    """Seconds between looks at the job's connections (one to another host refuses the job)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.interval is not None and not self.interval > 0:
            raise ConfigError(f"--interval {self.interval}: must be > 0 seconds")
        if self.keep_last < 1:
            raise ConfigError(f"keep_last={self.keep_last}: keep at least 1 image")

    @classmethod
    def of(cls, run: RunConfig, **extra: Any) -> TransparentConfig:
        return cls(**{f.name: getattr(run, f.name) for f in fields(RunConfig)}, **extra)


class TransparentRun(Supervisor):
    """Runs one job under CRIU until it completes, is paused or preempted, or runs out of restarts.

    Not thread-safe: one owner calls ``run()``. CRIU is found and checked when it is made, so a
    refusal comes before the daemon starts and before the job does.
    """

    def __init__(self, config: TransparentConfig, *, criu: Criu | None = None) -> None:
        self.criu = criu or Criu.find()
        super().__init__(config)
        self.tconfig = config
        self.phase = Phase.ENDED
        self.policy: SnapshotPolicy = (
            EverySeconds(config.interval)
            if config.interval
            else RiskAwarePolicy(keep_last=config.keep_last, max_interval=30 * 60.0)
        )
        self._job: JobProcess | None = None
        self._since = time.monotonic()
        self._pause_at: float | None = None
        self._commands: list = []
        self._commands_lock = threading.Lock()
        self._heartbeat: Heartbeat | None = None
        self._gpu: GpuTools | None = None
        self._dumper: Dumper | None = None
        self._lease: Lease | None = None
        self._persist: PersistClient | None = None
        self._record: control.RunRecord | None = None
        self._old_pause: Any = None

    # -- the loop ---------------------------------------------------------------------

    def _loop(self) -> RunSummary:
        self._open()
        try:
            return self._supervise()
        finally:
            self._close()

    def _supervise(self) -> RunSummary:
        restarts = self._restarts
        self._start()
        while True:
            code = self._watch()
            if code is None:  # stopped by SIGTERM or a pause, after a last image
                outcome = "paused" if self._pause_at is not None else "preempted"
                return self._finish(outcome, EXIT_PREEMPTED, restarts)
            if code == 0:
                mark_done(self.store, self.dumper.last_step, job=self.job, command=tuple(self.config.command))
                return self._finish("completed", 0, restarts)
            noticed = time.time()
            restarts.append(Restart(describe_exit(code), code, noticed_at=noticed, detection_s=_TICK))
            log.warning("ckptd run: job %s ended: %s", self.job, restarts[-1].cause)
            record_failure = getattr(self.policy, "record_failure", None)
            if callable(record_failure):
                record_failure(1)
            if len(restarts) > self.config.max_restarts:
                restarts.pop()
                self.dumper.settle(time.monotonic() + self.config.grace)
                return self._finish(
                    f"exhausted after {self.config.max_restarts} restarts ({describe_exit(code)})",
                    exhausted_code(code),
                    restarts,
                )
            delay = self._backoff(len(restarts))
            log.warning(
                "ckptd run: restoring in %.1f s (restart %d of at most %d)",
                delay,
                len(restarts),
                self.config.max_restarts,
            )
            if self._wait(delay):
                outcome = "paused" if self._pause_at is not None else "preempted"
                return self._finish(outcome, EXIT_PREEMPTED, restarts)
            t0 = time.monotonic()
            self._start()
            restarts[-1].restart_s = time.time() - noticed
            restarts[-1].restore_s = time.monotonic() - t0

    def _watch(self) -> int | None:
        """Run the job until it exits (its code) or is stopped (None); images on the policy meanwhile."""
        next_probe = time.monotonic()
        while True:
            code = self._reap()
            if code is not None:
                self._advance(Phase.ENDED)
                return code
            if self._sigterm_at is not None or self._pause_at is not None:
                self._stop()
                return None
            if time.monotonic() >= next_probe:
                self._probe()
                next_probe = time.monotonic() + self.tconfig.probe_every
            reasons = self._take_commands()
            if reasons or self._due():
                self._dump(reasons[0] if reasons else "policy")
            time.sleep(_TICK)

    def _advance(self, to: Phase) -> None:
        if to not in _MOVES[self.phase]:
            raise RuntimeError(f"transparent job: illegal move {self.phase.value} -> {to.value}")
        self.phase = to

    # -- resources ----------------------------------------------------------------------

    def _open(self) -> None:
        cfg = self.tconfig
        self.store = open_store(cfg.store, create=True)
        is_file = isinstance(self.store, FileStore)
        if is_file and cfg.local is not None:
            raise ConfigError(f"--local applies to object stores; {self.store.uri} is already local")
        self._lease = Lease(self.store, job=self.job, take_over=cfg.take_over).acquire()
        local = None if is_file else (cfg.local or default_local_dir(self.store.uri, env_job_id()))
        link = self._connect_daemon(local or str(getattr(self.store, "root", "")))
        self.tiers = Tiers(
            self.store,
            local=local,
            rank=0,
            world_size=1,
            rule=retention.Retention(keep_last=cfg.keep_last),
            external=link is not None and not is_file,
        )
        self._persist = PersistClient(self.tiers, link)
        self.local: FileStore = self.tiers.local
        self._work = os.path.join(self.local.root, ".criu-logs")
        os.makedirs(self._work, exist_ok=True)
        target = DumpTarget(job=self.job, command=tuple(cfg.command), work=self._work)
        self._dumper = Dumper(self.criu, self.tiers, self._persist, target, fence=self._fence)
        self._heartbeat = Heartbeat(self._beat)
        self._old_pause = signal.signal(control.PAUSE_SIGNAL, self._on_pause)  # before `ckptd pause` can find us
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # the daemon's hang report, not a kill
        self._record = control.register(self.job, cfg.store, cfg.command)
        become_subreaper()
        log.warning(
            "ckptd run: transparent job %s, images in %s (pause it: ckptd pause %s)",
            self.job,
            self.local.root,
            self.job,
        )

    def _connect_daemon(self, local: str):
        if not (self.config.daemon or os.path.exists(self.socket)):
            return None
        from ..daemon.client import DaemonLink

        return DaemonLink.connect(
            self.socket, devices=tuple(self.config.gpus or ()), store=self.config.store, local=local, job=self.job
        )

    def _close(self) -> None:
        """Undo what ``_open`` did, as far as it got."""
        self._kill()
        if self._heartbeat is not None:
            self._heartbeat.close()
        if self._record is not None:
            control.unregister(self._record)
        if self._old_pause is not None:
            signal.signal(control.PAUSE_SIGNAL, self._old_pause)
            faulthandler.unregister(signal.SIGUSR1)
        if self._persist is not None:
            self._persist.close(wait=False)
        if self._lease is not None:
            self._lease.release()
        elif getattr(self, "store", None) is not None:
            self.store.close()

    @property
    def dumper(self) -> Dumper:
        assert self._dumper is not None, "the run is not open"
        return self._dumper

    def _fence(self) -> None:
        if self._lease is not None:
            self._lease.check()  # a run that lost the store's lease commits nothing

    def _on_pause(self, signum, frame) -> None:
        if self._pause_at is None:
            self._pause_at = time.monotonic()
            log.warning("ckptd run: pause asked: a last image of job %s, then it stops", self.job)

    # -- start: restore the newest image, or launch -------------------------------------------

    def _start(self) -> None:
        self._advance(Phase.STARTING)
        self._since = time.monotonic()
        if not self._restore_newest():
            self._launch()
        self._advance(Phase.RUNNING)

    def _restore_newest(self) -> bool:
        """Restore the newest image that verifies and restores; False when there is none to restore."""
        done = done_step(self.store)
        if done is not None and max(self.tiers.candidates(), default=-1) <= done:
            log.warning("ckptd run: the last run of job %s completed; starting it anew", self.job)
            return False
        below: int | None = None
        failed: list[str] = []
        while True:
            manifest = self.tiers.newest_good(below=below)
            if manifest is None or (done is not None and manifest.step <= done):
                if failed:
                    raise NoGoodSnapshot(
                        f"no image in {self.store.uri} restores: " + "; ".join(failed), problems=failed
                    )
                return False
            source = f"{self.local.uri}/{step_dir(manifest.step)}"
            try:
                meta = ProcessMeta.of(manifest, source=source)
                if meta.command != tuple(self.config.command):
                    raise TransparentRefused(
                        f"{self.store.uri} holds images of `{' '.join(meta.command)}`, not of this command: "
                        "run that command, or give this one a store of its own"
                    )
                self._restore(manifest, meta)
                return True
            except (CriuFailed, SnapshotCorrupt) as e:
                log.warning("ckptd run: skipping image %d: %s", manifest.step, e)
                failed.append(f"{step_dir(manifest.step)}: {e}")
                below = manifest.step

    def _restore(self, manifest: Manifest, meta: ProcessMeta) -> None:
        if meta.driver and self._gpu is None:
            self._gpu = gpu_tools(self.criu.libdir)
        t0 = time.monotonic()
        self._job = JobProcess.restore(
            self.criu,
            self.local.path_of(step_dir(manifest.step)),
            meta,
            [f.name for f in manifest.files],
            work=self._work,
        )
        self.dumper.restored(manifest)
        log.warning(
            "ckptd run: restored job %s from image %d (%s) in %.2f s",
            self.job,
            manifest.step,
            manifest.created,
            time.monotonic() - t0,
        )

    def _launch(self) -> None:
        env = dict(os.environ)
        if self.config.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in self.healthy_gpus())
        self._job = JobProcess.launch(tuple(self.config.command), env)
        log.info("ckptd run: launched job %s as pid %s", self.job, self._job.pid)

    # -- while it runs ----------------------------------------------------------------------

    def _reap(self) -> int | None:
        """The job's exit code once it has ended (negative: the signal); None while it runs."""
        assert self._job is not None
        return self._job.poll()

    def _probe(self) -> probe.TreeView:
        """The job's tree now; refuse the job at once when it holds a connection CRIU cannot restore, or
        lacks GPU tooling."""
        assert self._job is not None and self._job.pid is not None
        view = probe.look(self._job.pid)
        if view.outside:
            self._refuse(
                f"{view.outside[0].describe()}, outside the job; CRIU cannot restore connections to other "
                f"hosts (multi-node torch.distributed, NCCL, a server): {HOOK}"
            )
        if view.inside and self.criu.network_lock is None:
            self._refuse(
                "its processes talk over TCP among themselves, and CRIU can hold such connections still only "
                f"with iptables or its nftables support (neither is here): install iptables, or {HOOK}"
            )
        if view.gpu and self._gpu is None:
            try:
                self._gpu = gpu_tools(self.criu.libdir)
            except TransparentRefused as e:
                self._refuse(str(e))
        return view

    def _refuse(self, why: str) -> NoReturn:
        """Stop the job (SIGTERM, SIGKILL after the grace period) and end the run with ``why``."""
        if self._job is not None:
            self._job.kill(grace=self.config.grace)
        raise TransparentRefused(f"job {self.job} cannot run in transparent mode: {why}")

    def _beat(self) -> None:
        """Heartbeat the daemon (from the Heartbeat thread); its commands wait for the loop."""
        assert self._persist is not None and self._dumper is not None
        commands = self._persist.heartbeat(self._dumper.taken, None)
        with self._commands_lock:
            self._commands += commands

    def _take_commands(self) -> list[str]:
        """Apply the daemon's risk raises; the reasons of its snapshot_now commands."""
        reasons = []
        with self._commands_lock:
            commands, self._commands = self._commands, []
        for cmd in commands:
            if cmd.kind == "snapshot_now":
                reasons.append(f"daemon: {cmd.reason}")
            elif cmd.kind == "raise_risk" and callable(raise_risk := getattr(self.policy, "raise_risk", None)):
                raise_risk(cmd.factor, reason=cmd.reason)
        return reasons

    def _due(self) -> bool:
        now = time.monotonic()
        freeze = self.dumper.freeze
        if freeze is None and self.tconfig.interval is None and now - self._since < self.tconfig.first_after:
            return False
        ctx = PolicyContext(
            step=self.dumper.taken,
            now=now,
            steps_since=None if freeze is None else 1,
            seconds_since=now - self._since,
            step_time=None,
            stall=freeze,
            persist=self.dumper.persist_s,
            in_flight=self.dumper.in_flight,
            gpus=max(1, len(self.config.gpus or ())),
            nbytes=self.dumper.nbytes,
        )
        return self.policy.should_snapshot(ctx=ctx)

    def _dump(self, reason: str) -> None:
        """One image of the running job, unless it must be refused or the local tier is full."""
        view = self._probe()
        if not self.dumper.has_room():
            log.warning("ckptd run: no room for another image in %s; skipping this one", self.local.root)
            return
        self._advance(Phase.DUMPING)
        try:
            self._take(view, reason)
        finally:
            if self.phase is Phase.DUMPING:
                self._advance(Phase.RUNNING)

    def _take(self, view: probe.TreeView, reason: str) -> bool:
        assert self._job is not None
        driver = self._gpu.driver if view.gpu and self._gpu is not None else ""
        if self.dumper.take(self._job, view, driver=driver, reason=reason) is None:
            return False
        self._since = time.monotonic()
        return True

    # -- the end --------------------------------------------------------------------------------

    def _stop(self) -> None:
        """Paused or preempted: a last image, the job stopped, that image durable within the grace period."""
        asked = self._pause_at if self._pause_at is not None else self._sigterm_at
        assert asked is not None
        self._advance(Phase.STOPPING)
        pid = self._job.pid if self._job is not None else None
        took = pid is not None and self._take(probe.look(pid), "pause" if self._pause_at is not None else "SIGTERM")
        self._kill()
        self._advance(Phase.ENDED)
        if not took:
            log.warning("ckptd run: the last image of job %s failed; it resumes from the one before", self.job)
        self.dumper.settle(asked + self.config.grace)

    def _wait(self, seconds: float) -> bool:
        """Sleep before a restore; True if SIGTERM or a pause came meanwhile."""
        end = time.monotonic() + seconds
        while self._sigterm_at is None and self._pause_at is None and time.monotonic() < end:
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
        return self._sigterm_at is not None or self._pause_at is not None

    def _kill(self) -> None:
        if self._job is not None:
            self._job.kill()


class Heartbeat:
    """Calls ``beat`` every ``every`` seconds from a thread of its own until ``close()``, so a long dump,
    restore or download is never taken for a hang by the daemon. ``beat`` must be thread-safe."""

    def __init__(self, beat: Callable[[], None], every: float = 0.2) -> None:
        self._beat, self._every = beat, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ckptd-transparent-beat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self._beat()
            except Exception:  # a heartbeat that fails must not end the run; the daemon link says why
                log.debug("ckptd run: heartbeat failed", exc_info=True)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
