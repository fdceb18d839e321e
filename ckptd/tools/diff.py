"""Per-tensor relative change between two snapshots, to watch how training moves them."""

from __future__ import annotations

from typing import Any

import torch

from ..restore.api import load
from ..snapshot.flatten import flatten


def diff(source: str, a: int, b: int) -> list[dict[str, Any]]:
    """Rows of name, shape, relative change ||b − a|| / ||a||, largest first; only in one: change None."""
    sa, sb = load(source, a), load(source, b)
    ta = _tensors(sa)
    tb = _tensors(sb)
    rows: list[dict[str, Any]] = []
    for name in sorted(set(ta) | set(tb)):
        x, y = ta.get(name), tb.get(name)
        if x is None or y is None or x.shape != y.shape:
            either = x if x is not None else y
            assert either is not None  # the name came from one of the two
            rows.append({"name": name, "shape": list(either.shape), "change": None})
            continue
        x64, y64 = x.double(), y.double()
        norm = x64.norm().item()
        delta = (y64 - x64).norm().item()
        rows.append(
            {
                "name": name,
                "shape": list(x.shape),
                "change": delta / norm if norm else (0.0 if not delta else float("inf")),
            }
        )
    return sorted(rows, key=lambda r: -1.0 if r["change"] is None else r["change"], reverse=True)


def _tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    part: dict[str, Any] = {k: state[k] for k in ("model", "optimizer") if k in state}
    return {
        leaf.fqn: leaf.value
        for leaf in flatten(part)
        if isinstance(leaf.value, torch.Tensor) and (leaf.value.is_floating_point() or leaf.value.is_complex())
    }
