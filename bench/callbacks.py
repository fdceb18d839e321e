"""Training stall per snapshot of the framework callbacks: ckptd's against each framework's own save.

Lightning's ``trainer.save_checkpoint`` (what ``ModelCheckpoint`` calls) and the
Hugging Face Trainer's ``save_strategy="steps"`` write synchronously: training
waits until the files are on disk. ``CkptdCallback`` copies the state and
writes it in the background. Stall = the extra wall time of the training
thread in the step that snapshots and the one after it (where ckptd's next
``optimizer.step()`` waits for its copy, if unfinished), over the median
time of a step that does not snapshot. Each run trains a width-1024
MLP of about ``--mib`` MiB with Adam (state = 3 × parameters) on the CPU and
snapshots every ``--every`` steps; medians over ``--reps`` runs, beside the
machine's limit, a memcpy of the same bytes into reused buffers. Never
fails on timing.

    PYTHONPATH=. python bench/callbacks.py [--mib 256] [--reps 3] [--steps 32] [--every 10] [--dir /tmp]

About 9 minutes on the 2-core CI machine under load (12 trainings).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import torch
from torch import nn

WIDTH = 1024


def make_model(mib: float) -> nn.Module:
    """An MLP whose parameters plus Adam's two moments take about ``mib`` MiB."""
    layers = max(2, round(mib * 2**20 / (3 * 4 * WIDTH * WIDTH)))
    torch.manual_seed(0)
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(WIDTH, WIDTH), nn.ReLU()]
    return nn.Sequential(*mods[:-1])


def data(steps: int):
    from torch.utils.data import TensorDataset

    g = torch.Generator().manual_seed(1)
    x = torch.randn(steps * 16, WIDTH, generator=g)
    return TensorDataset(x, x[:, :1].clone())


def stall_per_snapshot(step_times: list[float], snap_steps: list[int]) -> float:
    """Median over snapshots of (its step + the next step) less two plain steps."""
    touched = set(snap_steps) | {s + 1 for s in snap_steps}
    plain = statistics.median(t for i, t in enumerate(step_times) if i not in touched and i > 1)
    extra = [step_times[s] + step_times[s + 1] - 2 * plain for s in snap_steps if s + 1 < len(step_times)]
    return statistics.median(extra)


def memcpy_seconds(model: nn.Module) -> float:
    src = [p.detach() for p in model.parameters()] * 3
    dst = [torch.empty_like(t) for t in src]
    times = []
    for _ in range(4):
        t0 = time.perf_counter()
        for d, s in zip(dst, src):
            d.copy_(s)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])  # the first copy faults the destination pages in


# -- Lightning -------------------------------------------------------------------------


def lightning_run(mode: str, args, workdir: str) -> float:
    import pytorch_lightning as pl
    from torch.utils.data import DataLoader

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model(args.mib)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return nn.functional.mse_loss(self.net(x)[:, :1], y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-4)

    times: list[float] = []

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if mode == "native" and (trainer.global_step % args.every) == 0:
                trainer.save_checkpoint(os.path.join(workdir, f"step-{trainer.global_step}.ckpt"))
            times.append(time.perf_counter() - self.t0)  # the next step's wait lands in its own time

    callbacks: list = []
    if mode == "ckptd":
        from ckptd.integrations.lightning import CkptdCallback

        callbacks.append(CkptdCallback(os.path.join(workdir, "store"), policy=f"every:{args.every}"))
    callbacks.append(Clock())  # after CkptdCallback: its step() falls inside the clocked interval
    loader = DataLoader(data(args.steps), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(7))
    trainer = pl.Trainer(
        max_steps=args.steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
    )
    trainer.fit(Module(), train_dataloaders=loader)
    # global_step k (1-based) snapshots; times[k-1] is that step's time
    snaps = [s - 1 for s in range(args.every, args.steps, args.every)]
    return stall_per_snapshot(times, snaps)


# -- Hugging Face ------------------------------------------------------------------------


def hf_run(mode: str, args, workdir: str) -> float:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model(args.mib)

        def forward(self, x, labels=None):
            out = self.net(x)[:, :1]
            return {"loss": nn.functional.mse_loss(out, labels), "logits": out}

    class Pairs(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.inner = data(args.steps)

        def __len__(self) -> int:
            return len(self.inner)

        def __getitem__(self, i):
            x, y = self.inner[i]
            return {"x": x, "labels": y}

    begins: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, a, state, control, **kw):
            begins.append(time.perf_counter())

        def on_train_end(self, a, state, control, **kw):
            begins.append(time.perf_counter())

    callbacks: list = [Clock()]
    if mode == "ckptd":
        from ckptd.integrations.transformers import CkptdCallback

        callbacks.insert(0, CkptdCallback(os.path.join(workdir, "store"), policy=f"every:{args.every}"))
    targs = TrainingArguments(
        output_dir=os.path.join(workdir, "out"),
        per_device_train_batch_size=16,
        max_steps=args.steps,
        learning_rate=1e-4,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        logging_strategy="no",
        dataloader_num_workers=0,
        save_strategy="steps" if mode == "native" else "no",
        save_steps=args.every,
    )
    Trainer(model=Model(), args=targs, train_dataset=Pairs(), callbacks=callbacks).train()
    times = [b - a for a, b in zip(begins, begins[1:])]  # step i: from its begin to the next one's
    snaps = [s - 1 for s in range(args.every, args.steps, args.every)]
    return stall_per_snapshot(times, snaps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=float, default=256)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=32)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--dir", default=tempfile.gettempdir())
    p.add_argument("--only", choices=["lightning", "transformers"])
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    model = make_model(args.mib)
    nbytes = sum(t.nbytes for t in model.parameters()) * 3
    limit = memcpy_seconds(model)
    print(
        f"state {nbytes / 2**20:.0f} MiB (parameters + Adam moments); memcpy of it here: {limit * 1e3:.0f} ms; "
        f"{args.steps} steps, a snapshot every {args.every}, median of {args.reps} runs"
    )
    runs = {"lightning": lightning_run, "transformers": hf_run}
    for framework, run in runs.items():
        if args.only and framework != args.only:
            continue
        try:
            __import__("pytorch_lightning" if framework == "lightning" else "transformers")
        except ImportError as e:
            print(f"{framework:13s} skipped: {e}")
            continue
        for name in ("pytorch_lightning", "lightning.pytorch", "transformers", "ckptd"):  # after their import
            logging.getLogger(name).setLevel(logging.ERROR)
        got = {}
        for mode in ("native", "ckptd"):
            values = []
            for _ in range(args.reps):
                work = tempfile.mkdtemp(prefix=f"ckptd-bench-{framework}-", dir=args.dir)
                try:
                    with contextlib.redirect_stdout(io.StringIO()):  # the frameworks' own progress prints
                        values.append(run(mode, args, work))
                finally:
                    shutil.rmtree(work, ignore_errors=True)
            got[mode] = statistics.median(values)
            print(
                f"{framework:13s} {mode:7s} stall per snapshot {got[mode] * 1e3:8.0f} ms  "
                f"({got[mode] / limit:5.2f}x memcpy)  runs: {', '.join(f'{v * 1e3:.0f}' for v in values)} ms",
                flush=True,
            )
        ratio = got["native"] / got["ckptd"] if got["ckptd"] > 0 else float("inf")
        print(f"{framework:13s} native / ckptd stall: {ratio:.1f}x")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
