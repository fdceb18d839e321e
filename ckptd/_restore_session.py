"""Which snapshot a job restores: every rank the same step, whole on every node, or none.

Rank 0 proposes the newest snapshot that verifies for it; each node's
leader makes a verified local copy (downloading it if needed) while the
other ranks of the node wait; if any node cannot, rank 0 proposes the next
older one. Every rank leaves with the same answer or the same error.
"""

from __future__ import annotations

import torch.distributed as dist

from .errors import CkptdError, NoGoodSnapshot, NoSnapshot, SnapshotCorrupt
from .persist.tiers import Tiers
from .restore.find import read_manifest
from .snapshot.manifest import Manifest, step_dir
from .snapshot.write import Ranks

_ERRORS = {cls.__name__: cls for cls in (NoGoodSnapshot, NoSnapshot, SnapshotCorrupt)}


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
