"""A training job that knows nothing of ckptd (it never imports it), for transparent mode's tests.

A small model with dropout, trained on data drawn from the global RNG step by step, so any state
lost or replayed wrongly (parameters, Adam's moments, the RNG) changes the final weights.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--sleep", type=float, default=0.03)
    p.add_argument("--width", type=int, default=256)
    args = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = torch.nn.Sequential(
        torch.nn.Linear(32, args.width), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(args.width, 4)
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(args.steps):
        x, y = torch.randn(16, 32), torch.randn(16, 4)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        print(f"step {step} loss {loss.item():.6f}", flush=True)
        time.sleep(args.sleep)
    torch.save(model.state_dict(), args.out)
    print("done", flush=True)
    print("job stderr reaches ckptd run", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
