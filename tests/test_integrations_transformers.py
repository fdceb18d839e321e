"""Hugging Face Trainer callback: a train() SIGKILLed mid-epoch and rerun with
resume_from_checkpoint=cb.resume_path() ends bitwise equal to the same train() never killed and run
without ckptd.

This file is also the job: ``python test_integrations_transformers.py --out F [--store S]`` trains a
tiny model (dropout on, the Trainer's shuffled loader, AdamW, a linear schedule) for 3 epochs of 16
steps on the CPU and saves its final weights and optimizer state to F.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

if __name__ != "__main__":
    pytest.importorskip(
        "transformers",
        reason="transformers is not installed: pip install 'ckptd[transformers]' "
        "(scripts/install.sh installs it; it is too large for the test extra)",
    )
    pytest.importorskip(
        "accelerate", reason="accelerate (the Trainer needs it) is not installed: pip install 'ckptd[transformers]'"
    )

import torch  # noqa: E402
from _trainer import assert_tree_equal, run_script  # noqa: E402

HERE = os.path.abspath(__file__)
EPOCHS, STEPS = 3, 16


class Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(32, 1)
        )

    def forward(self, x, labels=None):
        out = self.net(x)
        return {"loss": torch.nn.functional.mse_loss(out, labels), "logits": out}


class Pairs(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(STEPS * 8, 8, generator=g)
        self.y = self.x.sum(1, keepdim=True) + 0.1 * torch.randn(STEPS * 8, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def job(argv: list[str]) -> None:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    p = argparse.ArgumentParser()
    p.add_argument("--store")
    p.add_argument("--out", required=True)
    p.add_argument("--workdir", required=True)
    p.add_argument("--policy", default="every:5")
    a = p.parse_args(argv)

    class Announce(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            print(f"trained step {state.global_step}", file=sys.stderr, flush=True)

    torch.manual_seed(0)
    model = Tiny()
    callbacks = [Announce()]
    if a.store is not None:
        from ckptd.integrations.transformers import CkptdCallback

        callbacks.insert(0, CkptdCallback(a.store, policy=a.policy))
    args = TrainingArguments(
        output_dir=a.workdir,
        per_device_train_batch_size=8,
        num_train_epochs=EPOCHS,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=42,
        disable_tqdm=True,
        logging_strategy="no",
        dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Pairs(), callbacks=callbacks)
    resume = callbacks[0].resume_path() if a.store is not None else None
    print(f"resume from {resume}", file=sys.stderr, flush=True)
    trainer.train(resume_from_checkpoint=resume)
    torch.save(
        {
            "model": model.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "global_step": trainer.state.global_step,
            "lr": trainer.lr_scheduler.get_last_lr(),
        },
        a.out,
    )


def test_sigkill_mid_epoch_resumes_bitwise_equal_to_a_plain_train(tmp_path, bucket):
    """Through the S3 store, rerun with another local tier (another node): the snapshot comes from the bucket."""
    ref, out, store = str(tmp_path / "ref.pt"), str(tmp_path / "out.pt"), f"s3://{bucket}/job"
    with ThreadPoolExecutor(1) as pool:  # the reference runs beside the job that is killed
        reference = pool.submit(run_script, HERE, "--out", ref, "--workdir", str(tmp_path / "w0"))

        # Killed in epoch 1 (global steps 17-32), after snapshots of steps 4, 9, 14 and 19 (counted from 0).
        rc, lines = run_script(
            HERE,
            "--store",
            store,
            "--out",
            out,
            "--workdir",
            str(tmp_path / "w1"),
            kill_on=r"^trained step 23$",
            env={"CKPTD_LOCAL": str(tmp_path / "node-a")},
        )
        assert rc == -signal.SIGKILL, "the job finished before it was killed:\n" + "\n".join(lines[-20:])
        assert not os.path.exists(out)
        rc, lines = reference.result()
        assert rc == 0, "\n".join(lines[-20:])

    rc, lines = run_script(
        HERE,
        "--store",
        store,
        "--out",
        out,
        "--workdir",
        str(tmp_path / "w2"),
        env={"CKPTD_LOCAL": str(tmp_path / "node-b")},
    )
    assert rc == 0, "\n".join(lines[-20:])
    resumed = [line for line in lines if line.startswith("resume from ")]
    assert resumed and re.search(r"/checkpoint-(5|10|15|20)$", resumed[0]), resumed
    assert not os.path.exists(resumed[0].removeprefix("resume from ")), "the exported checkpoint was left behind"
    first = next(int(m.group(1)) for line in lines if (m := re.match(r"trained step (\d+)$", line)))
    assert 5 < first <= 21, f"the rerun started at step {first}: it did not resume mid-epoch"

    a, b = torch.load(ref, weights_only=True), torch.load(out, weights_only=True)
    assert b["global_step"] == EPOCHS * STEPS
    assert_tree_equal(a, b, same_sequence_type=False)


def test_resume_path_is_none_until_a_snapshot_is_complete(tmp_path):
    from ckptd.integrations.transformers import CkptdCallback

    store = tmp_path / "store"
    cb = CkptdCallback(str(store), policy="every:5")
    assert cb.resume_path() is None
    (store / "step-000000000005").mkdir(parents=True)
    (store / "step-000000000005" / "__0_0.distcp").write_bytes(b"half a snapshot")
    assert cb.resume_path() is None


if __name__ == "__main__":
    job(sys.argv[1:])
