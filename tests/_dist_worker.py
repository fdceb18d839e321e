"""One rank of a gloo job that trains with DDP and snapshots, or restores and dumps state."""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import ckptd


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--rank", type=int, default=None, help="default: $RANK (torchrun)")
    p.add_argument("--world", type=int, default=None, help="default: $WORLD_SIZE (torchrun)")
    p.add_argument("--init", default="env://", help="file:// rendezvous, or env:// under torchrun")
    p.add_argument("--mode", choices=["save", "restore"], required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    if a.rank is None:
        a.rank, a.world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        a.out = a.out.replace("{rank}", str(a.rank))
    dist.init_process_group("gloo", init_method=a.init, rank=a.rank, world_size=a.world)
    torch.manual_seed(0 if a.mode == "save" else 99)
    model = DDP(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ckpt = ckptd.Checkpointer(a.store, model=model, optimizer=opt, policy="every:3")
    if a.mode == "save":
        torch.manual_seed(1000 + a.rank)
        for step in range(a.steps):
            loss = model(torch.randn(8, 16)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            ckpt.step(step)
        ckpt.close()
        start = a.steps
    else:
        start = ckpt.restore()
        ckpt.close()
    torch.save(
        {
            "start": start,
            "model": model.module.state_dict(),
            "optimizer": opt.state_dict(),
            "rng": torch.get_rng_state(),
        },
        a.out,
    )
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
