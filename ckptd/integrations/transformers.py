"""Hugging Face Trainer: snapshot through ckptd, resume with ``trainer.train(resume_from_checkpoint=cb.resume_path())``.

The callback builds a :class:`ckptd.Checkpointer` at ``on_train_begin`` (the
Trainer's model, optimizer and scheduler are ready then) and calls ``step()``
at every ``on_step_end``: parameters and optimizer state are copied in the
background and written off the training thread, on the policy. The Trainer's
own state (``trainer_state.json``: global step, epoch, log history) rides along
as an ``extra``; the RNG is ckptd's.

Resuming: the Trainer reads a checkpoint directory itself and cannot be told
to read anything else, so ``resume_path()`` writes the newest complete
snapshot, read through ckptd's verifying weights-only reader, as one:
``model.safetensors``, ``optimizer.pt``, ``scheduler.pt``, ``rng_state.pth``
and ``trainer_state.json`` under a temporary directory. The Trainer then skips
the batches already trained in the epoch and restores the RNG as it does for
its own checkpoints. The directory is removed after the first resumed step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import asdict
from typing import Any

from ..errors import ConfigError, IncompatibleSnapshot
from . import _snapshots

try:
    from transformers import TrainerCallback
except ImportError:
    raise ImportError(
        "ckptd.integrations.transformers needs the Hugging Face Trainer: pip install 'ckptd[transformers]'"
    ) from None

log = logging.getLogger("ckptd")


class CkptdCallback(TrainerCallback):
    """Asynchronous ckptd snapshots for a ``transformers.Trainer``; ``resume_path()`` for ``train(resume_from_checkpoint=...)``.

    ``store`` is a path or URI (None: $CKPTD_STORE); ``policy`` as for
    :class:`ckptd.Checkpointer` (None: the risk-aware default); other keywords
    are Checkpointer options. Use one callback per ``train()``.
    """

    def __init__(self, store: str | None = None, policy: Any = None, **checkpointer_options: Any) -> None:
        from ..config import CheckpointerConfig

        CheckpointerConfig.from_options(checkpointer_options)  # a bad option fails here, not mid-train
        self.store = _snapshots.store_uri(store)
        self.policy = policy
        self.options = checkpointer_options
        self.checkpointer: Any = None  # a Checkpointer from the start of training on
        self._exported: list[str] = []
        self._state: _TrainerStateJson | None = None

    def resume_path(self) -> str | None:
        """A checkpoint directory holding the newest complete snapshot, in the Trainer's layout; None if none.

        Each call reads the snapshot and writes the directory (model-sized) under the temp dir."""
        step = _snapshots.newest_complete(self.store, self.options.get("local"))
        if step is None:
            return None
        state = _snapshots.load_snapshot(self.store, step, self.options.get("local"))
        path = export_checkpoint(state, tempfile.mkdtemp(prefix="ckptd-hf-resume-"))
        self._exported.append(os.path.dirname(path))
        return path

    # -- snapshotting -----------------------------------------------------------

    def on_train_begin(
        self,
        args: Any,
        state: Any,
        control: Any,
        model: Any = None,
        optimizer: Any = None,
        lr_scheduler: Any = None,
        **kwargs: Any,
    ) -> None:
        from ..hook import Checkpointer

        if self.checkpointer is not None:
            raise ConfigError("this CkptdCallback already ran a train(); make a new one for each train()")
        optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        lr_scheduler = getattr(lr_scheduler, "scheduler", lr_scheduler)
        self._state = _TrainerStateJson(state, control)
        self.checkpointer = Checkpointer(
            self.store,
            model=model,
            optimizer=optimizer,
            scheduler=lr_scheduler,
            extra={"trainer_state": self._state},
            policy=self.policy,
            **self.options,
        )

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.checkpointer is None or self._state is None:
            return
        self._state.control = control
        self.checkpointer.step(state.global_step - 1)  # ckptd counts the finished step from 0
        self._remove_exported()  # the Trainer has read the resumed RNG by now

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._remove_exported()
        if self.checkpointer is not None:
            self.checkpointer.close()

    def _remove_exported(self) -> None:
        while self._exported:
            shutil.rmtree(self._exported.pop(), ignore_errors=True)


class _TrainerStateJson:
    """The Trainer's state as its ``trainer_state.json`` text, the control flags in it as the Trainer saves them."""

    def __init__(self, state: Any, control: Any) -> None:
        self.state, self.control = state, control

    def state_dict(self) -> dict[str, Any]:
        fields = asdict(self.state)
        callbacks = dict(fields.get("stateful_callbacks") or {})
        if callable(getattr(self.control, "state", None)):
            callbacks["TrainerControl"] = self.control.state()
        fields["stateful_callbacks"] = callbacks
        return {"json": json.dumps(fields, indent=2, sort_keys=True) + "\n"}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        raise IncompatibleSnapshot(
            "the Trainer's state is restored by trainer.train(resume_from_checkpoint="
            "callback.resume_path()), not by Checkpointer.restore()"
        )


def export_checkpoint(state: dict[str, Any], parent: str) -> str:
    """Write ``state`` (from ``ckptd.load``) as the Trainer's ``checkpoint-<global step>`` directory in ``parent``."""
    import safetensors.torch
    import torch

    extra = state.get("extra") or {}
    ranks = sorted(extra)
    if not ranks or "trainer_state" not in extra[ranks[0]]:
        raise IncompatibleSnapshot(
            f"snapshot of step {state['meta']['step']} was not taken by ckptd's Hugging "
            "Face callback (it has no Trainer state); restore it with "
            "ckptd.Checkpointer.restore() instead"
        )
    text = extra[ranks[0]]["trainer_state"]["json"]
    path = os.path.join(parent, f"checkpoint-{json.loads(text)['global_step']}")
    os.makedirs(path)
    with open(os.path.join(path, "trainer_state.json"), "w") as f:
        f.write(text)
    model = {k: v.contiguous() for k, v in state["model"].items() if isinstance(v, torch.Tensor)}
    safetensors.torch.save_file(model, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    if state.get("optimizer") is not None:
        torch.save(state["optimizer"], os.path.join(path, "optimizer.pt"))
    if state.get("scheduler") is not None:
        torch.save(state["scheduler"], os.path.join(path, "scheduler.pt"))
    rngs = state.get("rng") or {}
    for rank in sorted(rngs):
        name = "rng_state.pth" if len(rngs) == 1 else f"rng_state_{rank}.pth"
        torch.save(_trainer_rng(rngs[rank]), os.path.join(path, name))
    return path


def _trainer_rng(saved: dict[str, Any]) -> dict[str, Any]:
    """ckptd's RNG state in the form the Trainer's ``_load_rng_state`` reads, this process's RNG left as it was."""
    import random

    import numpy as np
    import torch

    from ..snapshot.rng import capture_rng, restore_rng

    now = capture_rng()
    try:
        restore_rng(saved, reseed=0)
        out = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
        if torch.cuda.is_available():
            out["cuda"] = torch.cuda.random.get_rng_state_all()
    finally:
        restore_rng(now, reseed=0)
    return out
