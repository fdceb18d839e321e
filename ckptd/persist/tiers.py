"""Tiers: every snapshot commits to a local tier first, then to the object store (no torch).

A snapshot is durable once its manifest is in the object store (or, with a
local store only, once committed locally); its parts get there through the
commit protocol, uploaded by this process or by the node's daemon. Local
retention never deletes what is not durable yet; restore takes the newest
snapshot that verifies in either tier, and a snapshot that fails in any
way is reported and skipped, never loaded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading
import warnings
from concurrent.futures import Future

from ..errors import CkptdError, ConfigError, NoGoodSnapshot, NoSnapshot, SnapshotCorrupt, StoreError, warn
from ..restore.find import SnapshotInfo, list_snapshots, read_manifest, snapshot_steps
from ..restore.verify import verify_dir
from ..snapshot.dirs import LocalCommit
from ..snapshot.manifest import Manifest, manifest_key, step_dir
from ..store.base import Store
from ..store.file import FileStore
from . import retention
from .transfer import download_snapshot
from .uploader import UploadConfig, Uploader

log = logging.getLogger("ckptd")


def default_local_dir(uri: str, job: str | None = None) -> str:
    """The local tier of an object-store URI unless told: under $CKPTD_LOCAL or the temp dir, per job."""
    base = os.environ.get("CKPTD_LOCAL") or os.path.join(tempfile.gettempdir(), f"ckptd-{os.getuid()}")
    store = hashlib.sha256(uri.encode()).hexdigest()[:16]
    if not job:
        return os.path.join(base, store)
    return os.path.join(base, store, "job-" + hashlib.sha256(job.encode()).hexdigest()[:12])


class Tiers:
    """The local tier, the optional remote one and the uploader between them.

    Thread-safe: ``take_over`` and ``mark_*`` come from the daemon link's thread, ``close`` from the trainer's;
    an upload asked for after ``close`` fails its future at once instead of starting an uploader nobody stops.
    """

    def __init__(
        self,
        store: Store,
        *,
        local: str | None,
        rank: int,
        world_size: int,
        rule: retention.Retention,
        upload: UploadConfig | None = None,
        external: bool = False,
    ) -> None:
        self.rule = rule
        self.rank = rank
        self.world_size = world_size
        self.external = external
        """True when the node's daemon uploads: durability is then reported through mark_durable()."""
        self._lock = threading.Lock()
        self._awaiting: dict[int, tuple[Future, LocalCommit]] = {}
        self._upload_config = upload
        self._uploader: Uploader | None = None
        self._closed = False
        if isinstance(store, FileStore):
            if local is not None:
                raise ConfigError(
                    f"local={local!r} applies to object stores; {store.uri} is already local: drop local="
                )
            self.local, self.remote = store, None
            return
        self.local = FileStore(local or default_local_dir(store.uri))
        self.remote = store

    # -- durability -----------------------------------------------------------------

    @property
    def backlog(self) -> list[int]:
        """Steps committed locally and not yet durable."""
        with self._lock:
            waiting = set(self._awaiting)
        return sorted(waiting | set(self._uploader.backlog if self._uploader else []))

    def detail(self, step: int) -> str:
        """What a step that is not durable yet waits for."""
        if self._uploader is not None and step in self._uploader.backlog:
            return self._uploader.detail(step)
        if step in self._awaiting:
            return "the node daemon has not reported it committed yet"
        return "nothing"

    def committed(self, done: LocalCommit) -> Future:
        """A snapshot was committed locally; the future completes when it is durable (whole, remotely)."""
        if self.remote is None:
            fut: Future = Future()
            fut.set_result(done.manifest.step)
            return fut
        with self._lock:
            if self.external:
                fut = Future()
                self._awaiting[done.manifest.step] = (fut, done)
                return fut
        return self._upload(done)

    def _upload(self, done: LocalCommit) -> Future:
        with self._lock:
            if self._closed:
                fut: Future = Future()
                fut.set_exception(
                    StoreError(f"step {done.manifest.step} was not uploaded: its Checkpointer closed first")
                )
                return fut
            if self._uploader is None:  # started on first use: readers never need the thread
                if self.remote is None:
                    raise RuntimeError("no object store to upload to")
                self._uploader = Uploader(self.remote, config=self._upload_config)
            uploader = self._uploader
        return uploader.submit(done.manifest, done.data, done.directory, (self.rank,))

    def take_over(self) -> None:
        """The daemon is gone: upload here from now on, starting with what it had not finished."""
        with self._lock:
            if not self.external:
                return
            self.external = False
            awaiting, self._awaiting = dict(self._awaiting), {}
        for _step, (fut, done) in sorted(awaiting.items()):
            _chain(self._upload(done), fut)

    def mark_durable(self, step: int) -> None:
        """The daemon reports ``step`` committed in the object store."""
        with self._lock:
            entry = self._awaiting.pop(step, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(step)

    def mark_failed(self, step: int, error: str) -> None:
        """The daemon reports that ``step`` could not be committed."""
        with self._lock:
            entry = self._awaiting.pop(step, None)
        if entry is not None and not entry[0].done():
            entry[0].set_exception(StoreError(f"the node daemon could not commit step {step}: {error}"))

    # -- retention --------------------------------------------------------------------

    def retain_local(self, step: int) -> None:
        """Local retention after a local commit; whatever is not durable yet is kept."""
        retention.apply(self.local, self.rule, protect=frozenset({step, *self.backlog}))

    def retain_remote(self, step: int) -> None:
        """Object-store retention after ``step`` became durable there (rank 0 only)."""
        if self.remote is None or self.rank != 0:
            return
        retention.apply(self.remote, self.rule, protect=frozenset({step}))
        abort = getattr(self.remote, "abort_stale_uploads", None)
        if abort is not None:
            abort(self.rule.grace)

    def release(self, done: LocalCommit) -> None:
        """A durable snapshot's node-local share (a partial directory) is no longer needed."""
        if not done.whole:
            shutil.rmtree(done.directory, ignore_errors=True)

    def make_room(self, nbytes: int) -> bool:
        """Free ``nbytes`` on the local tier by dropping the oldest durable snapshots; False if impossible."""
        protect = set(self.backlog)
        steps = sorted(snapshot_steps(self.local))
        while shutil.disk_usage(self.local.root).free < nbytes:
            victims = [s for s in steps if s not in protect and (self.remote is None or self._durable(s))]
            if self.remote is None or not victims:
                return False
            retention.delete_snapshot(self.local, victims[0])
            log.warning("ckptd: local tier full; removed durable step %d from %s", victims[0], self.local.uri)
            steps.remove(victims[0])
        return True

    def _durable(self, step: int) -> bool:
        try:
            return self.remote is not None and self.remote.exists(manifest_key(step))
        except StoreError:
            return False

    # -- restore ------------------------------------------------------------------------

    def candidates(self) -> list[int]:
        """Steps that may be restored, newest first, from either tier."""
        steps = set(snapshot_steps(self.local))
        if self.remote is not None:
            try:
                steps |= set(snapshot_steps(self.remote))
            except StoreError as e:
                log.warning("ckptd: cannot list %s (%s); restoring from the local tier only", self.remote.uri, e)
        return sorted(steps, reverse=True)

    def ensure_local(self, step: int) -> Manifest:
        """A verified local copy of ``step``, downloaded if the local one is missing or bad.

        Any defect of this one snapshot (a bad file, a FIFO, a symlink loop,
        absurd sizes, a store error) is raised as SnapshotCorrupt or NoSnapshot.
        """
        bad: CkptdError
        try:
            manifest = read_manifest(self.local, step)
            problems = verify_dir(self.local.path_of(step_dir(step)), manifest)
            if not problems:
                return manifest
            bad = SnapshotCorrupt(f"{self.local.uri}/{step_dir(step)} does not verify: " + "; ".join(problems))
        except (NoSnapshot, SnapshotCorrupt) as e:
            bad = e
        except (OSError, ValueError) as e:
            bad = SnapshotCorrupt(f"{self.local.uri}/{step_dir(step)} cannot be read: {e}")
        if self.remote is None or not self._durable(step):
            raise bad
        if not isinstance(bad, NoSnapshot):
            warnings.warn(f"ckptd: {bad}; downloading {step_dir(step)} from {self.remote.uri}", stacklevel=3)
        retention.delete_snapshot(self.local, step)
        try:
            return download_snapshot(self.remote, step, self.local)
        except (CkptdError, OSError, ValueError) as e:
            if isinstance(e, CkptdError) and not isinstance(e, (StoreError, SnapshotCorrupt)):
                raise
            raise SnapshotCorrupt(f"{self.remote.uri}/{step_dir(step)} cannot be restored: {e}") from e

    def newest_good(self, step: int | None = None, *, below: int | None = None) -> Manifest | None:
        """The asked step (errors if bad), or the newest that verifies in either tier (below ``below``).

        None when neither tier holds any committed snapshot; NoGoodSnapshot,
        naming each defect, when some exist and none verifies.
        """
        if step is not None:
            return self.ensure_local(step)
        bad: list[str] = []
        for candidate in self.candidates():
            if below is not None and candidate >= below:
                continue
            try:
                return self.ensure_local(candidate)
            except NoSnapshot:
                continue
            except (SnapshotCorrupt, StoreError) as e:
                warn(log, f"ckptd: skipping {step_dir(candidate)}: {e}", stacklevel=3)
                bad.append(f"{step_dir(candidate)}: {e}")
        if bad:
            where = self.local.uri if self.remote is None else f"{self.local.uri} and {self.remote.uri}"
            raise NoGoodSnapshot(f"no snapshot in {where} verifies: " + "; ".join(bad), problems=bad)
        return None

    def list(self) -> list[SnapshotInfo]:
        """Snapshots of both tiers, oldest first, with the tiers that hold each."""
        merged: dict[int, SnapshotInfo] = {i.step: i for i in list_snapshots(self.local, tier="local")}
        if self.remote is not None:
            for info in list_snapshots(self.remote, tier="s3"):
                have = merged.get(info.step)
                if have is None or not have.committed:
                    merged[info.step] = info
                elif info.committed:
                    merged[info.step] = SnapshotInfo(**{**have.__dict__, "tiers": ("local", "s3"), "uri": info.uri})
        return [merged[s] for s in sorted(merged)]

    def close(self, *, wait: bool = True) -> None:
        with self._lock:
            self._closed = True
            uploader = self._uploader
        if uploader is not None:
            uploader.close(wait=wait)
        if self.remote is not None:
            self.remote.close()


def _chain(src: Future, dest: Future) -> None:
    def done(f: Future) -> None:
        if dest.done():
            return
        if f.exception() is not None:
            dest.set_exception(f.exception())
        else:
            dest.set_result(f.result())

    src.add_done_callback(done)
