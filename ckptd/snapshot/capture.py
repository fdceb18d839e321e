"""Capture: the objects one Checkpointer saves, collected as references.

Model(s), optimizer(s), scheduler(s) and ``extra`` objects each may be one
object or a dict of them. ``extra`` and RNG state are kept per rank, since
every rank has its own; model, optimizer and scheduler once (DCP dedups
replicated values).
"""

from __future__ import annotations

import warnings
from typing import Any, Mapping

import torch

from ..errors import ConfigError, IncompatibleSnapshot
from .rng import capture_rng

_ROLES = ("model", "optimizer", "scheduler")


def _has_state(obj: Any) -> bool:
    return callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))


def _unwrap(model: Any) -> Any:
    """The module inside DDP / DataParallel / torch.compile wrappers, whose keys are portable."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model, torch.nn.Module):
            model = model._orig_mod
        else:
            return model


def _as_named(role: str, obj: Any) -> tuple[bool, dict[str, Any]]:
    if obj is None:
        return True, {}
    if isinstance(obj, Mapping):
        for name, o in obj.items():
            if not isinstance(name, str) or not _has_state(o):
                raise ConfigError(f"{role}[{name!r}] has no state_dict()/load_state_dict(); pass objects that do")
        return False, dict(obj)
    if not _has_state(obj):
        raise ConfigError(
            f"{role}={type(obj).__name__} has no state_dict()/load_state_dict(); "
            f"pass a torch object or a dict of them"
        )
    return True, {"": obj}


class TrainingState:
    """The registered objects; ``capture`` returns references, ``apply`` loads. Not thread-safe."""

    def __init__(self, *, model: Any, optimizer: Any = None, scheduler: Any = None, extra: Any = None) -> None:
        if model is None:
            raise ConfigError("model is required: pass the module (or a dict of modules) to snapshot")
        model = {k: _unwrap(v) for k, v in model.items()} if isinstance(model, Mapping) else _unwrap(model)
        self._single: dict[str, bool] = {}
        self._objs: dict[str, dict[str, Any]] = {}
        for role, obj in zip(_ROLES, (model, optimizer, scheduler)):
            self._single[role], self._objs[role] = _as_named(role, obj)
        if extra is not None and not isinstance(extra, Mapping):
            raise ConfigError("extra must be a dict of objects with state_dict()/load_state_dict()")
        self._single["extra"], self._objs["extra"] = _as_named("extra", extra or {})
        self._single["extra"] = False

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in self._objs["optimizer"].values() if isinstance(o, torch.optim.Optimizer)]

    @property
    def schedulers(self) -> list[Any]:
        return list(self._objs["scheduler"].values())

    def capture(self, rank: int) -> dict[str, Any]:
        """References to all state, nested as saved (``extra`` and ``rng`` keyed by rank)."""
        state: dict[str, Any] = {}
        for role in _ROLES:
            objs = self._objs[role]
            if objs:
                sds = {name: o.state_dict() for name, o in objs.items()}
                state[role] = sds[""] if self._single[role] else sds
        if self._objs["extra"]:
            state["extra"] = {rank: {name: o.state_dict() for name, o in self._objs["extra"].items()}}
        state["rng"] = {rank: capture_rng()}
        return state

    def deferred_ptrs(self) -> set[int]:
        """Addresses of tensors that change only inside ``optimizer.step()``."""
        ptrs = set()
        for opt in self.optimizers:
            for group in opt.param_groups:
                ptrs.update(p.data_ptr() for p in group["params"])
            for st in opt.state.values():
                ptrs.update(v.data_ptr() for v in st.values() if isinstance(v, torch.Tensor))
        return ptrs

    def apply(self, state: Mapping[str, Any], *, rank: int) -> dict[str, Any] | None:
        """Load ``state`` into every object; return this rank's RNG state, if saved."""
        for role in _ROLES:
            objs = self._objs[role]
            if not objs:
                continue
            if role not in state:
                raise IncompatibleSnapshot(f"the snapshot has no {role} state; restore into a matching setup")
            saved = {"": state[role]} if self._single[role] else state[role]
            for name, obj in objs.items():
                label = role if not name else f"{role}[{name!r}]"
                if name not in saved:
                    raise IncompatibleSnapshot(f"the snapshot has no {label}; saved: {sorted(saved)}")
                _load_one(label, obj, saved[name])
        self._apply_extra(state.get("extra", {}), rank)
        return state.get("rng", {}).get(rank)

    def _apply_extra(self, saved: Mapping[Any, Any], rank: int) -> None:
        objs = self._objs["extra"]
        if not objs:
            return
        mine = saved.get(rank)
        if mine is None and saved:
            src = min(saved)
            warnings.warn(f"ckptd: snapshot has no extra state of rank {rank}; using rank {src}'s", stacklevel=3)
            mine = saved[src]
        for name, obj in objs.items():
            if mine is None or name not in mine:
                raise IncompatibleSnapshot(f"the snapshot has no extra[{name!r}]; it was saved without it")
            obj.load_state_dict(mine[name])


def _load_one(label: str, obj: Any, sd: Any) -> None:
    if isinstance(obj, torch.nn.Module):
        _check_module(label, obj, sd)
        obj.load_state_dict(sd)
        return
    try:
        obj.load_state_dict(sd)
    except (KeyError, ValueError, RuntimeError, IndexError) as e:
        raise IncompatibleSnapshot(f"{label} state in the snapshot does not fit: {e}") from e


def _check_module(label: str, module: torch.nn.Module, sd: Mapping[str, Any]) -> None:
    own = module.state_dict()
    problems = [f"{label} {k!r} is not in the snapshot" for k in own if k not in sd]
    problems += [f"snapshot {label} has {k!r}, the model has not" for k in sd if k not in own]
    for k, v in own.items():
        if k in sd and isinstance(v, torch.Tensor) and isinstance(sd[k], torch.Tensor) and v.shape != sd[k].shape:
            problems.append(
                f"{label} {k!r}: snapshot has shape {tuple(sd[k].shape)}, the model has {tuple(v.shape)}"
            )
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise IncompatibleSnapshot(
            "snapshot does not fit the model: " + "; ".join(problems[:5]) + more
            + ". Restore into the architecture it was saved from"
        )
