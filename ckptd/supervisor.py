"""``ckptd run``: launch a training command, relaunch it on failure, report (no torch).

The job resumes through its own ``Checkpointer.restore()``; the supervisor
only sets ``CKPTD_STORE``, ``CKPTD_PROGRESS``, ``CKPTD_GRACE``, ``CKPTD_JOB`` and the run's history
(``CKPTD_RESTARTS``, Slurm's requeues included, and ``CKPTD_RUN_SECONDS``, which the policy's failure
rate learns from), keeps bad
GPUs out of ``CUDA_VISIBLE_DEVICES``, and reads the progress events to say
what each restart cost.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .errors import ConfigError
from .ledger.recorders import RunRecorder
from .persist.lease import env_job_id
from .preempt import EXIT_PREEMPTED
from .progress import ENV as PROGRESS_ENV
from .progress import Attempt, read_attempts

log = logging.getLogger("ckptd")

EXIT_EXHAUSTED = 1


RESTARTS_ENV = "CKPTD_RESTARTS"
RUN_SECONDS_ENV = "CKPTD_RUN_SECONDS"


def run_history(environ=os.environ) -> tuple[int, float]:
    """(restarts so far, seconds since the first launch) that ``ckptd run`` handed this job; (0, 0) outside it."""
    try:
        return max(0, int(environ.get(RESTARTS_ENV, "0"))), max(0.0, float(environ.get(RUN_SECONDS_ENV, "0")))
    except ValueError:
        return 0, 0.0


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """How ``ckptd run`` launches and relaunches one job."""

    store: str
    """Store URI handed to the job as CKPTD_STORE."""
    command: tuple[str, ...]
    """The training command, e.g. ('torchrun', '--nproc-per-node', '4', 'train.py')."""
    max_restarts: int = 10
    """Relaunches after failures before giving up."""
    backoff: float = 1.0
    """Seconds before the first relaunch; doubles each time up to ``backoff_max``."""
    backoff_max: float = 60.0
    """Longest wait between relaunches."""
    grace: float = 30.0
    """Seconds from SIGTERM to SIGKILL; the job's emergency snapshot must fit in it."""
    gpus: tuple[int, ...] | None = None
    """CUDA devices the job may use; None leaves CUDA_VISIBLE_DEVICES alone."""
    socket: str | None = None
    """The node daemon's socket, handed to the job as CKPTD_SOCKET; None: the default path."""
    daemon: bool = True
    """Start the node daemon if none listens on ``socket`` (and stop it at the end)."""
    take_over: bool = False
    """Let the job take the store's lease from another job that is gone (CKPTD_TAKE_OVER=1)."""

    def __post_init__(self) -> None:
        if not self.command:
            raise ConfigError("ckptd run needs a command after --, e.g. ckptd run --store DIR -- python train.py")
        if self.max_restarts < 0:
            raise ConfigError(f"--max-restarts {self.max_restarts}: must be >= 0")
        if not 0 <= self.backoff <= self.backoff_max:
            raise ConfigError("backoff must be between 0 and backoff_max seconds")
        if not self.grace > 0:
            raise ConfigError(f"--grace {self.grace}: must be > 0 seconds")


@dataclass
class Restart:
    """One failure and the relaunch that followed it."""

    cause: str
    exit_code: int
    noticed_at: float = 0.0
    """Wall time (Unix s) the supervisor saw the job end."""
    lost_steps: int | None = None
    detection_s: float | None = None
    restart_s: float | None = None
    restore_s: float | None = None
    catch_up_s: float | None = None

    @property
    def recovery_s(self) -> float | None:
        parts = (self.detection_s, self.restart_s, self.restore_s, self.catch_up_s)
        return None if any(p is None for p in parts) else sum(parts)  # type: ignore[arg-type]


@dataclass
class RunSummary:
    """How the run ended and what each restart cost."""

    outcome: str
    exit_code: int
    restarts: list[Restart] = field(default_factory=list)
    wall_s: float = 0.0


