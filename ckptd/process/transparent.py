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
import json
import logging
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, fields
from enum import Enum
from typing import Any

from .._persist_client import PersistClient
from ..errors import (
    CkptdError,
    ConfigError,
    CriuFailed,
    LeaseLost,
    NoGoodSnapshot,
    SnapshotCorrupt,
    SnapshotExists,
    StoreError,
    TransparentRefused,
)
from ..persist import retention
from ..persist.lease import Lease
from ..persist.tiers import Tiers, default_local_dir
from ..policy import EverySeconds, PolicyContext, RiskAwarePolicy, SnapshotPolicy
from ..preempt import EXIT_PREEMPTED
from ..snapshot.dirs import LocalCommit
from ..snapshot.manifest import Manifest, step_dir
from ..store import FileStore, open_store
from ..supervisor import EXIT_EXHAUSTED, Restart, RunConfig, RunSummary, Supervisor, describe_exit
from . import control, launch, probe
from .criu import HOOK, Criu
from .gpu import GpuTools, gpu_tools
from .image import ProcessMeta, commit, kernel, link_images, next_step, start_attempt
from .stdio import JobOutput

log = logging.getLogger("ckptd")

DONE_KEY = ".ckptd/transparent-done.json"
"""Written when the job completes: a later run of the same command starts it anew, not from an image."""
_TICK = 0.1
_PR_SET_CHILD_SUBREAPER = 36


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
        self._pid: int | None = None
        self._output: JobOutput | None = None
        self._since = time.monotonic()
        self._pause_at: float | None = None
        self._images = 0
        self._freeze: list[float] = []
        self._persist_s: list[float] = []
        self._nbytes: int | None = None
        self._pending: list[Future] = []
        self._commands: list = []
        self._gpu: GpuTools | None = None
        self._dump_failures = 0
        self._lock = threading.Lock()
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
                self._mark_done()
                return self._finish("completed", 0, restarts)
            noticed = time.time()
            restarts.append(Restart(describe_exit(code), code, noticed_at=noticed, detection_s=_TICK))
            log.warning("ckptd run: job %s ended: %s", self.job, restarts[-1].cause)
            record_failure = getattr(self.policy, "record_failure", None)
            if callable(record_failure):
                record_failure(1)
            if len(restarts) > self.config.max_restarts:
                restarts.pop()
                self._settle(time.monotonic() + self.config.grace)
                return self._finish(
                    f"exhausted after {self.config.max_restarts} restarts ({describe_exit(code)})",
                    code if code > 0 else 128 - code if code < 0 else EXIT_EXHAUSTED,
                    restarts,
                )
            delay = min(self.config.backoff * 2 ** (len(restarts) - 1), self.config.backoff_max)
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
            self._beat()
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
        import ctypes

        cfg = self.tconfig
        self.store = open_store(cfg.store, create=True)
        is_file = isinstance(self.store, FileStore)
        if is_file and cfg.local is not None:
            raise ConfigError(f"--local applies to object stores; {self.store.uri} is already local")
        self._lease = Lease(self.store, job=self.job, take_over=cfg.take_over).acquire()
        local = None if is_file else (cfg.local or default_local_dir(self.store.uri, _env_job()))
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
        remote = [] if self.tiers.remote is None else [self.tiers.remote]
        self._next = next_step(self.local, *remote)
        self._record = control.register(self.job, cfg.store, cfg.command)
        self._old_pause = signal.signal(control.PAUSE_SIGNAL, self._on_pause)
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # the daemon's hang report, not a kill
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
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
        if self._record is not None:
            control.unregister(self._record)
            signal.signal(control.PAUSE_SIGNAL, self._old_pause)
            faulthandler.unregister(signal.SIGUSR1)
        if self._persist is not None:
            self._persist.close(wait=False)
        if self._lease is not None:
            self._lease.release()
        elif getattr(self, "store", None) is not None:
            self.store.close()

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
        done = self._done_step()
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
        plugins = bool(meta.driver)
        if plugins and self._gpu is None:
            self._gpu = gpu_tools(self.criu.libdir)
        scratch = os.path.join(self._work, f"restore-{manifest.step}-{uuid.uuid4().hex[:8]}")
        link_images(self.local.path_of(step_dir(manifest.step)), manifest, scratch)
        output = JobOutput()
        t0 = time.monotonic()
        try:
            pid = self.criu.restore(
                scratch,
                work=self._work,
                inherit={f"pipe:[{ino}]": fd for ino, fd in zip(meta.stdio, output.job_ends)},
                tcp_established=meta.tcp_established,
                plugins=plugins,
                while_waiting=self._beat,
            )
        except BaseException:
            output.close(timeout=0.5)
            raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        output.close_job_ends()
        self._pid, self._output = pid, output
        if not self._freeze and "freeze_s" in manifest.metrics:
            self._freeze.append(manifest.metrics["freeze_s"])  # the policy's cost, until this run measures one
            self._nbytes = manifest.nbytes
        log.warning(
            "ckptd run: restored job %s from image %d (%s) in %.2f s",
            self.job,
            manifest.step,
            manifest.created,
            time.monotonic() - t0,
        )

    def _launch(self) -> None:
        output = JobOutput()
        report_r, report_w = os.pipe()
        env = dict(os.environ)
        if self.config.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in self.healthy_gpus())
        try:
            proc = subprocess.Popen(
                [sys.executable, "-S", launch.__file__, str(report_w), "--", *self.config.command],
                stdin=subprocess.DEVNULL,
                stdout=output.job_ends[0],
                stderr=output.job_ends[1],
                pass_fds=(report_w,),
                env=env,
            )
        finally:
            os.close(report_w)
        output.close_job_ends()
        with os.fdopen(report_r, "rb") as f:
            reported = f.read(64)
        code = proc.wait()
        if code != 0 or not reported.strip().isdigit():
            output.close()
            raise ConfigError(f"could not start {self.config.command[0]!r} in a PID namespace (launcher exit {code})")
        self._pid, self._output = int(reported), output
        log.info("ckptd run: launched job %s as pid %d", self.job, self._pid)

    # -- while it runs ----------------------------------------------------------------------

    def _reap(self) -> int | None:
        """The job's exit code (negative: the signal) once it has ended; None while it runs."""
        assert self._pid is not None
        try:
            pid, status = os.waitpid(self._pid, os.WNOHANG)
        except ChildProcessError:  # not ours to wait for (no subreaper): judge by /proc
            if os.path.exists(f"/proc/{self._pid}"):
                return None
            pid, status = self._pid, 1 << 8
        if pid == 0:
            return None
        self._pid = None
        if self._output is not None:
            self._output.close()
            self._output = None
        return os.waitstatus_to_exitcode(status)

    def _probe(self) -> None:
        """Refuse the job at once when it holds a connection CRIU cannot restore, or lacks GPU tooling."""
        assert self._pid is not None
        view = probe.look(self._pid)
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

    def _refuse(self, why: str) -> None:
        """Stop the job (SIGTERM, SIGKILL after the grace period) and end the run with ``why``."""
        log.error("ckptd run: refusing job %s: %s", self.job, why)
        self._kill(grace=self.config.grace)
        raise TransparentRefused(f"job {self.job} cannot run in transparent mode: {why}")

    def _beat(self) -> None:
        """Heartbeat the daemon; its commands wait for the loop."""
        assert self._persist is not None
        for cmd in self._persist.heartbeat(self._images, None):
            self._commands.append(cmd)

    def _take_commands(self) -> list[str]:
        """Apply the daemon's risk raises; the reasons of its snapshot_now commands."""
        reasons = []
        commands, self._commands = self._commands, []
        for cmd in commands:
            if cmd.kind == "snapshot_now":
                reasons.append(f"daemon: {cmd.reason}")
            elif cmd.kind == "raise_risk" and callable(raise_risk := getattr(self.policy, "raise_risk", None)):
                raise_risk(cmd.factor, reason=cmd.reason)
        return reasons

    def _due(self) -> bool:
        now = time.monotonic()
        measured = bool(self._freeze)
        if not measured and self.tconfig.interval is None and now - self._since < self.tconfig.first_after:
            return False
        with self._lock:
            persist = statistics.median(self._persist_s) if self._persist_s else None
            in_flight = sum(not f.done() for f in self._pending)
        ctx = PolicyContext(
            step=self._images,
            now=now,
            steps_since=1 if measured else None,
            seconds_since=now - self._since,
            step_time=None,
            stall=statistics.median(self._freeze) if measured else None,
            persist=persist,
            in_flight=in_flight,
            gpus=max(1, len(self.config.gpus or ())),
            nbytes=self._nbytes,
        )
        return self.policy.should_snapshot(ctx=ctx)

    # -- images -------------------------------------------------------------------------------

    def _dump(self, reason: str) -> LocalCommit | None:
        """One image of the running job, committed locally and handed to the persist path; None if it failed."""
        assert self._pid is not None
        self._probe()
        if self._nbytes and not self.tiers.make_room(int(self._nbytes * 1.1)):
            log.warning("ckptd run: no room for another image in %s; skipping this one", self.local.root)
            return None
        self._advance(Phase.DUMPING)
        try:
            return self._dump_now(reason)
        finally:
            if self.phase is Phase.DUMPING:
                self._advance(Phase.RUNNING)

    def _dump_now(self, reason: str) -> LocalCommit | None:
        assert self._pid is not None and self._output is not None
        view = probe.look(self._pid)
        step, self._next = self._next, self._next + 1
        attempt, directory = start_attempt(self.local, step)
        t0 = time.monotonic()
        try:
            stats = self.criu.dump(
                self._pid,
                directory,
                work=self._work,
                tcp_established=view.inside,
                plugins=view.gpu,
                while_waiting=self._beat,
            )
            meta = ProcessMeta(
                command=tuple(self.config.command),
                criu=self.criu.version_text,
                kernel=kernel(),
                stdio=self._output.inodes,
                tcp_established=view.inside,
                driver=self._gpu.driver if view.gpu and self._gpu else "",
            )
            metrics = {"freeze_s": stats.frozen_s, "dump_s": time.monotonic() - t0, "pages": stats.pages_written}
            done = commit(
                self.local,
                directory,
                step=step,
                attempt=attempt,
                job=self.job,
                meta=meta,
                metrics=metrics,
                fence=self._fence,
            )
        except LeaseLost:
            raise
        except (CriuFailed, SnapshotExists, SnapshotCorrupt, OSError) as e:
            shutil.rmtree(directory, ignore_errors=True)
            self._dump_failures += 1
            if self._reap_later_dead():
                return None  # the job died during the dump: its exit is what matters
            if self._dump_failures in (1, 2, 10, 100) or self._dump_failures % 1000 == 0:
                log.warning("ckptd run: image of job %s failed (%d so far): %s", self.job, self._dump_failures, e)
            return None
        self._images += 1
        self._since = time.monotonic()
        self._freeze.append(stats.frozen_s)
        del self._freeze[:-16]
        self._nbytes = done.manifest.nbytes
        assert self._persist is not None
        durable = self._persist.committed(done)
        with self._lock:
            self._pending = [f for f in self._pending if not f.done()] + [durable]
        self._retain(self.tiers.retain_local, step)
        durable.add_done_callback(lambda fut: self._durable(done, t0, fut))
        log.info(
            "ckptd run: image %d of job %s (%s): %.0f MB, frozen %.3f s, dump %.2f s",
            step,
            self.job,
            reason,
            done.manifest.nbytes / 1e6,
            stats.frozen_s,
            metrics["dump_s"],
        )
        return done

    def _fence(self) -> None:
        if self._lease is not None:
            self._lease.check()

    def _reap_later_dead(self) -> bool:
        return self._pid is not None and not os.path.exists(f"/proc/{self._pid}/fd")

    def _durable(self, done: LocalCommit, started: float, fut: Future) -> None:
        if fut.exception() is not None:
            log.warning("ckptd run: image %d is local only: %s", done.manifest.step, fut.exception())
            return
        with self._lock:
            self._persist_s.append(time.monotonic() - started)
            del self._persist_s[:-16]
        self.tiers.release(done)
        self._retain(self.tiers.retain_remote, done.manifest.step)

    def _retain(self, apply, step: int) -> None:
        try:
            apply(step)
        except (OSError, CkptdError) as e:
            log.warning("ckptd run: retention after image %d failed: %s", step, e)

    # -- the end --------------------------------------------------------------------------------

    def _stop(self) -> None:
        """Paused or preempted: a last image, the job stopped, that image durable within the grace period."""
        asked = self._pause_at if self._pause_at is not None else self._sigterm_at
        assert asked is not None
        self._advance(Phase.STOPPING)
        done = self._dump_now("pause" if self._pause_at is not None else "SIGTERM")
        self._kill()
        self._advance(Phase.ENDED)
        if done is None:
            log.warning("ckptd run: the last image of job %s failed; it resumes from the one before", self.job)
        self._settle(asked + self.config.grace)

    def _settle(self, deadline: float) -> None:
        """Wait until the images taken are durable, at most until ``deadline``."""
        with self._lock:
            pending = [f for f in self._pending if not f.done()]
        if not pending or self._persist is None:
            return
        self._persist.wait_reported(pending, self._images, deadline)
        for f in pending:
            try:
                f.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception:  # reported below: the run is ending anyway
                pass
        late = [f for f in pending if not f.done() or f.exception() is not None]
        if late:
            where = "this node's daemon goes on uploading" if self._persist.uses_daemon else "resume on this node"
            log.warning("ckptd run: %d image(s) not durable in the object store yet: %s", len(late), where)

    def _wait(self, seconds: float) -> bool:
        """Sleep before a restore; True if SIGTERM or a pause came meanwhile."""
        end = time.monotonic() + seconds
        while self._sigterm_at is None and self._pause_at is None and time.monotonic() < end:
            time.sleep(min(0.05, max(0.0, end - time.monotonic())))
        return self._sigterm_at is not None or self._pause_at is not None

    def _kill(self, grace: float = 0.0) -> None:
        """Stop the job: SIGTERM first when given a grace period, then SIGKILL to its namespace's init."""
        pid = self._pid
        if pid is None:
            return
        if grace > 0:
            _signal(pid, signal.SIGTERM)
            end = time.monotonic() + grace
            while time.monotonic() < end and self._reap() is None:
                time.sleep(0.05)
            if self._pid is None:
                return
        _signal(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
        self._pid = None
        if self._output is not None:
            self._output.close()
            self._output = None

    def _mark_done(self) -> None:
        """Record that the job completed, so the same command later starts it anew."""
        body = {"step": self._next - 1, "job": self.job, "command": list(self.config.command)}
        try:
            self.store.put_bytes(DONE_KEY, json.dumps(body).encode())
        except (StoreError, OSError) as e:
            log.warning("ckptd run: could not record that job %s completed (%s)", self.job, e)

    def _done_step(self) -> int | None:
        try:
            if not self.store.exists(DONE_KEY):
                return None
            raw = json.loads(self.store.get_bytes(DONE_KEY)[:4096])
            step = raw.get("step") if isinstance(raw, dict) else None
            return step if isinstance(step, int) and not isinstance(step, bool) else None
        except (StoreError, OSError, ValueError):
            return None


def _env_job() -> str | None:
    from ..persist.lease import env_job_id

    return env_job_id()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
