"""PyTorch Lightning: snapshot through ckptd, resume with ``trainer.fit(..., ckpt_path=cb.resume_path())``.

The callback builds a :class:`ckptd.Checkpointer` once the trainer has its
optimizers (``on_train_start``) and calls ``step()`` after every optimizer
step, so parameters and optimizer state are copied in the background and
written off the training thread, on the policy. Lightning's own state (loops,
callbacks, epoch, global step) rides along as an ``extra``; the train
DataLoader's position and the RNG are ckptd's own.

Resuming: ``resume_path()`` names a snapshot (``<store>/step-N``). Lightning
hands that path to its strategy's ``CheckpointIO``, which this callback
wraps in ``setup()``: a path it made is read through ckptd's verifying,
weights-only reader and turned into the checkpoint dict Lightning restores
(model, optimizers, schedulers, loops); the loader position and the RNG are
put back just before the first resumed batch. Any other path goes to the
CheckpointIO it wrapped.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

from ..errors import ConfigError, IncompatibleSnapshot
from . import _snapshots

log = logging.getLogger("ckptd")


def _framework() -> Any:
    """``lightning.pytorch`` where the user imported (or only installed) it, else ``pytorch_lightning``."""
    if "lightning" in sys.modules and "pytorch_lightning" not in sys.modules:
        import lightning.pytorch as pl

        return pl
    try:
        import pytorch_lightning as pl
    except ImportError:
        try:
            import lightning.pytorch as pl
        except ImportError:
            raise ImportError(
                "ckptd.integrations.lightning needs PyTorch Lightning: pip install 'ckptd[lightning]'"
            ) from None
    return pl


pl = _framework()
_Callback: Any = pl.Callback
_CheckpointIO: Any = pl.plugins.CheckpointIO

# Lightning's checkpoint keys that ckptd saves through the registered objects instead.
_TENSOR_KEYS = ("state_dict", "optimizer_states", "lr_schedulers")
_RESUMABLE_WARNING = r"You're resuming from a checkpoint that ended before the epoch ended"


class CkptdCallback(_Callback):
    """Asynchronous ckptd snapshots for a Lightning ``Trainer``; ``resume_path()`` for ``fit(ckpt_path=...)``.

    ``store`` is a path or URI (None: $CKPTD_STORE); ``policy`` as for
    :class:`ckptd.Checkpointer` (None: the risk-aware default); other keywords
    are Checkpointer options. Use one callback per ``fit()``.
    """

    def __init__(self, store: str | None = None, policy: Any = None, **checkpointer_options: Any) -> None:
        from ..config import CheckpointerConfig

        CheckpointerConfig.from_options(checkpointer_options)  # a bad option fails here, not mid-fit
        self.store = _snapshots.store_uri(store)
        self.policy = policy
        self.options = checkpointer_options
        self.checkpointer: Any = None  # a Checkpointer from the start of training on
        self._loaders: list[Any] = []
        self._pending_loaders: dict[str, Any] = {}
        self._pending_rng: dict[str, Any] | None = None
        self._resumed_from: int | None = None
        self._last_step = -1

    def resume_path(self) -> str | None:
        """``<store>/step-N`` of the newest complete snapshot, for ``trainer.fit(..., ckpt_path=...)``; None if none."""
        return _snapshots.resume_path(self.store, self.options.get("local"))

    # -- wiring, before Lightning loads a checkpoint -------------------------------

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit":
            return
        strategy = trainer.strategy
        if not isinstance(strategy.checkpoint_io, _SnapshotIO):
            strategy.checkpoint_io = _SnapshotIO(self, strategy.checkpoint_io, trainer)
        if "process_dataloader" not in strategy.__dict__:
            original = strategy.process_dataloader

            def process_dataloader(dataloader: Any) -> Any:
                dataloader = original(dataloader)
                if trainer.state.stage == pl.trainer.states.RunningStage.TRAINING:
                    self._track_loader(dataloader)
                return dataloader

            strategy.process_dataloader = process_dataloader

    def _track_loader(self, dataloader: Any) -> None:
        """Follow the train DataLoader's position; put a resumed one back before its first iter()."""
        from ..snapshot import loader as _loader

        if not _loader.is_plain_loader(dataloader):
            return
        name = str(len(self._loaders))
        position = _loader.adapt(dataloader)
        self._loaders.append(dataloader)
        pending = self._pending_loaders.pop(name, None)
        if pending is not None:
            position.load_state_dict(pending)

    # -- resuming: Lightning's restore calls these ---------------------------------

    def state_dict(self) -> dict[str, Any]:
        return {}  # ckptd saves this callback's state (loader, RNG) itself

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resumed_from = state_dict.get("step")
        self._pending_loaders = dict(state_dict.get("loaders") or {})
        self._pending_rng = state_dict.get("rng")
        if self._pending_loaders:
            warnings.filterwarnings("ignore", message=_RESUMABLE_WARNING)  # ckptd resumes it mid-epoch

    def _checkpoint_from(self, step: int, trainer: Any) -> dict[str, Any]:
        """Lightning's checkpoint dict, rebuilt from snapshot ``step`` (or the next older that verifies)."""
        state = _snapshots.load_snapshot(self.store, step, self.options.get("local"))
        rank = trainer.global_rank
        extra = _mine(state.get("extra"), rank)
        if not isinstance(extra, dict) or "lightning" not in extra:
            raise IncompatibleSnapshot(
                f"{self.store}: snapshot of step {state['meta']['step']} was not taken by "
                "ckptd's Lightning callback (it has no Lightning state); restore it with "
                "ckptd.Checkpointer.restore() instead"
            )
        checkpoint = dict(extra["lightning"])
        checkpoint["state_dict"] = state["model"]
        checkpoint["optimizer_states"] = _in_order(state.get("optimizer"))
        checkpoint["lr_schedulers"] = _in_order(state.get("scheduler"))
        checkpoint.setdefault("callbacks", {})[self.state_key] = {
            "step": state["meta"]["step"],
            "rng": _mine(state.get("rng"), rank),
            "loaders": _mine(state.get("loader"), rank) or {},
        }
        return checkpoint

    # -- snapshotting ---------------------------------------------------------------

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        from ..hook import Checkpointer
        from ..snapshot.rng import restore_rng

        if self._pending_rng is not None:
            for note in restore_rng(self._pending_rng, reseed=trainer.global_step * 1000 + trainer.global_rank):
                warnings.warn(f"ckptd: {note}", stacklevel=2)
            self._pending_rng = None
        if self.checkpointer is not None:
            raise ConfigError("this CkptdCallback already ran a fit(); make a new one for each fit()")
        optimizers = {str(i): o for i, o in enumerate(trainer.optimizers)} or None
        schedulers = {str(i): c.scheduler for i, c in enumerate(trainer.lr_scheduler_configs)} or None
        loaders = {str(i): dl for i, dl in enumerate(self._loaders)} or None
        self.checkpointer = Checkpointer(
            self.store,
            model=pl_module,
            optimizer=optimizers,
            scheduler=schedulers,
            loader=loaders,
            extra={"lightning": _LightningState(trainer)},
            policy=self.policy,
            **self.options,
        )
        self._last_step = trainer.global_step
        if self._resumed_from is None and self.resume_path() is not None:
            warnings.warn(
                f"ckptd: {self.store} holds snapshots but fit() started from scratch; pass "
                "ckpt_path=callback.resume_path() to resume",
                stacklevel=2,
            )

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.checkpointer is None or step == self._last_step:
            return  # no optimizer step in this batch (gradient accumulation): nothing new to save
        self._last_step = step
        self.checkpointer.step(step - 1)  # ckptd counts the finished step from 0; global_step counts steps

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self.checkpointer is not None:
            self.checkpointer.close()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        if self.checkpointer is not None:
            self.checkpointer.__exit__(type(exception), exception, exception.__traceback__)

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        strategy = trainer.strategy
        if isinstance(strategy.__dict__.get("_checkpoint_io"), _SnapshotIO):
            strategy.checkpoint_io = strategy._checkpoint_io.inner
        strategy.__dict__.pop("process_dataloader", None)


