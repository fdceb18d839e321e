"""Capture: the objects one Checkpointer saves, collected as references.

Model(s), optimizer(s), scheduler(s) and data loader(s) each may be one
object or a dict of them; ``extra`` is a dict. ``loader``, ``extra`` and RNG
state are kept per rank, since every rank has its own; model, optimizer and
scheduler once (DCP dedups replicated values). A plain DataLoader, as
``loader`` or in ``extra``, is saved through its position (``loader.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import ConfigError, IncompatibleSnapshot
from . import loader as _loader
from .flatten import flatten
from .rng import capture_rng

_ROLES = ("model", "optimizer", "scheduler")
_PER_RANK = ("loader", "extra")


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
        named = {}
        for name, o in obj.items():
            if _loader.is_plain_loader(o):
                o = _adapt(f"{role}[{name!r}]", o)
            if not isinstance(name, str) or not _has_state(o):
                raise ConfigError(f"{role}[{name!r}] has no state_dict()/load_state_dict(); pass objects that do")
            named[name] = o
        return False, named
    if _loader.is_plain_loader(obj):
        obj = _adapt(role, obj)
    if not _has_state(obj):
        raise ConfigError(
            f"{role}={type(obj).__name__} has no state_dict()/load_state_dict(); pass a torch object or a dict of them"
        )
    return True, {"": obj}


def _adapt(label: str, loader: Any) -> _loader.LoaderPosition:
    """A plain DataLoader's tracked position; warns once, here, if it cannot resume exactly."""
    why = _loader.inexact_reason(loader)
    if why is not None:
        warnings.warn(f"ckptd: {label} will not resume at the saved batch: {why}", stacklevel=5)
    return _loader.adapt(loader)


class TrainingState:
    """The registered objects; ``capture`` returns references, ``apply`` loads. Not thread-safe."""

    def __init__(
        self, *, model: Any, optimizer: Any = None, scheduler: Any = None, extra: Any = None, loader: Any = None
    ) -> None:
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
        self._single["loader"], self._objs["loader"] = _as_named("loader", loader)
        self._check_saveable()

    def _check_saveable(self) -> None:
        """Refuse now, not at the first snapshot, per-rank state a snapshot could not hold."""
        flatten({g: {0: self._per_rank(g)} for g in _PER_RANK if self._objs[g]})

    def _per_rank(self, group: str) -> Any:
        sds = {name: o.state_dict() for name, o in self._objs[group].items()}
        return sds[""] if self._single[group] else sds

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
        for group in _PER_RANK:
            if self._objs[group]:
                state[group] = {rank: self._per_rank(group)}
        state["rng"] = {rank: capture_rng()}
        return state

    def deferred_ptrs(self) -> set[int]:
        """Addresses of tensors that change only inside ``optimizer.step()``."""
        ptrs: set[int] = set()
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
        for group in _PER_RANK:
            self._apply_per_rank(group, state.get(group, {}), rank)
        return state.get("rng", {}).get(rank)

    def _apply_per_rank(self, group: str, saved: Mapping[Any, Any], rank: int) -> None:
        objs = self._objs[group]
        if not objs:
            return
        mine = saved.get(rank)
        if mine is None and saved:
            src = min(saved)
            warnings.warn(f"ckptd: snapshot has no {group} state of rank {rank}; using rank {src}'s", stacklevel=3)
            mine = saved[src]
        if mine is not None and self._single[group]:
            mine = {"": mine}
        for name, obj in objs.items():
            label = group if not name else f"{group}[{name!r}]"
            if mine is None or name not in mine:
                raise IncompatibleSnapshot(f"the snapshot has no {label}; it was saved without it")
            _load_one(label, obj, mine[name])


def summarize(state: Mapping[str, Any]) -> dict[str, Any]:
    """The non-tensor groups of a captured state as small JSON values, for ``ckptd inspect``.

    Optimizers show their param groups (lr and the other hyperparameters,
    with a parameter count instead of the ids); tensors show as their shape.
    """
    out: dict[str, Any] = {}
    opt = state.get("optimizer")
    if isinstance(opt, Mapping):
        named = {"": opt} if "param_groups" in opt else opt
        out["optimizer"] = {
            name: [
                {**{k: _plain(v) for k, v in g.items() if k != "params"}, "params": len(g.get("params", ()))}
                for g in sd.get("param_groups", ())
            ]
            for name, sd in named.items()
            if isinstance(sd, Mapping)
        }
    for group in ("scheduler", "loader", "extra"):
        if group in state:
            out[group] = _plain(state[group])
    return out


def _plain(value: Any, depth: int = 0) -> Any:
    """``value`` as JSON: tensors as 'tensor(shape) dtype', long lists and deep nests cut short."""
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (bool, int, str)) or value is None:
        return value if not isinstance(value, str) or len(value) <= 80 else value[:77] + "..."
    if isinstance(value, float):
        return value if value == value and abs(value) != float("inf") else str(value)
    if depth >= 4:
        return "..."
    if isinstance(value, Mapping):
        items = list(value.items())
        out = {str(k): _plain(v, depth + 1) for k, v in items[:20]}
        if len(items) > 20:
            out["..."] = f"{len(items) - 20} more"
        return out
    if isinstance(value, (list, tuple)):
        head = [_plain(v, depth + 1) for v in value[:8]]
        return head + [f"... {len(value) - 8} more"] if len(value) > 8 else head
    return type(value).__name__


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
            problems.append(f"{label} {k!r}: snapshot has shape {tuple(sd[k].shape)}, the model has {tuple(v.shape)}")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise IncompatibleSnapshot(
            "snapshot does not fit the model: "
            + "; ".join(problems[:5])
            + more
            + ". Restore into the architecture it was saved from"
        )
