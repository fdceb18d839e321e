"""Demo: train, SIGKILL the trainer mid-run, resume from its snapshot, compare bit for bit.

Runs examples/train.py three times on the embedded local store under
./demo-run: once uninterrupted (the reference), once killed with SIGKILL
partway, and once more to resume and finish. Then it compares the final
weights, optimizer state and every step's loss with the reference.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "train.py")


def trainer(store: str, out: str, losses: str, steps: int) -> list[str]:
    return [
        sys.executable,
        TRAIN,
        "--store",
        store,
        "--steps",
        str(steps),
        "--policy",
        "every:10",
        "--step-sleep",
        "0.05",
        "--loss-log",
        losses,
        "--out",
        out,
    ]


def leaves(obj, prefix=""):
    """(path, value) of every tensor and plain value in nested dicts and lists."""
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in leaves(v, f"{prefix}.{k}")]
    if isinstance(obj, (list, tuple)):
        return [kv for i, v in enumerate(obj) for kv in leaves(v, f"{prefix}[{i}]")]
    return [(prefix, obj)]


def equal(a: str, b: str) -> bool:
    x = sorted(leaves(torch.load(a, weights_only=True)), key=lambda kv: kv[0])
    y = sorted(leaves(torch.load(b, weights_only=True)), key=lambda kv: kv[0])
    return len(x) == len(y) and all(
        ka == kb and (torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb)
        for (ka, va), (kb, vb) in zip(x, y)
    )


def _losses_so_far(path: str) -> list[int]:
    try:
        return list(losses_of(path))
    except (FileNotFoundError, ValueError):
        return []


def losses_of(path: str) -> dict[int, str]:
    with open(path) as f:
        return {int(s): v for s, v in (line.split() for line in f)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dir", default="demo-run")
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--kill-at", type=int, default=None, help="kill once this step is done (default: 3/5 in)")
    a = p.parse_args()
    shutil.rmtree(a.dir, ignore_errors=True)
    os.makedirs(a.dir)
    ref, run = os.path.join(a.dir, "reference"), os.path.join(a.dir, "interrupted")
    print(f"1/3 uninterrupted reference run of {a.steps} steps ...", flush=True)
    subprocess.run(trainer(ref, ref + ".pt", ref + ".loss", a.steps), check=True, stderr=subprocess.DEVNULL)
    kill_at = a.kill_at if a.kill_at is not None else a.steps * 3 // 5 + 3
    print(f"2/3 same run, SIGKILLed once step {kill_at} is done ...", flush=True)
    proc = subprocess.Popen(trainer(run, run + ".pt", run + ".loss", a.steps), stderr=subprocess.DEVNULL)
    while proc.poll() is None and max(_losses_so_far(run + ".loss"), default=-1) < kill_at:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = max(losses_of(run + ".loss"), default=-1)
    snaps = sorted(int(d[5:]) for d in os.listdir(run) if os.path.exists(os.path.join(run, d, "ckptd.json")))
    print(f"    killed after step {done}; newest committed snapshot: step {snaps[-1] if snaps else 'none'}")
    print("3/3 resuming the killed run from its snapshot ...", flush=True)
    res = subprocess.run(
        trainer(run, run + ".pt", run + ".loss", a.steps), check=True, stderr=subprocess.PIPE, text=True
    )
    print("    " + next(line for line in res.stderr.splitlines() if line.startswith("starting at step")))
    same_state = equal(ref + ".pt", run + ".pt")
    same_losses = losses_of(ref + ".loss") == losses_of(run + ".loss")
    print(f"final weights and optimizer state equal the uninterrupted run's: {same_state}")
    print(f"every step's loss equals the uninterrupted run's:                {same_losses}")
    print(f"snapshots: ckptd ls {run}")
    return 0 if same_state and same_losses else 1


if __name__ == "__main__":
    sys.exit(main())