class _LightningState:
    """Lightning's checkpoint minus the tensors ckptd saves through the model, optimizers and schedulers."""

    def __init__(self, trainer: Any) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        full = self._trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        return {k: v for k, v in full.items() if k not in _TENSOR_KEYS}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise IncompatibleSnapshot(
            "Lightning state is restored by trainer.fit(ckpt_path=callback.resume_path()), "
            "not by Checkpointer.restore()"
        )


class _SnapshotIO(_CheckpointIO):
    """The strategy's CheckpointIO, with paths from ``resume_path()`` read from ckptd instead."""

    def __init__(self, callback: CkptdCallback, inner: Any, trainer: Any) -> None:
        self.callback, self.inner, self._trainer = callback, inner, trainer

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        step = _snapshots.step_of(self.callback.store, path)
        if step is None:
            return self.inner.load_checkpoint(path, *args, **kwargs)
        return self.callback._checkpoint_from(step, self._trainer)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)

    def teardown(self) -> None:
        self.inner.teardown()


def _mine(by_rank: Any, rank: int) -> Any:
    """This rank's entry of a per-rank group, else rank 0's (another world size), else None."""
    if not isinstance(by_rank, dict) or not by_rank:
        return None
    return by_rank.get(rank, by_rank.get(min(by_rank)))


def _in_order(named: Any) -> list[Any]:
    """{'0': sd, '1': sd, ...} as the list Lightning keeps."""
    if not named:
        return []
    return [named[k] for k in sorted(named, key=int)]