def describe_exit(code: int) -> str:
    """A cause in words: 'exit 1', 'killed by SIGKILL', 'preempted (exit 75)'."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    if code == EXIT_PREEMPTED:
        return f"preempted (exit {EXIT_PREEMPTED})"
    return f"exit {code}"


def with_nproc(command: Sequence[str], nproc: int) -> list[str]:
    """A torchrun command with --nproc-per-node set to ``nproc``; other commands unchanged."""
    cmd = list(command)
    is_torchrun = os.path.basename(cmd[0]) == "torchrun" or cmd[1:3] == ["-m", "torch.distributed.run"]
    if not is_torchrun:
        return cmd
    for i, arg in enumerate(cmd):
        for flag in ("--nproc-per-node", "--nproc_per_node"):
            if arg == flag and i + 1 < len(cmd):
                cmd[i + 1] = str(nproc)
                return cmd
            if arg.startswith(flag + "="):
                cmd[i] = f"{flag}={nproc}"
                return cmd
    return cmd


def _slurm_requeues() -> int:
    """Times Slurm requeued this job before this run (each one a preemption or a fault the policy learns from)."""
    try:
        return max(0, int(os.environ.get("SLURM_RESTART_COUNT", "0")))
    except ValueError:
        return 0


def exhausted_code(code: int) -> int:
    """``ckptd run``'s exit code once restarts are exhausted: the job's own, a signal N as 128+N."""
    return code if code > 0 else 128 - code if code < 0 else EXIT_EXHAUSTED


class _RequeuedElsewhere(Exception):
    """Slurm took the job to run without this node; this run ends here."""


class Supervisor:
    """Runs one job until it succeeds, is preempted or runs out of restarts. Not thread-safe."""

    def __init__(self, config: RunConfig, *, bad_gpus: Callable[[], set[int]] | None = None) -> None:
        from .daemon.client import read_bad_gpus
        from .daemon.server import default_socket

        self.config = config
        self.socket = config.socket or default_socket()
        self._bad_gpus = bad_gpus or (lambda: read_bad_gpus(self.socket))
        self._daemon: subprocess.Popen | None = None
        self._child: subprocess.Popen | None = None
        self._sigterm_at: float | None = None
        self._workdir = tempfile.mkdtemp(prefix="ckptd-run-")
        self.progress_path = os.path.join(self._workdir, "progress.jsonl")
        # One id for every launch of this job, so a relaunch takes its own store lease back.
        self.job = env_job_id() or f"run-{socket.gethostname()}-{os.getpid()}-{int(time.time())}"
        self._restarts: list[Restart] = []
        self._run_started = time.monotonic()
        self._ledger = RunRecorder(config.store, self.job)  # launches and exits, for the goodput ledger
        self._outcome: tuple[int | None, str] = (None, "ended")

    def run(self) -> RunSummary:
        t0 = time.monotonic()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            if self.config.daemon:
                self._start_daemon()
            summary = self._loop()
        finally:
            for s, h in previous.items():
                signal.signal(s, h)
            self._stop_daemon()
            self._ledger.close(*self._outcome)
            shutil.rmtree(self._workdir, ignore_errors=True)
        summary.wall_s = time.monotonic() - t0
        return summary

    def _loop(self) -> RunSummary:
        restarts: list[Restart] = self._restarts
        self._run_started = time.monotonic()
        while True:
            try:
                code, noticed, noticed_at = self._launch_and_wait()
            except _RequeuedElsewhere as e:
                return self._finish(str(e), EXIT_PREEMPTED, restarts)
            if code == 0:
                return self._finish("completed", 0, restarts)
            if self._sigterm_at is not None:
                return self._finish("preempted", EXIT_PREEMPTED, restarts)
            restarts.append(Restart(describe_exit(code), code, noticed_at=noticed_at, detection_s=noticed))
            log.warning("ckptd run: job ended: %s", restarts[-1].cause)
            if len(restarts) > self.config.max_restarts:
                restarts.pop()
                return self._finish(
                    f"exhausted after {self.config.max_restarts} restarts ({describe_exit(code)})",
                    exhausted_code(code),
                    restarts,
                )
            delay = self._backoff(len(restarts))
            log.warning(
                "ckptd run: relaunching in %.1f s (restart %d of at most %d)",
                delay,
                len(restarts),
                self.config.max_restarts,
            )
            if self._sleep(delay):
                return self._finish("preempted", EXIT_PREEMPTED, restarts)

    def _start_daemon(self) -> None:
        """Join the node daemon at the socket, or start one for this run."""
        if os.path.exists(self.socket):
            log.info("ckptd run: using the daemon at %s", self.socket)
            return
        log_file = self.socket + ".log"
        cmd = [
            sys.executable,
            "-m",
            "ckptd.cli",
            "daemon",
            "--socket",
            self.socket,
            "--store",
            self.config.store,
            "--grace",
            str(self.config.grace),
            "--log",
            log_file,
        ]
        # Its own file, so its log (and boto's) never mixes into the job's output; `ckptd status` names it.
        with open(log_file, "a") as out:
            self._daemon = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "CKPTD_JOB": self.job},  # its energy metering starts with the run
            )
        log.info("ckptd run: the node daemon logs to %s", log_file)
        deadline = time.monotonic() + 15
        while not os.path.exists(self.socket):
            if self._daemon.poll() is not None or time.monotonic() > deadline:
                raise ConfigError(f"the daemon did not start on {self.socket}; see {log_file}")
            time.sleep(0.05)

    def _stop_daemon(self) -> None:
        if self._daemon is not None and self._daemon.poll() is None:
            self._daemon.send_signal(signal.SIGTERM)  # it finishes its uploads first
            try:
                self._daemon.wait(timeout=300)
            except subprocess.TimeoutExpired:
                self._daemon.kill()

    def _finish(self, outcome: str, code: int, restarts: list[Restart]) -> RunSummary:
        """Account for the restarts while the progress file still exists."""
        self._account(restarts)
        self._outcome = (code, outcome)
        return RunSummary(outcome, code, restarts)

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(CKPTD_STORE=self.config.store, CKPTD_GRACE=str(self.config.grace), CKPTD_JOB=self.job)
        if self.config.take_over:
            env["CKPTD_TAKE_OVER"] = "1"
        env[PROGRESS_ENV] = self.progress_path
        # What the job has met so far, for the policy's failure rate.
        env[RESTARTS_ENV] = str(len(self._restarts) + _slurm_requeues())
        env[RUN_SECONDS_ENV] = f"{time.monotonic() - self._run_started:.0f}"
        if self.config.daemon or self.config.socket:
            env["CKPTD_SOCKET"] = self.socket
        if self.config.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in self.healthy_gpus())
        return env

    def healthy_gpus(self) -> list[int]:
        """Configured GPUs less those the daemon marked bad."""
        bad = self._bad_gpus()
        return [g for g in (self.config.gpus or ()) if g not in bad]

    def _command(self) -> list[str]:
        if self.config.gpus is None:
            return list(self.config.command)
        healthy = self.healthy_gpus()
        if not healthy:
            self._requeue_elsewhere()
            raise ConfigError(f"every GPU of {list(self.config.gpus)} is marked bad; nothing to run on here")
        return with_nproc(self.config.command, len(healthy))

    def _backoff(self, restart: int) -> float:
        """Seconds before relaunch number ``restart`` (1, 2, ...): doubling from ``backoff`` up to its cap."""
        return min(self.config.backoff * 2 ** (restart - 1), self.config.backoff_max)

    def _requeue_elsewhere(self) -> None:
        """Under Slurm, a node with no healthy GPU left requeues the job without this node."""
        from . import slurm

        if slurm.in_slurm():
            job, node = os.environ["SLURM_JOB_ID"], slurm.this_node()
            log.warning("ckptd run: no healthy GPU on %s; requeueing Slurm job %s without it", node, job)
            slurm.requeue_excluding(job, node)
            done = f"requeued Slurm job {job} without node {node}"
            log.warning("ckptd run: %s; it resumes from its newest snapshot", done)  # now: Slurm's SIGKILL may follow
            raise _RequeuedElsewhere(done)

    @staticmethod
    def requeue_if_preempted(summary: RunSummary) -> bool:
        """Under Slurm, requeue a preempted run that Slurm itself is not ending; True if requeued.

        Call it last: the requeue makes Slurm SIGTERM every process of the job, this one too.
        """
        from . import slurm
        from .errors import CkptdError

        if summary.outcome != "preempted" or not slurm.in_slurm():
            return False
        job = os.environ["SLURM_JOB_ID"]
        try:
            if slurm.requeue_after_preemption(job):
                log.warning("ckptd run: requeued Slurm job %s; it resumes from its newest snapshot", job)
                return True
        except CkptdError as e:
            log.warning("ckptd run: preempted; could not requeue Slurm job %s: %s", job, e)
        return False

    def _launch_and_wait(self) -> tuple[int, float, float]:
        """Run the job once; return its exit code, a bound on how late its end was seen, and when."""
        self._child = subprocess.Popen(self._command(), env=self._env(), start_new_session=True)
        self._ledger.launched()
        killed_at = None
        seen_alive = time.time()
        while True:
            code = self._child.poll()
            if code is not None:
                now = time.time()
                self._ledger.exited(code, describe_exit(code), seen_alive, now)
                return code, now - seen_alive, now
            seen_alive = time.time()
            if self._sigterm_at is not None and killed_at is None:
                if time.monotonic() - self._sigterm_at > self.config.grace:
                    log.warning("ckptd run: grace period of %.0f s over; SIGKILL", self.config.grace)
                    self._signal_job(signal.SIGKILL)
                    killed_at = time.monotonic()
            time.sleep(0.05)

    def _on_signal(self, signum, frame) -> None:
        if self._sigterm_at is None:
            self._sigterm_at = time.monotonic()
            log.warning("ckptd run: %s: asking the job for an emergency snapshot", signal.Signals(signum).name)
            self._signal_job(signal.SIGTERM)

    def _signal_job(self, sig: int) -> None:
        if self._child is not None and self._child.poll() is None:
            try:
                os.killpg(self._child.pid, sig)
            except ProcessLookupError:
                pass

    def _sleep(self, seconds: float) -> bool:
        """Sleep, returning True early if SIGTERM arrives."""
        end = time.monotonic() + seconds
        while self._sigterm_at is None and (left := end - time.monotonic()) > 0:
            time.sleep(min(0.05, left))
        return self._sigterm_at is not None

    def _account(self, restarts: list[Restart]) -> None:
        """Fill lost work and the recovery split of each restart from the progress events."""
        attempts = read_attempts(self.progress_path)
        for i, r in enumerate(restarts):
            if i + 1 >= len(attempts):
                break
            before, after = attempts[i], attempts[i + 1]
            _split(r, before, after)


def _split(r: Restart, before: Attempt, after: Attempt) -> None:
    resumed_from = -1 if after.restored is None else after.restored
    if before.last_step is not None:
        r.lost_steps = max(0, before.last_step - resumed_from)
    if after.started is not None and r.noticed_at:
        r.restart_s = max(0.0, after.started - r.noticed_at)
    if after.started is not None and after.restored_at is not None:
        r.restore_s = after.restored_at - after.started
    caught = None if before.last_step is None else after.when_step(before.last_step)
    if caught is not None and after.restored_at is not None:
        r.catch_up_s = max(0.0, caught - after.restored_at)
