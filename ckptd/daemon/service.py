"""The daemon: jobs that registered, GPU and host health, hang detection, uploads.

Reactions follow DESIGN.md: a fatal GPU fault marks the GPU bad (in the
state file ``ckptd run`` reads) and stops the jobs using it with SIGTERM
(their hook takes an emergency snapshot) then SIGKILL after the grace
period; a degraded GPU raises those jobs' risk and asks for a snapshot
now; a job without progress for k × its median step time gets SIGUSR1
(the hook dumps all thread stacks) and is stopped the same way.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import statistics
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import CkptdError
from ..ledger.watch import LedgerWatch
from .host import alive, host_report, started_at
from .nvml import GpuReport, NvmlHealthSource
from .protocol import Command, Committed, Failure, Heartbeat, Register, Reply, Status
from .server import SocketServer

log = logging.getLogger("ckptd.daemon")


@dataclass(frozen=True, kw_only=True)
class DaemonConfig:
    """Options of ``ckptd daemon`` (each also from a CKPTD_* variable)."""

    socket: str
    """Unix socket path (mode 0600)."""
    store: str | None = None
    """Default object store for uploads when a job names none."""
    metrics_port: int | None = None
    """Prometheus text on 127.0.0.1:PORT; None: off."""
    poll: float = 0.5
    """Seconds between health polls."""
    hang_factor: float = 10.0
    """A job hangs after this many median step times without progress..."""
    hang_floor: float = 60.0
    """...but never sooner than this many seconds."""
    grace: float = 30.0
    """Seconds from SIGTERM to SIGKILL when stopping a job."""
    degraded_risk: float = 20.0
    """Risk factor sent to the jobs of a degraded GPU."""
    max_clients: int = 256
    """Connections served at once; more get an error reply."""
    idle_timeout: float = 600.0
    """Seconds a connection may stay silent before the daemon closes it (hooks reconnect)."""
    log_file: str | None = None
    """Where the daemon's log goes (shown by ``ckptd status``); None: stderr."""
    job: str | None = None
    """The job this daemon was started for (``ckptd run`` passes CKPTD_JOB): with ``store``, its GPUs' energy
    goes to its goodput ledger from the daemon's start, before the job's first process registers."""
    ledger_every: float = 30.0
    """Seconds per GPU energy record in the jobs' goodput ledgers, and between refreshes of their figures."""

    @property
    def state_file(self) -> str:
        return self.socket + ".state.json"


@dataclass
class Job:
    """One registered trainer process."""

    pid: int
    rank: int
    devices: tuple[int, ...]
    store: str
    local: str = ""
    job: str = ""
    world_size: int = 1
    registered: float = field(default_factory=time.monotonic)
    last_beat: float = field(default_factory=time.monotonic)
    step: int | None = None
    step_times: deque = field(default_factory=lambda: deque(maxlen=32))
    commands: list[Command] = field(default_factory=list)
    durable: set[int] = field(default_factory=set)
    failed: dict[int, str] = field(default_factory=dict)
    last_snapshot: int | None = None
    stopping: float | None = None
    stop_reason: str = ""

    def uses(self, gpu: int) -> bool:
        return not self.devices or gpu in self.devices


_TICKS = 2 / os.sysconf("SC_CLK_TCK")
"""A process's start time is known to a clock tick, rounded down: two ticks of doubt."""


