"""A data loader's place in its data, saved with a snapshot so a resumed run sees the same batches in order.

A plain ``torch.utils.data.DataLoader`` keeps no state: its order comes from
generators drawn when ``iter(loader)`` starts an epoch. :func:`adapt` makes
it remember, at each epoch's start, the states of those generators (the
loader's, the samplers', the global torch RNG they fall back to) and of any
stateful sampler, and counts the batches the epoch has yielded. Restoring
puts those states back at the next ``iter(loader)``, replays the epoch's
draws (so worker seeds and the shuffle are the same) and skips the consumed
batches in the sampler, without loading their data. Loaders with their own
``state_dict`` (torchdata's ``StatefulDataLoader``) are saved through it.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from ..errors import IncompatibleSnapshot

VERSION = 1


def is_plain_loader(obj: Any) -> bool:
    """A DataLoader without its own state_dict (StatefulDataLoader has one and is saved through it)."""
    return isinstance(obj, DataLoader) and not callable(getattr(obj, "state_dict", None))


def inexact_reason(loader: DataLoader) -> str | None:
    """Why this loader cannot resume at the saved batch, or None when it can."""
    ds = loader.dataset
    if not isinstance(ds, IterableDataset):
        return None
    if not (callable(getattr(ds, "state_dict", None)) and callable(getattr(ds, "load_state_dict", None))):
        return (
            f"its dataset {type(ds).__name__} is an IterableDataset without state_dict(); a resumed run "
            "starts its data from the beginning. Give the dataset state_dict()/load_state_dict() or use "
            "torchdata's StatefulDataLoader"
        )
    if loader.num_workers > 0:
        return (
            f"its IterableDataset {type(ds).__name__} runs in {loader.num_workers} worker processes, where "
            "its state lives; use num_workers=0 or torchdata's StatefulDataLoader"
        )
    return None


def adapt(loader: DataLoader) -> LoaderPosition:
    """The loader's position, tracked from now on (the loader stays a DataLoader of its own class)."""
    pos = loader.__dict__.get("_ckptd_position")
    if pos is None:
        pos = LoaderPosition(loader)
        loader.__dict__["_ckptd_position"] = pos
        loader.__class__ = _tracked_class(type(loader))
    return pos


