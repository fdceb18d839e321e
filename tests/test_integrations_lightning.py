"""Lightning callback: a fit SIGKILLed mid-epoch and rerun with ckpt_path=cb.resume_path() ends bitwise
equal to the same fit never killed and run without ckptd.

This file is also the job: ``python test_integrations_lightning.py --out F [--store S]`` trains a tiny
model (dropout on, shuffled DataLoader with its own generator, Adam, a per-step scheduler) for
3 epochs of 16 batches on the CPU and saves its final weights and optimizer state to F.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

pl = (
    pytest.importorskip(
        "pytorch_lightning",
        reason="pytorch-lightning is not installed: pip install 'ckptd[lightning]' (or the test extra)",
    )
    if __name__ != "__main__"
    else None
)

import torch  # noqa: E402
from _trainer import assert_tree_equal, run_script  # noqa: E402

HERE = os.path.abspath(__file__)
EPOCHS, BATCHES = 3, 16


def build(store: str | None, policy: str):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Sequential(
                torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 1)
            )

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.mse_loss(self.net(x), y)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            print(f"trained step {self.trainer.global_step}", file=sys.stderr, flush=True)

        def configure_optimizers(self):
            opt = torch.optim.Adam(self.parameters(), lr=1e-2)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.8)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    torch.manual_seed(0)
    model = Tiny()
    data = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES * 8, 8, generator=data)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(BATCHES * 8, 1, generator=data)
    loader = DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(7))
    callbacks = []
    if store is not None:
        from ckptd.integrations.lightning import CkptdCallback

        callbacks.append(CkptdCallback(store, policy=policy))
    trainer = pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    return model, loader, trainer, callbacks


def job(argv: list[str]) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--store")
    p.add_argument("--out", required=True)
    p.add_argument("--policy", default="every:5")
    args = p.parse_args(argv)
    model, loader, trainer, callbacks = build(args.store, args.policy)
    ckpt_path = callbacks[0].resume_path() if callbacks else None
    print(f"resume from {ckpt_path}", file=sys.stderr, flush=True)
    trainer.fit(model, train_dataloaders=loader, ckpt_path=ckpt_path)
    opt = trainer.optimizers[0]
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "global_step": trainer.global_step,
            "lr": trainer.lr_scheduler_configs[0].scheduler.get_last_lr(),
        },
        args.out,
    )


def test_sigkill_mid_epoch_resumes_bitwise_equal_to_a_plain_fit(tmp_path):
    ref, out, store = str(tmp_path / "ref.pt"), str(tmp_path / "out.pt"), str(tmp_path / "store")
    with ThreadPoolExecutor(1) as pool:  # the reference runs beside the job that is killed
        reference = pool.submit(run_script, HERE, "--out", ref)

        # Killed in epoch 1 (global steps 17-32), after snapshots of steps 4, 9, 14 and 19 (counted from 0).
        rc, lines = run_script(HERE, "--store", store, "--out", out, kill_on=r"^trained step 23$")
        assert rc == -signal.SIGKILL, "the job finished before it was killed:\n" + "\n".join(lines[-20:])
        assert not os.path.exists(out)
        rc, lines = reference.result()
        assert rc == 0, "\n".join(lines[-20:])

    rc, lines = run_script(HERE, "--store", store, "--out", out)
    assert rc == 0, "\n".join(lines[-20:])
    resumed = [line for line in lines if line.startswith("resume from ")]
    assert resumed and re.search(r"/step-0+(4|9|14|19)$", resumed[0]), resumed
    first = next(int(m.group(1)) for line in lines if (m := re.match(r"trained step (\d+)$", line)))
    assert 5 < first <= 21, f"the rerun started at step {first}: it did not resume mid-epoch"

    a, b = torch.load(ref, weights_only=True), torch.load(out, weights_only=True)
    assert b["global_step"] == EPOCHS * BATCHES
    assert_tree_equal(a, b, same_sequence_type=False)


def test_resume_path_is_none_until_a_snapshot_is_complete(tmp_path):
    from ckptd.integrations.lightning import CkptdCallback

    store = tmp_path / "store"
    cb = CkptdCallback(str(store), policy="every:5")
    assert cb.resume_path() is None  # the store does not exist yet
    (store / "step-000000000005").mkdir(parents=True)
    (store / "step-000000000005" / "__0_0.distcp").write_bytes(b"half a snapshot")
    assert cb.resume_path() is None  # files without a manifest are no snapshot


def test_resume_path_takes_the_local_tiers_newer_snapshot_of_an_object_store(tmp_path, bucket, monkeypatch):
    """A step committed locally but not yet uploaded when the job died is the one to resume from."""
    import ckptd
    from ckptd.integrations.lightning import CkptdCallback

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    store, tier = f"s3://{bucket}/job", str(tmp_path / "tier")
    cb = CkptdCallback(store, policy="every:5", local=tier)
    assert cb.resume_path() is None  # an empty bucket, no local tier yet
    with ckptd.Checkpointer(tier, model=torch.nn.Linear(2, 2), policy="every:1000") as ckpt:
        ckpt.save(7)
    assert cb.resume_path() == f"s3://{bucket}/job/step-000000000007"
    monkeypatch.setenv("WORLD_SIZE", "2")  # a distributed job resumes only from what every node sees
    assert cb.resume_path() is None


def _tiny_fit(store, tmp_path, ckpt_path=None, steps=2):
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader, TensorDataset

    from ckptd.integrations.lightning import CkptdCallback

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    cb = CkptdCallback(store, policy="every:1")
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[cb],
        default_root_dir=str(tmp_path),
    )
    trainer.fit(Tiny(), DataLoader(TensorDataset(torch.randn(8, 4)), batch_size=2), ckpt_path=ckpt_path)
    return trainer, cb


def test_a_native_lightning_checkpoint_still_loads_with_the_callback(tmp_path):
    trainer, _ = _tiny_fit(str(tmp_path / "a"), tmp_path)
    native = str(tmp_path / "native.ckpt")
    trainer.save_checkpoint(native)
    resumed, cb = _tiny_fit(str(tmp_path / "b"), tmp_path, ckpt_path=native, steps=3)
    assert resumed.global_step == 3
    assert [s.step for s in cb.checkpointer.snapshots()] == [2]  # only the one step it trained


def test_a_snapshot_without_lightning_state_is_refused_by_name(tmp_path):
    import ckptd
    from ckptd import IncompatibleSnapshot

    store = str(tmp_path / "store")
    with ckptd.Checkpointer(store, model=torch.nn.Linear(4, 1), policy="every:1000") as ckpt:
        ckpt.save(3)
    from ckptd.integrations.lightning import CkptdCallback

    path = CkptdCallback(store).resume_path()
    with pytest.raises(IncompatibleSnapshot, match="not taken by ckptd's Lightning callback"):
        _tiny_fit(store, tmp_path, ckpt_path=path)


def test_a_bad_option_fails_when_the_callback_is_made(tmp_path):
    from ckptd import ConfigError
    from ckptd.integrations.lightning import CkptdCallback

    with pytest.raises(ConfigError, match="keep_lastt"):
        CkptdCallback(str(tmp_path), keep_lastt=2)


if __name__ == "__main__":
    job(sys.argv[1:])
