"""Export a snapshot as one consolidated file: torch (weights_only-loadable) or safetensors."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch

from ..errors import ConfigError
from ..restore.api import load
from ..snapshot.flatten import flatten
from . import torchsnapshot_format as tsf

_ROLES = ("model", "optimizer", "scheduler", "extra", "meta")


def state_of(source: str, step: int | None) -> dict[str, Any]:
    """ckptd.load()'s state of a ckptd store, or a torchsnapshot directory mapped to the same keys."""
    if "://" not in source and tsf.is_torchsnapshot(source):
        return from_torchsnapshot(tsf.read_state(source))
    return load(source, step)


def from_torchsnapshot(app: dict[str, Any]) -> dict[str, Any]:
    """torchsnapshot app-state keys → ckptd's: model, optim(izer), (lr_)scheduler; the rest is extra."""
    names = {
        "model": "model",
        "optim": "optimizer",
        "optimizer": "optimizer",
        "scheduler": "scheduler",
        "lr_scheduler": "scheduler",
    }
    state: dict[str, Any] = {}
    extra = {}
    for key, value in app.items():
        if names.get(key) in state or key not in names:
            extra[key] = value
        else:
            state[names[key]] = value
    if extra:
        state["extra"] = {0: extra}
    return state


def export(
    source: str, out: str, *, fmt: str, step: int | None = None, only: str | None = None, force: bool = False
) -> dict[str, Any]:
    """Write the snapshot to ``out``; returns what was written (tensor count, bytes, skipped values)."""
    if fmt not in ("torch", "safetensors"):
        raise ConfigError(f"--format {fmt!r}: use torch or safetensors")
    if os.path.exists(out) and not force:
        raise ConfigError(f"{out} exists; pass --force to replace it or choose another -o")
    state = state_of(source, step)
    if only is not None:
        if only not in state:
            raise ConfigError(f"--only {only}: the snapshot has {sorted(k for k in state if k in _ROLES)}")
        obj: Any = state[only]
    else:
        obj = {k: state[k] for k in _ROLES if k in state}
    leaves = flatten(obj if isinstance(obj, dict) else {"value": obj})
    tensors = {leaf.fqn: leaf.value for leaf in leaves if isinstance(leaf.value, torch.Tensor)}
    skipped = len(leaves) - len(tensors)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(out)) or ".", prefix=".ckptd-export-")
    os.close(fd)
    try:
        if fmt == "torch":
            with open(tmp, "wb") as f:
                torch.save(obj, f)
            skipped = 0
        else:
            from safetensors.torch import save_file

            meta = {"format": "ckptd", "step": str(state.get("meta", {}).get("step", ""))}
            save_file({k: v.contiguous().clone() for k, v in tensors.items()}, tmp, metadata=meta)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return {"tensors": len(tensors), "bytes": os.path.getsize(out), "skipped_values": skipped, "path": out}
