"""Which snapshot a job restores, and reading it in: every rank the same step, whole on every node, or none.

Rank 0 proposes the newest snapshot that verifies for it; each node's
leader makes a verified local copy (downloading it if needed) while the
other ranks of the node wait; if any node cannot, rank 0 proposes the next
older one. Every rank leaves with the same answer or the same error.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .errors import CkptdError, NoGoodSnapshot, NoSnapshot, SnapshotCorrupt
from .persist.tiers import Tiers
from .restore.fallback import newest_readable, refetching
from .restore.find import read_manifest
from .restore.load import Destinations, read_state
from .restore.verify import checksums_on_load
from .snapshot.capture import TrainingState
from .snapshot.flatten import flatten
from .snapshot.manifest import Manifest, step_dir
from .snapshot.rng import restore_rng
from .snapshot.write import Ranks

log = logging.getLogger("ckptd")

_ERRORS = {cls.__name__: cls for cls in (NoGoodSnapshot, NoSnapshot, SnapshotCorrupt)}


@dataclass(frozen=True, kw_only=True)
class Restorer:
    """Reads the snapshot every rank agrees on into the training state, in place, RNG included."""

    state: TrainingState
    tiers: Tiers
    ranks: Ranks
    group: Any
    """The gloo group the ranks agree over (None for one process)."""
    on_bad_snapshots: str
    """'raise' NoGoodSnapshot when snapshots exist and none reads, or 'start_over'."""

    def restore(self, step: int | None) -> Manifest | None:
        """The manifest of the snapshot now loaded; None when there is none to load (or starting over)."""
        into = self._destinations()
        with checksums_on_load():  # each file is read once, checksummed as it is loaded
            try:
                manifest, state = self._read_agreed(step, into)
            except NoGoodSnapshot as e:
                if self.on_bad_snapshots != "start_over":
                    raise
                if into.touched:
                    raise NoGoodSnapshot(
                        f"{e}; the model and optimizer now hold part of a snapshot that failed as it "
                        "was read into them, so they cannot start over: build them again and restore, "
                        "or remove the bad snapshots",
                        problems=e.problems,
                    ) from e
                log.error("ckptd: %s; starting over from step 0 (on_bad_snapshots='start_over')", e)
                return None
        if manifest is None:
            return None
        rank = self.ranks.rank
        rng = self.state.apply(state, rank=rank)
        notes = restore_rng(rng or {}, reseed=manifest.step * 1000 + rank)
        if rng is None:
            notes.insert(0, f"no RNG state of rank {rank} in the snapshot: generators reseeded")
        for note in notes:
            warnings.warn(f"ckptd: {note}", stacklevel=3)
        return manifest

    def _read_agreed(self, step: int | None, into: Destinations) -> tuple[Manifest | None, Any]:
        """The snapshot every rank restores and this rank's state of it (see restore/fallback.py)."""
        local = self.tiers.local
        return newest_readable(
            lambda s, below: choose(self.tiers, self.ranks, self.group, s, below=below),
            refetching(self.tiers, lambda m: read_state(local.path_of(step_dir(m.step)), m, into=into.fit(m))),
            step=step,
            where=local.uri,
            agree=lambda problem: agree(self.ranks, self.group, problem),
        )

    def _destinations(self) -> Destinations:
        """The model's and optimizers' own tensors, which a restore reads into in place."""
        try:
            leaves = flatten(self.state.capture(self.ranks.rank))
        except CkptdError:
            return Destinations()
        return Destinations(
            {
                leaf.fqn: leaf.value
                for leaf in leaves
                if isinstance(leaf.value, torch.Tensor) and leaf.path[0][1] in ("model", "optimizer")
            }
        )


def choose(tiers: Tiers, ranks: Ranks, group, step: int | None, *, below: int | None = None) -> Manifest | None:
    """The manifest to restore (local copy verified on every node; older than ``below`` if given), None if
    the store holds none."""
    if not ranks.distributed:
        return tiers.newest_good(step, below=below)
    tried: list[str] = []
    while True:
        proposal = _propose(tiers, ranks, group, step, below)
        if proposal is None:
            if tried:
                raise NoGoodSnapshot("no snapshot restores on every rank: " + "; ".join(tried), problems=tried)
            return None
        chosen, problem = _ensure_everywhere(tiers, ranks, group, proposal)
        if problem is None:
            return chosen
        if step is not None:
            raise SnapshotCorrupt(f"{step_dir(proposal)} cannot be restored on every rank: {problem}")
        tried.append(f"{step_dir(proposal)}: {problem}")
        below = proposal


def _propose(tiers: Tiers, ranks: Ranks, group, step: int | None, below: int | None) -> int | None:
    message: list = [None, None, ""]
    if ranks.rank == 0:
        try:
            m = tiers.newest_good(step, below=below)
            message = [None if m is None else m.step, None, ""]
        except CkptdError as e:
            message = [None, type(e).__name__, str(e)]
    dist.broadcast_object_list(message, src=0, group=group)
    if message[1] is not None:
        raise _ERRORS.get(message[1], CkptdError)(message[2])
    return message[0]


def _ensure_everywhere(tiers: Tiers, ranks: Ranks, group, step: int) -> tuple[Manifest | None, str | None]:
    """Node leaders make a verified local copy, then the others read its manifest; (manifest, problem)."""
    manifest, problem = None, None
    if ranks.node_leader:
        manifest, problem = _try(lambda: tiers.newest_good(step))
    for phase in ("copy", "read"):
        if phase == "read" and not ranks.node_leader:
            manifest, problem = _try(lambda: read_manifest(tiers.local, step))
        bad = [(r, p) for r, p in enumerate(_gather(ranks, group, problem)) if p]
        if bad:
            return None, f"rank {bad[0][0]}: {bad[0][1]}"
    return manifest, None


def agree(ranks: Ranks, group, problem: str | None) -> str | None:
    """Every rank's ``problem`` with the snapshot in hand; the first one found, the same on every rank."""
    if not ranks.distributed:
        return problem
    bad = [(r, p) for r, p in enumerate(_gather(ranks, group, problem)) if p]
    return f"rank {bad[0][0]}: {bad[0][1]}" if bad else None


def _try(fn) -> tuple[Manifest | None, str | None]:
    try:
        return fn(), None
    except CkptdError as e:
        return None, str(e)


def _gather(ranks: Ranks, group, problem: str | None) -> list:
    out: list = [None] * ranks.world_size
    dist.all_gather_object(out, problem, group=group)
    return out
