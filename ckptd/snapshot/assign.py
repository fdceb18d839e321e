"""Which rank writes which value of a multi-rank snapshot, learned once from DCP's own plan.

DCP's planner writes a tensor or value that several ranks hold (DDP's
replicated parameters and optimizer state) once, on one rank, spreading the
bytes over the ranks. ckptd's first multi-rank snapshot goes through
``dcp.save``; its item index says which rank's data file got each value.
From then on each rank lays out its file image for its own share only,
stages only that share and writes it with O_DIRECT: the same bytes, in the
same places DCP would put them, without the page cache and without copying
what another rank writes. A rank whose state no longer matches its share
(a new tensor, another shape) says so, and that snapshot goes through DCP
again, which teaches the next assignment.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .manifest import Item

_DATA_FILE = re.compile(r"__(\d+)_0\.distcp")
Shape = tuple[tuple[int, ...], str]
"""A tensor's (shape, dtype name)."""


@dataclass(frozen=True)
class Assignment:
    """Every value's writer: tensors with the shape and dtype they had, other values by name."""

    tensors: Mapping[str, tuple[int, Shape]]
    objects: Mapping[str, int]
    world_size: int

    @classmethod
    def from_items(cls, items: Iterable[Item], world_size: int) -> Assignment | None:
        """The assignment a DCP-written snapshot's items show; None if one is not a whole tensor or a value
        in one rank's data file (sharded state, which stays with DCP)."""
        tensors: dict[str, tuple[int, Shape]] = {}
        objects: dict[str, int] = {}
        for item in items:
            if item.kind == "empty":
                continue
            m = _DATA_FILE.fullmatch(item.file)
            if m is None or int(m.group(1)) >= world_size:
                return None
            rank = int(m.group(1))
            if item.kind == "object":
                objects[item.fqn] = rank
            elif item.chunk_sizes == item.shape and item.fqn not in tensors:
                tensors[item.fqn] = (rank, (tuple(item.shape), item.dtype))
            else:
                return None
        return cls(tensors, objects, world_size)

    def share(self, rank: int, tensors: Mapping[str, Shape], objects: Iterable[str]) -> set[str] | None:
        """The names ``rank`` writes, given the tensors (fqn → shape, dtype) and values it holds now; None
        when what it holds does not fit this assignment (a new name, another shape, or its share missing)."""
        mine: set[str] = set()
        for fqn, spec in tensors.items():
            known = self.tensors.get(fqn)
            if known is None or known[1] != spec:
                return None
            if known[0] == rank:
                mine.add(fqn)
        for fqn in objects:
            owner = self.objects.get(fqn)
            if owner is None:
                return None
            if owner == rank:
                mine.add(fqn)
        owed = {f for f, (r, _) in self.tensors.items() if r == rank} | {
            f for f, r in self.objects.items() if r == rank
        }
        return mine if mine == owed else None


def spec_of(value: Any) -> Shape:
    """(shape, dtype name) of a tensor, as the manifest names them."""
    return tuple(value.shape), str(value.dtype).removeprefix("torch.")
