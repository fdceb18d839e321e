"""Where this process stands in its job: rank, node, job id, and the store's lease.

Every rank calls :func:`join` with its local tier's root. The ranks learn
which of them share a local tier (a "node" here: the same host and the same
directory), whether one tier holds every rank's files, and rank 0 takes the
store's lease for the whole job; a refusal reaches every rank as the same
error, so no rank trains on while another gave up.
"""

from __future__ import annotations

import datetime
import os
import socket
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from .errors import CkptdError, ConfigError
from .persist.lease import Lease, StoreInUse, job_id
from .snapshot.write import Ranks
from .store.base import Store

_GROUP_TIMEOUT = datetime.timedelta(minutes=10)
"""Bound on every collective of ckptd's own groups: a dead peer fails a snapshot, it never hangs it."""


@dataclass
class JobPlace:
    """This process's ranks, ckptd's process groups and, on rank 0, the store's lease."""

    ranks: Ranks
    decide_group: Any
    lease: Lease | None

    def fence(self) -> None:
        """Raise if this job no longer holds the store (called before each commit)."""
        if self.lease is not None:
            self.lease.check()

    def close(self) -> None:
        if self.lease is not None:
            self.lease.release()
            self.lease = None


def join(store: Store, local_root: str, *, take_over: bool, lease_ttl: float, shared_store: bool) -> JobPlace:
    """Find this rank's place, build ckptd's gloo groups and take the lease (rank 0)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        alone = _take(store, job_id(), take_over, lease_ttl)
        return JobPlace(Ranks(job=alone.job), None, alone)
    # Own gloo groups: collectives from the writer thread must not interleave with training's.
    write_group = dist.new_group(backend="gloo", timeout=_GROUP_TIMEOUT)
    decide_group = dist.new_group(backend="gloo", timeout=_GROUP_TIMEOUT)
    rank, world = dist.get_rank(), dist.get_world_size()
    where = (socket.gethostname(), os.path.realpath(local_root))
    places: list = [None] * world
    dist.all_gather_object(places, where, group=write_group)
    if shared_store and len(set(places)) > 1:
        raise ConfigError(
            f"the store {store.uri} is a local path, but ranks see it on different hosts "
            f"({sorted({h for h, _ in places})}); use a shared file system or an s3:// store"
        )
    lease: Lease | None = None
    outcome: list[str | None] = [None, ""]
    if rank == 0:
        try:
            lease = _take(store, job_id(), take_over, lease_ttl)
            outcome = [lease.job, ""]
        except CkptdError as e:
            outcome = [None, str(e)]
    dist.broadcast_object_list(outcome, src=0, group=write_group)
    if outcome[1]:
        raise StoreInUse(outcome[1])
    leader = places.index(where)
    ranks = Ranks(rank, world, write_group, leader=leader, whole=len(set(places)) == 1, job=outcome[0] or "")
    return JobPlace(ranks, decide_group, lease)


def _take(store: Store, job: str, take_over: bool, ttl: float) -> Lease:
    return Lease(store, job=job, ttl=ttl, take_over=take_over).acquire()
