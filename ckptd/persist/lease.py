"""A store belongs to one job: a lease in the store itself, renewed and expiring (no torch).

Keys under ``.ckptd/``, written with the store's own primitives:

``lease-<gen>.json``      the holder of generation ``gen`` (job, host, pid), created exclusively
``lease-<gen>.beat``      rewritten by the holder every ``ttl / 3`` seconds; its mtime is the renewal
``lease-<gen>.released``  the holder let go

The current lease is the highest generation. A writer takes the next one
(an exclusive create, so of racing writers exactly one wins) when the
current one is released or expired, belongs to its own job (a restart),
belongs to a process on this host that is gone, or when it is told to take
over. A holder that sees a newer generation has lost the store and commits
nothing more (:meth:`Lease.check`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from dataclasses import asdict, dataclass

import psutil

from ..errors import ConfigError, LeaseLost, SnapshotExists, StoreError, StoreInUse
from ..store.base import Store

log = logging.getLogger("ckptd")

PREFIX = ".ckptd"
_NAME = re.compile(r"^\.ckptd/lease-(\d{8})\.(json|beat|released)$")
_MAX_RECORD = 64 << 10


def env_job_id() -> str | None:
    """The job id the launcher gave: $CKPTD_JOB (``ckptd run``), Slurm's job id or torchrun's run id."""
    for var in ("CKPTD_JOB", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID"):
        value = os.environ.get(var, "").strip()
        if value and value != "none":
            if var == "SLURM_JOB_ID" and os.environ.get("SLURM_ARRAY_TASK_ID"):
                value += "_" + os.environ["SLURM_ARRAY_TASK_ID"]
            return value[:128]
    return None


def job_id() -> str:
    """This job's id: the launcher's (:func:`env_job_id`), else this host and process."""
    return env_job_id() or f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Holder:
    """Who holds a lease."""

    job: str
    host: str
    pid: int
    pid_started: float
    ttl: float

    def describe(self) -> str:
        return f"job {self.job} (pid {self.pid} on {self.host})"

    def gone(self) -> bool:
        """True only when the holder is surely dead: a process of this host that no longer runs."""
        if self.host != socket.gethostname():
            return False
        try:
            return abs(psutil.Process(self.pid).create_time() - self.pid_started) > 1.0
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            return True
        except psutil.Error:
            return False


def _key(gen: int, kind: str) -> str:
    return f"{PREFIX}/lease-{gen:08d}.{kind}"


class Lease:
    """One job's hold on a store; a thread renews it until ``release()``. Thread-safe."""

    def __init__(self, store: Store, *, job: str, ttl: float = 60.0, take_over: bool = False) -> None:
        if not ttl > 0:
            raise ConfigError(f"lease ttl={ttl!r}: must be > 0 seconds")
        self.store, self.job, self.ttl, self.take_over = store, job, ttl, take_over
        self.gen: int | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        me = psutil.Process()
        self.me = Holder(job, socket.gethostname(), me.pid, me.create_time(), ttl)

    def acquire(self) -> Lease:
        """Take the store, or raise StoreInUse naming the holder and how to take over."""
        for _ in range(8):
            gen, holder, why_free = self._current()
            if why_free is None:
                assert holder is not None
                raise StoreInUse(
                    f"{self.store.uri} is in use by {holder.describe()}, renewed within the last "
                    f"{holder.ttl:.0f} s; a store belongs to one job: stop that job, or once it is gone pass "
                    "take_over=True (ckptd run --take-over)"
                )
            try:
                self.store.commit(_key(gen + 1, "json"), json.dumps(asdict(self.me)).encode())
            except SnapshotExists:
                continue  # another writer took this generation first: look again
            self.gen = gen + 1
            if gen and why_free != "free":
                log.warning("ckptd: took over %s from %s", self.store.uri, why_free)
            self._beat()
            self._forget_old()
            self._thread = threading.Thread(target=self._renew, name="ckptd-lease", daemon=True)
            self._thread.start()
            return self
        raise StoreInUse(f"{self.store.uri}: the lease changed hands 8 times while taking it; try again")

    def check(self) -> None:
        """Raise LeaseLost if this job no longer holds the store (the fence before every commit).

        Looks at the store itself, not only the renewer's last look, so a takeover is seen at once.
        """
        if self._lost is None and self.gen is not None:
            try:
                self._look_for_newer()
            except (StoreError, OSError):
                pass  # the renewer keeps trying; a store that cannot be listed cannot be committed to either
        if self._lost is not None:
            raise LeaseLost(self._lost)

    @property
    def held(self) -> bool:
        return self.gen is not None and self._lost is None

    def release(self) -> None:
        """Let go: the next job takes the store at once."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.held:
            try:
                self.store.put_bytes(_key(self._gen(), "released"), b"")
            except (StoreError, OSError) as e:
                log.warning(
                    "ckptd: could not release the lease on %s (%s); it expires in %.0f s", self.store.uri, e, self.ttl
                )
        self.gen = None

    close = release

    # -- internals ---------------------------------------------------------------

    def _generations(self) -> dict[int, dict[str, float]]:
        gens: dict[int, dict[str, float]] = {}
        for o in self.store.list(PREFIX):
            m = _NAME.match(o.key)
            if m:
                gens.setdefault(int(m.group(1)), {})[m.group(2)] = o.mtime
        return gens

    def _current(self) -> tuple[int, Holder | None, str | None]:
        """(newest generation, its holder, why it may be taken or None if it may not)."""
        gens = {g: k for g, k in self._generations().items() if "json" in k}
        if not gens:
            return 0, None, "free"
        gen = max(gens)
        kinds = gens[gen]
        holder = self._holder(gen)
        if holder is None:
            return gen, None, "an unreadable lease record"
        if "released" in kinds:
            return gen, holder, "free"
        if holder.job == self.job:
            return gen, holder, f"an earlier process of this job ({holder.describe()})"
        if self.take_over:
            return gen, holder, f"{holder.describe()} (take_over=True)"
        renewed = max(kinds.values())
        if time.time() - renewed > holder.ttl:
            return gen, holder, f"{holder.describe()}, silent for {time.time() - renewed:.0f} s"
        if holder.gone():
            return gen, holder, f"{holder.describe()}, which is no longer running"
        return gen, holder, None

    def _holder(self, gen: int) -> Holder | None:
        try:
            data = self.store.get_bytes(_key(gen, "json"))
            if len(data) > _MAX_RECORD:
                return None
            raw = json.loads(data)
            h = Holder(str(raw["job"]), str(raw["host"]), int(raw["pid"]), float(raw["pid_started"]), float(raw["ttl"]))
            return h if h.ttl > 0 and h.ttl == h.ttl else None
        except (StoreError, ValueError, KeyError, TypeError):
            return None

    def _gen(self) -> int:
        """The generation this lease holds; only asked while it is held."""
        if self.gen is None:
            raise RuntimeError("the lease is not held")
        return self.gen

    def _beat(self) -> None:
        self.store.put_bytes(_key(self._gen(), "beat"), b"")

    def _forget_old(self) -> None:
        old = [_key(g, k) for g, kinds in self._generations().items() if g < self._gen() - 1 for k in kinds]
        if old:
            self.store.delete(old)

    def _look_for_newer(self) -> bool:
        """True (and the lease marked lost) when a later generation exists."""
        newer = [g for g, k in self._generations().items() if g > self._gen() and "json" in k]
        if newer and self._lost is None:
            holder = self._holder(max(newer))
            self._lost = (
                f"the lease on {self.store.uri} was taken over by "
                f"{holder.describe() if holder else 'another job'}; this job commits nothing more there"
            )
            log.error("ckptd: %s", self._lost)
        return bool(newer)

    def _renew(self) -> None:
        warned = False
        while not self._stop.wait(self.ttl / 3):
            try:
                if self._look_for_newer():
                    return
                self._beat()
                warned = False
            except (StoreError, OSError) as e:
                if not warned:
                    log.warning("ckptd: cannot renew the lease on %s (%s); retrying", self.store.uri, e)
                    warned = True
