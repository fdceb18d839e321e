"""Random number generator state: Python, NumPy, torch CPU and every CUDA device.

States are kept as tensors and plain values so they load with weights_only.
"""

from __future__ import annotations

import logging
import random
from typing import Any

import torch

np: Any
try:
    import numpy as np
except ImportError:  # pragma: no cover - numpy is a dependency
    np = None

log = logging.getLogger("ckptd")


def capture_rng() -> dict[str, Any]:
    """The current state of every generator this process uses."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss": gauss},
        "torch": torch.get_rng_state(),
    }
    if np is not None:
        s = np.random.get_state(legacy=False)
        state["numpy"] = {
            "bit_generator": s["bit_generator"],
            "key": torch.from_numpy(s["state"]["key"].astype(np.int64)),
            "pos": int(s["state"]["pos"]),
            "has_gauss": int(s["has_gauss"]),
            "gauss": float(s["gauss"]),
        }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng(state: dict[str, Any], *, reseed: int) -> list[str]:
    """Set every generator from ``state``; return warnings for those it reseeded.

    A generator missing from the snapshot (a CUDA device that did not exist,
    NumPy absent when saving) is reseeded deterministically from ``reseed``.
    """
    notes: list[str] = []
    py = state.get("python")
    if py is not None:
        random.setstate((int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss"]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if np is not None:
        s = state.get("numpy")
        if s is None:
            np.random.seed(reseed % 2**32)
            notes.append("NumPy generator not in snapshot: reseeded")
        else:
            np.random.set_state(
                {
                    "bit_generator": s["bit_generator"],
                    "state": {"key": s["key"].numpy().astype(np.uint32), "pos": s["pos"]},
                    "has_gauss": s["has_gauss"],
                    "gauss": s["gauss"],
                }
            )
    if torch.cuda.is_available():
        notes += _restore_cuda(state.get("cuda") or [], reseed)
    return notes


def _restore_cuda(saved: list, reseed: int) -> list[str]:
    notes = []
    count = torch.cuda.device_count()
    for dev in range(count):
        if dev < len(saved):
            torch.cuda.set_rng_state(saved[dev], dev)
        else:
            with torch.cuda.device(dev):
                torch.cuda.manual_seed(reseed + dev)
            notes.append(f"CUDA device {dev} had no saved generator: reseeded from {reseed + dev}")
    if len(saved) > count:
        notes.append(f"snapshot had {len(saved)} CUDA generators, this process sees {count}: extra ones dropped")
    return notes
