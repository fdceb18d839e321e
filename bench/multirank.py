"""Snapshots of a 2-rank DDP job (gloo, one process per core): ckptd against DCP async_save, in one run.

Each method runs in fresh ranks: a warm-up snapshot, then rounds of STEPS steps
with a snapshot every EVERY steps, timed on rank 0; "none" takes no snapshot.
For ckptd the first snapshot goes through dcp.save (it teaches each rank its
share) and later ones are written from each rank's file image; the table
shows the write path each took (manifest ``io``), the stall per snapshot
(``stall_s``) and the write time (``write_s``) beside DCP's. Overhead is
a method's median round time over "none"'s, minus one. Both ranks share two
cores with the training, so figures are noisy: compare within a run. Never
fails on timing.

    python bench/multirank.py [--mib 256] [--rounds 3] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

STEPS, EVERY = 20, 5


def rank_main(rank: int, world: int, init: str, method: str, work: str, mib: int, rounds: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.manual_seed(0)
    width = 1024
    layers = max(1, mib * (1 << 20) // (3 * 4 * width * width))  # params + Adam's two moments
    model = torch.nn.parallel.DistributedDataParallel(
        torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    )
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    x = torch.randn(32, width)
    snap = _method(method, model, opt, work)

    def train(step: int) -> None:
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if step % EVERY == EVERY - 1:
            snap(step)

    for step in range(EVERY):  # warm-up, with one snapshot
        train(step)
    times = []
    for r in range(rounds):
        dist.barrier()
        t0 = time.perf_counter()
        for step in range((r + 1) * STEPS, (r + 2) * STEPS):
            train(step)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    snap(None)
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"times": times}, f)
    dist.destroy_process_group()


def _method(method: str, model, opt, work: str):
    if method == "none":
        return lambda step: None
    if method == "ckptd":
        import ckptd

        ck = ckptd.Checkpointer(work, model=model, optimizer=opt, policy="every:1000000", keep_last=100)

        def take(step):
            if step is None:
                ck.close()
            else:
                ck.save(step)

        return take
    import torch.distributed.checkpoint as dcp

    pending = []
    group = dist.new_group(backend="gloo")  # its own: a background save on DDP's group would interleave

    def dcp_take(step):
        for f in pending:
            f.result()
        pending.clear()
        if step is not None:
            sd = {"model": model.module.state_dict(), "optim": opt.state_dict()}
            pending.append(dcp.async_save(sd, checkpoint_id=os.path.join(work, f"step-{step}"), process_group=group))

    return dcp_take


def run(method: str, work: str, mib: int, rounds: int) -> dict:
    out = os.path.join(work, "result.json")
    init = f"file://{work}/rdzv"
    mp.start_processes(rank_main, args=(2, init, method, work, mib, rounds, out), nprocs=2, start_method="spawn")
    with open(out) as f:
        return json.load(f)


def ckptd_writes(work: str) -> list[tuple[int, str, float, float]]:
    from ckptd.restore.find import list_snapshots, read_manifest
    from ckptd.store.file import FileStore

    store = FileStore(work)
    rows = []
    for info in list_snapshots(store):
        m = read_manifest(store, info.step)
        rows.append((m.step, m.meta.get("io"), m.meta.get("stall_s", 0.0), m.meta.get("write_s", 0.0)))
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mib", type=int, default=256, help="model + Adam state, MiB (each rank holds all of it)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default=None, help="where snapshots go (default: the temp dir)")
    a = p.parse_args()
    results, writes = {}, []
    for method in ("none", "ckptd", "dcp_async", "none"):
        work = tempfile.mkdtemp(prefix=f"multirank-{method}-", dir=a.dir)
        try:
            times = run(method, work, a.mib, a.rounds)["times"]
            results.setdefault(method, []).extend(times)
            if method == "ckptd":
                writes = ckptd_writes(work)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(f"{method:>10}: rounds {', '.join(f'{t:.2f}' for t in times)} s", file=sys.stderr)
    base = statistics.median(results["none"])
    print(f"\n2 gloo ranks, DDP, {a.mib} MiB of state each, a snapshot every {EVERY} steps, {STEPS} steps a round")
    print(f"{'method':<12} {'median round s':>15} {'overhead':>9}")
    for method in ("none", "ckptd", "dcp_async"):
        med = statistics.median(results[method])
        print(f"{method:<12} {med:>15.2f} {med / base - 1:>8.1%}")
    print("\nckptd's snapshots (rank 0's stall; write time of the slowest rank's part of the attempt):")
    print(f"{'step':>6} {'written':>9} {'stall s':>8} {'write s':>8}")
    for step, io, stall, write in writes:
        print(f"{step:>6} {io:>9} {stall:>8.3f} {write:>8.3f}")
    print("(the first, through dcp.save, is the warm-up: it also pays the first write of every file)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