class LoaderPosition:
    """state_dict()/load_state_dict() for a plain DataLoader's place in its data. Training thread only."""

    def __init__(self, loader: DataLoader) -> None:
        self._loader = weakref.ref(loader)
        self._epochs = 0
        self._start: dict[str, Any] | None = None
        self._iter: Any = None  # weakref to the newest iterator
        self._pending: dict[str, Any] | None = None
        self._skip: _SkipFirst | None = None

    # -- what a snapshot saves ---------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        loader = self._loader()
        it = self._iter() if self._iter is not None else None
        if loader is None:
            return {"version": VERSION, "epochs": self._epochs, "mid_epoch": False}
        if self._pending is not None:  # restored, and no iter(loader) since
            return {"version": VERSION, "epochs": self._epochs, "mid_epoch": True, **copy.deepcopy(self._pending)}
        if _iterable(loader):
            save = getattr(loader.dataset, "state_dict", None)
            dataset = save() if callable(save) else {}
            return {"version": VERSION, "epochs": self._epochs, "mid_epoch": False, "dataset": dataset}
        consumed = it._num_yielded if it is not None else 0
        if it is None or self._start is None or consumed >= _length(loader):
            # Between epochs: the next iter() starts from the generators as they are now.
            return {"version": VERSION, "epochs": self._epochs, "mid_epoch": False, **_read_states(loader)}
        return {
            "version": VERSION,
            "epochs": self._epochs,
            "mid_epoch": True,
            "consumed": consumed,
            **copy.deepcopy(self._start),
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        loader = self._loader()
        if loader is None:
            return
        if not isinstance(sd, dict) or sd.get("version") != VERSION:
            raise IncompatibleSnapshot(f"loader position {sd!r:.80} is not one this ckptd writes (version {VERSION})")
        self._epochs = int(sd["epochs"])
        if "dataset" in sd:
            if sd["dataset"]:
                loader.dataset.load_state_dict(sd["dataset"])  # type: ignore[attr-defined]  # what saved it has it
            return
        states = {k: sd[k] for k in ("torch_rng", "generators", "samplers", "sampler_epochs")}
        _check_same_shape(loader, states)
        if sd["mid_epoch"]:
            self._pending = {"consumed": int(sd["consumed"]), **states}
        else:
            self._pending = None
            _write_states(loader, states, global_rng=False)

    def summary(self) -> dict[str, Any]:
        """Plain values for ``ckptd inspect``: epochs started and batches consumed in this one."""
        sd = self.state_dict()
        return {"epochs_started": sd["epochs"], "batches_consumed": sd.get("consumed", 0), "mid_epoch": sd["mid_epoch"]}

    # -- what iter(loader) runs ----------------------------------------------

    def iterate(self, loader: DataLoader, make: Any) -> Iterator:
        pending, self._pending = self._pending, None
        saved_rng = torch.get_rng_state() if pending is not None else None
        try:
            if pending is not None:
                _write_states(loader, pending, global_rng=True)
                self._skip = _SkipFirst(pending["consumed"])
            self._start = _read_states(loader)
            self._epochs += 1
            it = make()
            if pending is not None:
                # Replay the sampler's first draw now, while the global RNG is the epoch's.
                sampler_iter = getattr(it, "_sampler_iter", None)
                if isinstance(sampler_iter, _Skipping):
                    sampler_iter.prime()
                if hasattr(it, "_num_yielded"):
                    it._num_yielded = pending["consumed"]
        finally:
            self._skip = None
            if saved_rng is not None:
                torch.set_rng_state(saved_rng)
        self._iter = weakref.ref(it)
        return it

    def index_sampler(self, inner: Any) -> Any:
        return inner if self._skip is None else self._skip.around(inner)


class _SkipFirst:
    """While a resumed epoch's iterator is built: the index sampler, its first ``n`` entries dropped."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._wrapped: dict[int, _SkippingSampler] = {}

    def around(self, inner: Any) -> _SkippingSampler:
        return self._wrapped.setdefault(id(inner), _SkippingSampler(inner, self))


class _SkippingSampler:
    """An index sampler that skips while its _SkipFirst is active and passes through afterwards.

    A persistent-workers iterator keeps this object and calls ``iter()`` on
    it every later epoch, so it must behave as the inner sampler then.
    """

    def __init__(self, inner: Any, skip: _SkipFirst) -> None:
        self.inner, self._skip = inner, skip
        self.active = True

    def __iter__(self):
        if not self.active:
            return iter(self.inner)
        return _Skipping(iter(self.inner), self._skip.n)

    def __len__(self) -> int:
        return len(self.inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class _Skipping:
    """An iterator that drops its first ``n`` items on first use (or at ``prime()``)."""

    def __init__(self, inner: Iterator, n: int) -> None:
        self._inner, self._n = inner, n
        self._head: list = []
        self._primed = False

    def prime(self) -> None:
        if self._primed:
            return
        self._primed = True
        try:
            for _ in range(self._n):
                next(self._inner)
            self._head.append(next(self._inner))
        except StopIteration:
            pass

    def __iter__(self) -> _Skipping:
        return self

    def __next__(self) -> Any:
        self.prime()
        if self._head:
            return self._head.pop()
        return next(self._inner)


_CLASSES: dict[type, type] = {}


def _tracked_class(cls: type) -> type:
    if cls.__dict__.get("_ckptd_tracked"):
        return cls
    if cls not in _CLASSES:

        def __iter__(self):  # noqa: N807
            return self.__dict__["_ckptd_position"].iterate(self, lambda: cls.__iter__(self))

        def _index_sampler(self):
            return self.__dict__["_ckptd_position"].index_sampler(cls._index_sampler.fget(self))

        _CLASSES[cls] = type(
            cls.__name__,
            (cls,),
            {
                "__iter__": __iter__,
                "_index_sampler": property(_index_sampler),
                "_ckptd_tracked": True,
                "__module__": cls.__module__,
                "__qualname__": cls.__qualname__,
                "__doc__": cls.__doc__,
            },
        )
    return _CLASSES[cls]


def _iterable(loader: DataLoader) -> bool:
    return isinstance(loader.dataset, IterableDataset)


def _length(loader: DataLoader) -> int:
    try:
        return len(loader)
    except TypeError:
        return 1 << 62


def _samplers(loader: DataLoader) -> dict[str, Any]:
    """The samplers whose state decides the order, by role, each object once."""
    found: dict[str, Any] = {}
    bs = loader.batch_sampler
    for role, obj in (
        ("sampler", loader.sampler),
        ("batch_sampler", bs),
        ("batch_sampler.sampler", getattr(bs, "sampler", None)),
    ):
        if obj is not None and all(obj is not o for o in found.values()):
            found[role] = obj
    return found


def _generators(loader: DataLoader) -> dict[str, torch.Generator]:
    gens: dict[str, torch.Generator] = {}
    cands = [("loader", loader.generator)] + [(r, getattr(s, "generator", None)) for r, s in _samplers(loader).items()]
    for role, g in cands:
        if isinstance(g, torch.Generator) and all(g is not o for o in gens.values()):
            gens[role] = g
    return gens


def _read_states(loader: DataLoader) -> dict[str, Any]:
    samplers = _samplers(loader)
    return {
        "torch_rng": torch.get_rng_state(),
        "generators": {r: g.get_state() for r, g in _generators(loader).items()},
        "samplers": {
            r: copy.deepcopy(s.state_dict())
            for r, s in samplers.items()
            if callable(getattr(s, "state_dict", None)) and callable(getattr(s, "load_state_dict", None))
        },
        "sampler_epochs": {
            r: s.epoch
            for r, s in samplers.items()
            if callable(getattr(s, "set_epoch", None)) and isinstance(getattr(s, "epoch", None), int)
        },
    }


def _write_states(loader: DataLoader, states: dict[str, Any], *, global_rng: bool) -> None:
    if global_rng:
        torch.set_rng_state(states["torch_rng"])
    gens = _generators(loader)
    for role, st in states["generators"].items():
        gens[role].set_state(st)
    samplers = _samplers(loader)
    for role, sd in states["samplers"].items():
        samplers[role].load_state_dict(copy.deepcopy(sd))
    for role, epoch in states["sampler_epochs"].items():
        samplers[role].set_epoch(epoch)


def _check_same_shape(loader: DataLoader, states: dict[str, Any]) -> None:
    """The saved generators and samplers exist in this loader; IncompatibleSnapshot naming the first that does not."""
    have = {"generators": _generators(loader), "samplers": _samplers(loader), "sampler_epochs": _samplers(loader)}
    for kind in ("generators", "samplers", "sampler_epochs"):
        for role in states[kind]:
            if role not in have[kind]:
                raise IncompatibleSnapshot(
                    f"the snapshot's loader position has a {kind[:-1].replace('_', ' ')} at {role!r} that this "
                    f"DataLoader has not; build the loader as it was when the snapshot was taken"
                )
