"""A small, deterministic training run that snapshots with ckptd and resumes.

An MLP with dropout and batch norm, AdamW, a step LR schedule and a shuffling
data loader whose sampler position is saved through ``extra``. Each step's
loss goes to ``--loss-log`` (as float.hex), and the final model and
optimizer state to ``--out``, so runs can be compared bit for bit.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

import ckptd


class ResumableSampler(Sampler[int]):
    """Shuffles each epoch from (seed, epoch); its position is its state."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        perm = torch.randperm(self.n, generator=g).tolist()
        while self.pos < self.n:
            self.pos += 1
            yield perm[self.pos - 1]
        self.epoch, self.pos = self.epoch + 1, 0

    def __len__(self) -> int:
        return self.n

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, sd: dict) -> None:
        self.epoch, self.pos = sd["epoch"], sd["pos"]


def build(width: int, depth: int):
    torch.manual_seed(0)
    layers: list[nn.Module] = [nn.Linear(32, width), nn.BatchNorm1d(width), nn.ReLU(), nn.Dropout(0.1)]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.ReLU(), nn.Dropout(0.1)]
    model = nn.Sequential(*layers, nn.Linear(width, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.7)
    data = TensorDataset(torch.randn(512, 32), torch.randn(512, 1))
    sampler = ResumableSampler(len(data), seed=1)
    # Its own generator: iter(loader) draws a worker seed from it, not from the
    # global RNG, so starting a fresh iterator after a resume changes no dropout mask.
    loader = DataLoader(data, batch_size=32, sampler=sampler, generator=torch.Generator().manual_seed(2))
    return model, opt, sched, loader, sampler


def next_batch(state):
    try:
        return next(state["it"])
    except StopIteration:
        state["it"] = iter(state["loader"])
        return next(state["it"])


def crash_once(how: str, marker: str | None) -> None:
    """Die as a faulty job would, unless the marker says this already happened."""
    if marker and os.path.exists(marker):
        return
    if marker:
        open(marker, "w").close()
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--store", default=None, help="store URI (default: $CKPTD_STORE)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--policy", default="every:5", help="every:N, every:30s, or adaptive (the default policy)")
    p.add_argument("--hang-at", type=int, default=None, help="stop making progress after this step (tests)")
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds of extra 'compute' per step")
    p.add_argument("--loss-log", default=None)
    p.add_argument("--out", default=None)
    p.add_argument(
        "--crash-at",
        type=int,
        default=None,
        help="crash once after this step, its snapshots durable (tests, benchmarks)",
    )
    p.add_argument("--crash-with", choices=["exit", "sigkill"], default="exit")
    p.add_argument("--crash-marker", default=None, help="file that records the crash happened")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    if args.verbose:  # ckptd's own progress lines; other libraries stay at WARNING
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(message)s")
        logging.getLogger("ckptd").setLevel(logging.DEBUG)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    model, opt, sched, loader, sampler = build(args.width, args.depth)
    ckpt = ckptd.Checkpointer(
        args.store,
        model=model,
        optimizer=opt,
        scheduler=sched,
        extra={"sampler": sampler},
        keep_last=3,
        policy=None if args.policy == "adaptive" else args.policy,
    )
    start = ckpt.restore()
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES")  # ckptd run keeps a bad GPU out of it
    print(
        f"starting at step {start}" + (f" (CUDA_VISIBLE_DEVICES={gpus})" if gpus else ""), file=sys.stderr, flush=True
    )
    log = open(args.loss_log, "a") if args.loss_log else None
    state = {"loader": loader, "it": iter(loader)}
    for step in range(start, args.steps):
        x, y = next_batch(state)
        loss = nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        if args.step_sleep:
            time.sleep(args.step_sleep)
        opt.step()
        sched.step()
        if log:
            log.write(f"{step} {loss.item().hex()}\n")
            log.flush()
        ckpt.step(step, loss=loss.item())
        if step == args.hang_at:
            while True:  # a hang, as a stuck collective would be
                time.sleep(1)
        if step == args.crash_at:
            ckpt.wait()  # die with this step's snapshot durable, so the lost work is known
            crash_once(args.crash_with, args.crash_marker)
    ckpt.close()
    if args.out:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, args.out)
    print(f"done at step {args.steps}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
