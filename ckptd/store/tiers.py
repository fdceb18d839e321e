"""Tiers: every snapshot commits to a local store first, then is promoted to S3.

A snapshot is durable once its manifest is in the object store (or, with a
local store only, once committed locally). Local retention never deletes a
snapshot that is not yet durable; restore takes the newest snapshot that
verifies in either tier, downloading it when only the object store has it.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from concurrent.futures import Future

from ..errors import CkptdError, NoSnapshot, SnapshotCorrupt, StoreError
from ..restore.find import SnapshotInfo, list_snapshots, read_manifest, snapshot_steps
from ..restore.verify import verify_dir
from ..snapshot.manifest import Manifest, step_dir
from . import retention
from .base import Store
from .file import FileStore
from .promote import PromoteConfig, Promoter
from .transfer import download_snapshot

log = logging.getLogger("ckptd")


def default_local_dir(uri: str) -> str:
    """Where the local tier of an object-store URI lives unless told: $CKPTD_LOCAL or the temp dir."""
    base = os.environ.get("CKPTD_LOCAL") or os.path.join(tempfile.gettempdir(), f"ckptd-{os.getuid()}")
    return os.path.join(base, hashlib.sha256(uri.encode()).hexdigest()[:16])


class Tiers:
    """The local tier, the optional remote one and the uploader between them. Thread-safe."""

    def __init__(self, store: Store, *, local: str | None, rank: int, world_size: int,
                 rule: retention.Retention, promote: PromoteConfig | None = None, external: bool = False) -> None:
        self.rule = rule
        self.rank = rank
        self.external = external
        """True when the node's daemon uploads: durability is then reported through mark_durable()."""
        self._awaiting: dict[int, Future] = {}
        if isinstance(store, FileStore):
            if local is not None:
                raise CkptdError(f"local={local!r} applies to object stores; {store.uri} is already local")
            self.local, self.remote, self._promoter = store, None, None
            return
        self.local = FileStore(local or default_local_dir(store.uri))
        self.remote = store
        self._promote_args = dict(rank=rank, world_size=world_size, config=promote)
        self._promoter: Promoter | None = None

    @property
    def backlog(self) -> list[int]:
        return sorted(self._awaiting) + (self._promoter.backlog if self._promoter else [])

    def take_over(self) -> None:
        """The daemon is gone: upload here from now on, starting with what it had not finished."""
        if not self.external:
            return
        self.external = False
        for step, fut in sorted(self._awaiting.items()):
            try:
                own = self.committed(read_manifest(self.local, step))
            except (NoSnapshot, SnapshotCorrupt) as e:
                fut.set_exception(e)
                continue
            own.add_done_callback(lambda done, fut=fut: fut.set_exception(done.exception()) if done.exception()
                                  else fut.set_result(done.result()))
        self._awaiting.clear()

    def mark_durable(self, step: int) -> None:
        """The daemon reports ``step`` durable in the object store."""
        fut = self._awaiting.pop(step, None)
        if fut is not None:
            fut.set_result(step)

    def committed(self, manifest: Manifest) -> Future:
        """A snapshot was committed locally; the future completes when it is durable."""
        if self.remote is None:
            done: Future = Future()
            done.set_result(manifest.step)
            return done
        if self.external:
            self._awaiting[manifest.step] = Future()
            return self._awaiting[manifest.step]
        if self._promoter is None:  # started on first use: readers never need the thread
            self._promoter = Promoter(self.local, self.remote, **self._promote_args)
        return self._promoter.submit(manifest, manifest.to_json())

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

    def make_room(self, nbytes: int) -> bool:
        """Free ``nbytes`` on the local tier by dropping the oldest durable snapshots; False if impossible."""
        protect = set(self.backlog)
        steps = sorted(snapshot_steps(self.local))
        while shutil.disk_usage(self.local.root).free < nbytes:
            victims = [s for s in steps if s not in protect and (self.remote is None or self._durable(s))]
            if self.remote is None or len(victims) == 0:
                return False
            retention.delete_snapshot(self.local, victims[0])
            log.warning("ckptd: local tier full; removed durable step %d from %s", victims[0], self.local.uri)
            steps.remove(victims[0])
        return True

    def _durable(self, step: int) -> bool:
        try:
            return self.remote is not None and self.remote.exists(f"{step_dir(step)}/ckptd.json")
        except StoreError:
            return False

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
        """A verified local copy of ``step``, downloaded if the local one is missing or bad."""
        try:
            manifest = read_manifest(self.local, step)
            problems = verify_dir(self.local.path_of(step_dir(step)), manifest)
            if not problems:
                return manifest
            bad = SnapshotCorrupt(f"{self.local.uri}/{step_dir(step)} does not verify: " + "; ".join(problems))
        except NoSnapshot as e:
            bad = e
        except SnapshotCorrupt as e:
            bad = e
        if self.remote is None or not self._durable(step):
            raise bad
        if not isinstance(bad, NoSnapshot):
            warnings.warn(f"ckptd: {bad}; downloading {step_dir(step)} from {self.remote.uri}", stacklevel=3)
        retention.delete_snapshot(self.local, step)
        return download_snapshot(self.remote, step, self.local)

    def newest_good(self, step: int | None = None) -> Manifest | None:
        """The asked step (errors if bad), or the newest that verifies in either tier, or None."""
        if step is not None:
            return self.ensure_local(step)
        for candidate in self.candidates():
            try:
                return self.ensure_local(candidate)
            except NoSnapshot:
                continue
            except (SnapshotCorrupt, StoreError) as e:
                warnings.warn(f"ckptd: skipping {step_dir(candidate)}: {e}", stacklevel=3)
                log.warning("ckptd: skipping %s: %s", step_dir(candidate), e)
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
                    merged[info.step] = SnapshotInfo(**{**have.__dict__, "tiers": ("local", "s3")})
        return [merged[s] for s in sorted(merged)]

    def close(self, *, wait: bool = True) -> None:
        if self._promoter is not None:
            self._promoter.close(wait=wait)
        if self.remote is not None:
            self.remote.close()
