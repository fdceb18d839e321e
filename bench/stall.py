"""Training stall per snapshot: ckptd against torch.save, DCP async_save, torchsnapshot
and torch-checkpointing, beside the machine's memcpy time for the same bytes.

Stall = time the training thread cannot go on. For ckptd that is the time
inside ``save()`` plus any wait of the next ``optimizer.step()`` for the
background copy (``handle.stall``). "Overlapped" puts a forward/backward
that is longer than the copy between the snapshot and ``optimizer.step()``;
it is simulated by a sleep (as GPU compute would leave the CPU free) of
twice the memcpy time. CPU path only: the CUDA path (side stream, pinned
pool) is not exercised on a machine without a GPU. Medians of ``--reps``;
benchmarks never fail on timing.

    python bench/stall.py [--gib 1.0] [--reps 3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn


def make_state(gib: float):
    """A model of square Linear layers plus AdamW moments: about ``gib`` GiB in all."""
    width = 2048
    layers = max(1, round(gib * 2**30 / (3 * 4 * width * width)))
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    opt.zero_grad()
    nbytes = sum(p.nbytes for p in model.parameters()) * 3
    return model, opt, nbytes


def median_of(reps: int, fn: Callable[[int], float], warmup: bool = False) -> tuple[float, list[float]]:
    """Median of ``reps`` timed calls; ``warmup`` runs one untimed call first (thread/process start-up)."""
    if warmup:
        fn(reps)
    times = [fn(i) for i in range(reps)]
    return statistics.median(times), times


def memcpy_rows(model, nbytes: int, reps: int) -> dict[str, float]:
    tensors = [p.detach() for p in model.parameters()] * 3  # params + two moments' worth of bytes
    dest = [torch.empty_like(t) for t in tensors]

    def torch_copy(_):
        t0 = time.perf_counter()
        for s, d in zip(tensors, dest):
            d.copy_(s)
        return time.perf_counter() - t0

    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)

    def np_copy(_):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        return time.perf_counter() - t0

    def fresh(_):
        t0 = time.perf_counter()
        out = [t.clone() for t in tensors]
        elapsed = time.perf_counter() - t0
        del out
        return elapsed

    torch_copy(0), np_copy(0)  # touch every page once: a reused buffer is a warm one
    rows = {
        "memcpy: Tensor.copy_ into reused buffers": median_of(reps, torch_copy)[0],
        "memcpy: np.copyto, one reused buffer": median_of(reps, np_copy)[0],
        "copy into fresh allocations (clone)": median_of(reps, fresh)[0],
    }
    return rows


def ckptd_rows(model, opt, work: str, reps: int, compute: float) -> dict[str, float]:
    import ckptd

    out = {}
    for label, pause in (
        ("ckptd, next optimizer.step() at once", 0.0),
        (f"ckptd, overlapped ({compute:.2f} s of compute first)", compute),
    ):
        store = os.path.join(work, "ckptd" + str(int(pause * 1000)))
        ck = ckptd.Checkpointer(store, model=model, optimizer=opt, policy="every:1000000000", keep_last=1)
        ck.save(0).durable.result()  # allocates the staging pool once, as the first snapshot of a run does
        stalls, walls = [], []
        for i in range(1, reps + 1):
            t0 = time.perf_counter()
            h = ck.save(i)
            if pause:
                time.sleep(pause)
                t1 = time.perf_counter()
                opt.step()
                wall = (t1 - t0 - pause) + (time.perf_counter() - t1)
            else:
                opt.step()
                wall = time.perf_counter() - t0
            h.staged.result()
            stalls.append(h.stall)
            walls.append(wall)
            h.durable.result()
        ck.close()
        out[label] = statistics.median(stalls)
        out[label + " [wall, incl. optimizer.step]"] = statistics.median(walls)
        shutil.rmtree(store, ignore_errors=True)
    return out


def torch_save_row(model, opt, work: str, reps: int) -> float:
    path = os.path.join(work, "torch_save.pt")

    def run(_):
        t0 = time.perf_counter()
        torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)
        return time.perf_counter() - t0

    med = median_of(reps, run)[0]
    os.unlink(path)
    return med


def dcp_row(model, opt, work: str, reps: int) -> float:
    import torch.distributed.checkpoint as dcp

    def run(i):
        state = {"model": model.state_dict(), "optim": opt.state_dict()}
        t0 = time.perf_counter()
        fut = dcp.async_save(state, checkpoint_id=os.path.join(work, f"dcp{i}"))
        blocked = time.perf_counter() - t0
        fut.result()
        shutil.rmtree(os.path.join(work, f"dcp{i}"), ignore_errors=True)
        return blocked

    return median_of(reps, run, warmup=True)[0]


def torchsnapshot_row(model, opt, work: str, reps: int) -> float:
    import torchsnapshot

    def run(i):
        t0 = time.perf_counter()
        pending = torchsnapshot.Snapshot.async_take(
            os.path.join(work, f"ts{i}"), app_state={"model": model, "optim": opt}
        )
        blocked = time.perf_counter() - t0
        pending.wait()
        shutil.rmtree(os.path.join(work, f"ts{i}"), ignore_errors=True)
        return blocked

    return median_of(reps, run, warmup=True)[0]


def torch_checkpointing_row(model, opt, work: str, reps: int) -> float:
    import torch_checkpointing as tc

    class Ckpt(tc.CheckpointBase):
        def get_items(self):
            return {"model": tc.CheckpointItem(model.state_dict()), "optim": tc.CheckpointItem(opt.state_dict())}

        def load_state_dict(self, state_dict):
            raise NotImplementedError

    from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

    # O_DIRECT opens here but rejects torch.save's unaligned writes (EINVAL), so plain I/O.
    saver = tc.make_async_checkpoint_saver(storage_config=LocalFileSystemStorageConfig(use_direct_io=False))
    try:

        def run(i):
            t0 = time.perf_counter()
            staged, written = saver.save(os.path.join(work, f"tcp{i}"), Ckpt())
            staged.result()  # training may mutate state only after staging
            blocked = time.perf_counter() - t0
            written.result()
            shutil.rmtree(os.path.join(work, f"tcp{i}"), ignore_errors=True)
            return blocked

        return median_of(reps, run, warmup=True)[0]
    finally:
        saver.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default=tempfile.gettempdir())
    args = p.parse_args()
    model, opt, nbytes = make_state(args.gib)
    work = tempfile.mkdtemp(prefix="ckptd-stall-", dir=args.dir)
    print(
        f"state: {nbytes / 2**30:.2f} GiB (params + AdamW moments), {torch.get_num_threads()} torch threads, "
        f"medians of {args.reps}"
    )
    rows: dict[str, float | str] = {}
    try:
        rows.update(memcpy_rows(model, nbytes, args.reps))
        gc.collect()
        memcpy = rows["memcpy: Tensor.copy_ into reused buffers"]
        rows.update(ckptd_rows(model, opt, work, args.reps, compute=2 * memcpy))
        for name, fn in (
            ("torch.save (blocking)", torch_save_row),
            ("DCP async_save (until it returns)", dcp_row),
            ("torchsnapshot async_take (until it returns)", torchsnapshot_row),
            ("torch-checkpointing async save (until staged)", torch_checkpointing_row),
        ):
            gc.collect()
            try:
                rows[name] = fn(model, opt, work, args.reps)
            except Exception as e:  # a competitor that cannot run here is reported, not faked
                rows[name] = f"could not run: {type(e).__name__}: {str(e).splitlines()[0][:80]}"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'what':62s} {'median s':>9s} {'x memcpy':>9s}")
    for name, value in rows.items():
        if isinstance(value, str):
            print(f"{name:62s} {value}")
        else:
            print(f"{name:62s} {value:9.3f} {value / memcpy:9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
