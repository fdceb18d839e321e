"""Running transparent jobs by id, and ``ckptd pause`` (no torch).

Each ``ckptd run --transparent`` leaves a small record beside the node daemon's socket
(``<dir>/ckptd-jobs/<hash>.json``: job id, its pid, store and command) while it runs. ``ckptd pause JOB``
finds the run by job id, pid or store, sends it SIGUSR2 and waits: the run dumps the job, stops it, makes
the image durable and exits 75; the same ``ckptd run --transparent`` command later resumes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from dataclasses import asdict, dataclass

import psutil

from ..daemon.server import default_socket
from ..errors import ConfigError

PAUSE_SIGNAL = signal.SIGUSR2


@dataclass(frozen=True)
class RunRecord:
    """One running ``ckptd run --transparent``."""

    job: str
    pid: int
    started: float
    """The process's start time, so a reused pid is never taken for it."""
    store: str
    command: tuple[str, ...]

    def alive(self) -> bool:
        try:
            p = psutil.Process(self.pid)
            return abs(p.create_time() - self.started) < 1.0 and p.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False


def jobs_dir() -> str:
    return os.path.join(os.path.dirname(default_socket()), "ckptd-jobs")


def _path(job: str) -> str:
    return os.path.join(jobs_dir(), hashlib.sha256(job.encode()).hexdigest()[:16] + ".json")


def register(job: str, store: str, command: tuple[str, ...]) -> RunRecord:
    """Say that this process runs ``job`` (replacing the record of a run of it that is gone)."""
    me = psutil.Process()
    record = RunRecord(job, me.pid, me.create_time(), store, tuple(command))
    os.makedirs(jobs_dir(), mode=0o700, exist_ok=True)
    tmp = _path(job) + f".{me.pid}.tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(record), f)
    os.replace(tmp, _path(job))
    return record


def unregister(record: RunRecord) -> None:
    try:
        with open(_path(record.job)) as f:
            if json.load(f).get("pid") != record.pid:
                return  # a later run of the job wrote it
        os.unlink(_path(record.job))
    except (OSError, ValueError):
        pass


def running() -> list[RunRecord]:
    """The transparent runs alive on this node."""
    out: list[RunRecord] = []
    try:
        names = sorted(os.listdir(jobs_dir()))
    except FileNotFoundError:
        return out
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            with open(os.path.join(jobs_dir(), name)) as f:
                raw = json.load(f)
            record = RunRecord(
                str(raw["job"]), int(raw["pid"]), float(raw["started"]), str(raw["store"]), tuple(raw["command"])
            )
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if record.alive():
            out.append(record)
    return out


def find(spec: str) -> RunRecord:
    """The run whose job id, pid or store is ``spec``; ConfigError naming the runs there are otherwise."""
    runs = running()
    hits = [r for r in runs if spec in (r.job, str(r.pid), r.store)]
    if len(hits) == 1:
        return hits[0]
    listed = "; ".join(f"{r.job} (pid {r.pid}, {r.store})" for r in runs) or "none"
    if not hits:
        raise ConfigError(f"no transparent job {spec!r} runs on this node; running: {listed}")
    raise ConfigError(f"{spec!r} names {len(hits)} transparent jobs; give one's job id: {listed}")


def pause(spec: str, *, timeout: float) -> RunRecord:
    """Ask the run of ``spec`` to dump its job and stop; wait until it has exited (at most ``timeout``)."""
    record = find(spec)
    os.kill(record.pid, PAUSE_SIGNAL)
    deadline = time.monotonic() + timeout
    while record.alive():
        if time.monotonic() > deadline:
            raise ConfigError(
                f"job {record.job} (pid {record.pid}) has not stopped within {timeout:.0f} s; "
                "it may still be making its image durable: see its output"
            )
        time.sleep(0.1)
    return record