class Daemon:
    """Owns the socket server, the health loop and the uploaders; ``run()`` until ``stop()``. Thread-safe."""

    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.started = time.monotonic()
        self.jobs: dict[int, Job] = {}
        self.bad_gpus: dict[int, str] = {}
        self._bad_since: dict[int, float] = {}
        """When each bad GPU went bad (Unix seconds): a process older than that may be using it."""
        self.faults: dict[str, int] = {}
        """Faults this daemon stopped each job (by job id) for; told to its next launch's policy."""
        self.events: list[dict[str, Any]] = []
        self.gpus: list[GpuReport] = []
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._uploaders: dict[str, Any] = {}
        self._submitted: set[tuple[str, int]] = set()
        self._work: queue.Queue = queue.Queue()
        """Uploads and sweeps, run by one thread: nothing that touches the network holds ``_lock``."""
        self._worker = threading.Thread(target=self._work_loop, name="ckptd-daemon-work", daemon=True)
        self.nvml = NvmlHealthSource()
        self.ledger = LedgerWatch(every=config.ledger_every)
        if config.store and config.job:  # a relative store is ckptd run's, whose directory this daemon shares
            self.ledger.expect(config.store if "://" in config.store else os.path.abspath(config.store), config.job)
        self.server = SocketServer(
            config.socket, self.handle, max_clients=config.max_clients, idle_timeout=config.idle_timeout
        )
        self._metrics = None
        if config.metrics_port is not None:
            from .metrics import Metrics

            self._metrics = Metrics(config.metrics_port)

    # -- messages -------------------------------------------------------------

    def handle(self, msg: Any, peer_pid: int) -> Reply:
        pid = getattr(msg, "pid", None)
        if pid is not None and not is_self_or_descendant(pid, peer_pid):
            return Reply(
                ok=False,
                error=f"pid {pid} is neither this connection's process ({peer_pid}) nor one of "
                "its children; a hook registers its own pid",
            )
        with self._lock:
            if isinstance(msg, Register):
                old = self.jobs.get(msg.pid)
                new = Job(
                    msg.pid,
                    msg.rank,
                    msg.devices,
                    msg.store or (self.config.store or ""),
                    msg.local,
                    msg.job,
                    msg.world_size,
                )
                if old is not None and (old.store, old.job) == (new.store, new.job):  # reconnected
                    new.step, new.commands, new.durable, new.failed = old.step, old.commands, old.durable, old.failed
                    new.last_snapshot = old.last_snapshot
                self.jobs[msg.pid] = new
                self._event("register", pid=msg.pid, rank=msg.rank, devices=list(msg.devices))
                self._stop_if_on_a_bad_gpu(new)
                if self.faults.get(msg.job):
                    n = self.faults[msg.job]
                    self.jobs[msg.pid].commands.append(
                        Command("failures", f"this daemon stopped job {msg.job} {n} time(s) for faults", n)
                    )
                return Reply()
            if isinstance(msg, Status):
                return Reply(status=self.status())
            job = self.jobs.get(msg.pid)
            if job is None:
                return Reply(ok=False, error=f"pid {msg.pid} is not registered; send register first")
            if isinstance(msg, Heartbeat):
                now = time.monotonic()
                if job.step is not None and msg.step > job.step and msg.step_time is None:
                    job.step_times.append((now - job.last_beat) / (msg.step - job.step))
                elif msg.step_time is not None:
                    job.step_times.append(float(msg.step_time))
                job.step, job.last_beat = msg.step, now
                commands, job.commands = tuple(job.commands), []
                durable, job.durable = tuple(sorted(job.durable)), set()
                failed = tuple(Failure(s, e) for s, e in sorted(job.failed.items()))
                job.failed = {}
                return Reply(commands=commands, durable=durable, failed=failed)
            if isinstance(msg, Committed):
                job.last_snapshot = msg.step
                if not job.store.startswith("s3://"):
                    job.durable.add(msg.step)  # a local store: committed is durable
                else:
                    self._work.put((self._upload, job, msg.path, (job.rank,)))
                return Reply()
        return Reply(ok=False, error=f"unexpected {type(msg).__name__}")

    def _work_loop(self) -> None:
        while (item := self._work.get()) is not None:
            fn, *args = item
            try:
                fn(*args)
            except Exception:  # one bad snapshot or store must not stop every upload
                log.exception("ckptd daemon: %s failed", getattr(fn, "__name__", fn))

    def _upload(self, job: Job, path: str, ranks: tuple[int, ...]) -> None:
        """Submit ``ranks``' parts of the committed local directory ``path`` (work thread: may block)."""
        from ..persist.uploader import Uploader
        from ..snapshot.manifest import MANIFEST, Manifest
        from ..store import open_store

        try:
            uploader = self._uploaders.get(job.store)
            if uploader is None:
                uploader = self._uploaders[job.store] = Uploader(open_store(job.store))
            with open(os.path.join(path, MANIFEST), "rb") as f:
                data = f.read(64 << 20)
            manifest = Manifest.from_json(data, source=path)
        except (CkptdError, OSError) as e:
            with self._lock:
                job.failed[job.last_snapshot or 0] = str(e)
                self._event("upload failed", pid=job.pid, path=path, error=str(e))
            return
        with self._lock:
            self._submitted.update((path, r) for r in ranks)
        future = uploader.submit(manifest, data, path, ranks)
        step = manifest.step
        future.add_done_callback(lambda fut: self._uploaded(job, step, fut))

    def _sweep(self, job: Job) -> None:
        """A job died: submit the committed snapshots of its local tier it did not report (work thread)."""
        if not job.local or not job.store.startswith("s3://"):
            return
        from ..snapshot.dirs import PARTIAL, parse_named
        from ..snapshot.manifest import MANIFEST, parse_step_dir
        from ..snapshot.parts import part_name

        dirs = []
        try:
            for name in os.listdir(job.local):
                step = parse_step_dir(name)
                if step is not None and os.path.isfile(os.path.join(job.local, name, MANIFEST)):
                    dirs.append((step, os.path.join(job.local, name), tuple(range(job.world_size))))
            partial = os.path.join(job.local, PARTIAL)
            for name in os.listdir(partial) if os.path.isdir(partial) else []:
                named = parse_named(name)
                path = os.path.join(partial, name)
                if named is not None and os.path.isfile(os.path.join(path, MANIFEST)):
                    ranks = tuple(r for r in range(job.world_size) if os.path.isfile(os.path.join(path, part_name(r))))
                    dirs.append((named[0], path, ranks))
        except OSError:
            return
        for step, path, ranks in sorted(dirs)[-3:]:
            with self._lock:
                left = tuple(r for r in ranks if (path, r) not in self._submitted)
                if left:
                    self._event("sweep", pid=job.pid, step=step, ranks=list(left))
            if left:
                self._upload(job, path, left)

    def _uploaded(self, job: Job, step: int, fut) -> None:
        with self._lock:
            if fut.exception() is None:
                job.durable.add(step)
                self._event("durable", pid=job.pid, step=step)
            else:
                job.failed[step] = str(fut.exception())
                self._event("upload failed", pid=job.pid, step=step, error=str(fut.exception()))

    # -- the loop -------------------------------------------------------------

    def run(self) -> None:
        """Serve and watch until ``stop()`` (or SIGTERM/SIGINT in the main thread)."""
        threading.Thread(target=self.server.serve_forever, name="ckptd-daemon-socket", daemon=True).start()
        self._worker.start()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self._stop.set())
        log.info("ckptd daemon: listening on %s", self.config.socket)
        try:
            while not self._stop.wait(self.config.poll):
                self.tick()
        finally:
            self.close()

    def stop(self) -> None:
        self._stop.set()

    def tick(self) -> None:
        """One round: GPUs, jobs' liveness and progress, stops past their grace, state file."""
        reports = self.nvml.poll()
        energy = self.nvml.energy()
        with self._lock:
            self.gpus = reports
            for r in reports:
                if r.state == "fatal":
                    self._fatal(r)
                elif r.state == "degraded":
                    self._degraded(r)
                elif r.state == "app":
                    self._event("app xid", gpu=r.index, reasons=r.reasons)
            for r in reports:  # a bad GPU stays bad in every view, though its fault was reported once
                if r.index in self.bad_gpus and r.state != "fatal":
                    r.state, r.reasons = "fatal", [f"marked bad: {self.bad_gpus[r.index]}"] + r.reasons
            self._watch_jobs()
            self._write_state()
            self.ledger.tick(time.time(), energy, self.jobs.values(), set(self.bad_gpus))
        if self._metrics is not None:
            self._metrics.update(self)

    def _stop_if_on_a_bad_gpu(self, job: Job) -> None:
        """A job that registers after its GPU went bad (a slow start) is stopped as it would have been. One
        that names no GPU is stopped only if its process is older than the fault: a relaunch that ``ckptd run``
        started afterwards, without that GPU, is not."""
        started = started_at(job.pid)
        for gpu, why in self.bad_gpus.items():
            older = started is not None and started + _TICKS < self._bad_since.get(gpu, 0.0)
            if job.uses(gpu) and (job.devices or older) and job.stopping is None:
                self._stop_job(job, f"fatal fault on GPU {gpu} before it registered: {why}")
                return

    def _fatal(self, r: GpuReport) -> None:
        if r.index not in self.bad_gpus:
            self.bad_gpus[r.index] = "; ".join(r.reasons)
            self._bad_since[r.index] = time.time()
            self._event("gpu bad", gpu=r.index, reasons=r.reasons)
        for job in self.jobs.values():
            if job.uses(r.index) and job.stopping is None:
                self._stop_job(job, f"fatal fault on GPU {r.index}: {'; '.join(r.reasons)}")

    def _degraded(self, r: GpuReport) -> None:
        reason = f"GPU {r.index} degraded: {'; '.join(r.reasons)}"
        for job in self.jobs.values():
            if job.uses(r.index):
                job.commands += [
                    Command("raise_risk", reason, self.config.degraded_risk),
                    Command("snapshot_now", reason),
                ]
        self._event("gpu degraded", gpu=r.index, reasons=r.reasons)

    def _watch_jobs(self) -> None:
        now = time.monotonic()
        for pid, job in list(self.jobs.items()):
            if not alive(pid):
                self._event("job gone", pid=pid, step=job.step, reason=job.stop_reason or "exited")
                self.ledger.gone(job, time.time())
                del self.jobs[pid]
                self._work.put((self._sweep, job))
                continue
            if job.stopping is not None:
                if now - job.stopping > self.config.grace:
                    _signal(pid, signal.SIGKILL)
                continue
            median = statistics.median(job.step_times) if job.step_times else None
            limit = max(self.config.hang_floor, self.config.hang_factor * median) if median else None
            if limit is not None and now - job.last_beat > limit:
                self._event("hang", pid=pid, step=job.step, silent_s=round(now - job.last_beat, 1))
                self.ledger.hang(job, now - job.last_beat, time.time())
                _signal(pid, signal.SIGUSR1)  # the hook dumps every thread's stack
                self._stop_job(job, f"no progress for {now - job.last_beat:.0f} s (limit {limit:.0f} s)")

    def _stop_job(self, job: Job, reason: str) -> None:
        job.stopping, job.stop_reason = time.monotonic(), reason
        self.ledger.stopping(job, reason, time.time())
        if not any(j.job == job.job and j.stopping is not None for j in self.jobs.values() if j is not job):
            self.faults[job.job] = self.faults.get(job.job, 0) + 1  # one fault stops every rank: count it once
        self._event("stop job", pid=job.pid, reason=reason)
        _signal(job.pid, signal.SIGTERM)

    def _event(self, kind: str, **fields: Any) -> None:
        entry = {"t": time.time(), "kind": kind, **fields}
        self.events.append(entry)
        del self.events[:-200]
        log.warning("ckptd daemon: %s %s", kind, fields)

    # -- views ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {
                "pid": os.getpid(),
                "uptime_s": time.monotonic() - self.started,
                "socket": self.config.socket,
                "log": self.config.log_file,
                "nvml": self.nvml.unavailable or "ok",
                "jobs": [
                    {
                        "pid": j.pid,
                        "rank": j.rank,
                        "job": j.job,
                        "step": j.step,
                        "devices": list(j.devices),
                        "step_time_s": statistics.median(j.step_times) if j.step_times else None,
                        "last_snapshot": j.last_snapshot,
                        "stopping": j.stop_reason or None,
                        "silent_s": time.monotonic() - j.last_beat,
                    }
                    for j in self.jobs.values()
                ],
                "gpus": [{**asdict(g), "jobs": self._jobs_on(g)} for g in self.gpus],
                "bad_gpus": self.bad_gpus,
                "backlog": sum(len(p.backlog) for p in list(self._uploaders.values())),
                "host": asdict(host_report([os.path.dirname(self.config.socket)])),
                "events": self.events[-20:],
                "goodput": self.ledger.figures(),
            }

    def _jobs_on(self, gpu: GpuReport) -> list[dict[str, Any]]:
        """The jobs on ``gpu``: registered with it as a device, or seen computing on it by NVML."""
        seen = gpu.processes or []
        return [
            {"job": j.job, "pid": j.pid, "rank": j.rank}
            for j in self.jobs.values()
            if gpu.index in j.devices or any(is_self_or_descendant(p, j.pid) for p in seen)
        ]

    def _write_state(self) -> None:
        tmp = self.config.state_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"bad_gpus": self.bad_gpus, "events": self.events[-50:]}, f)
        os.replace(tmp, self.config.state_file)

    def close(self) -> None:
        self.server.close()
        self._work.put(None)
        if self._worker.is_alive():
            self._worker.join()
        for up in list(self._uploaders.values()):
            up.close(wait=True)
        self.nvml.close()
        self.ledger.close()
        if self._metrics is not None:
            self._metrics.close()


def is_self_or_descendant(pid: int, ancestor: int) -> bool:
    """True if ``pid`` is ``ancestor`` or below it in the process tree (read from /proc)."""
    seen = 0
    while pid > 1 and seen < 4096:
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                stat = f.read()
            pid = int(stat[stat.rindex(b")") + 2 :].split()[1])  # the field after the state letter: ppid
        except (OSError, ValueError, IndexError):
            return False
        seen += 1
    return pid == ancestor


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
