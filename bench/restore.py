"""Restore time of ~0.5 GiB of model + Adam state, in multiples of a raw read of the same bytes.

Local tier, page cache warm and cold-ish (each file's pages dropped with
posix_fadvise(DONTNEED) after an fsync, before every repetition): ckptd
``Checkpointer.restore()`` (into the live model and optimizer, and into an
optimizer without state, as at a job's start), ``ckptd.load``, ``dcp.load`` of the same
snapshot directory (+ ``load_state_dict``), and ``torch.load`` +
``load_state_dict`` of a ``torch.save`` of the same state, against one
sequential read of each data file into a preallocated page-aligned buffer.
Then from S3 (a SeaweedFS on 127.0.0.1, as bench/s3_throughput.py starts
it): ckptd restore from the store with an empty local tier, against a raw
ranged parallel download of the same objects (s3transfer, ckptd's part size
and concurrency, to /dev/null). Medians of --reps; ratios within one run;
never fails on timing.

    python bench/restore.py [--reps 5] [--quick] [--no-s3] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

torch.set_num_threads(1)

_MiB = 1 << 20
STEP_DIR = "step-000000000000"


def make_state(layers: int = 40, width: int = 1024, seed: int = 0):
    """bench/overhead.py's state: ``layers`` x Linear(width, width) with Adam, after one step."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    model(torch.randn(8, width)).square().mean().backward()
    opt.step()
    opt.zero_grad()
    return model, opt


def drop_cache(paths: list[str]) -> None:
    """Evict the files' pages from the page cache (cold-ish: the disk's own cache may still hold them)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


class RawRead:
    """One sequential read of each file into a page-aligned buffer allocated (and faulted in) beforehand."""

    def __init__(self, paths: list[str]) -> None:
        self.paths = paths
        size = max(os.path.getsize(p) for p in paths)
        self.buf = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | getattr(mmap, "MAP_POPULATE", 0))
        self.view = memoryview(self.buf)

    def __call__(self) -> None:
        for p in self.paths:
            with open(p, "rb", buffering=0) as f:
                n, size = 0, os.fstat(f.fileno()).st_size
                while n < size:
                    got = f.readinto(self.view[n:size])
                    if not got:
                        break
                    n += got


def local_rows(args, work: str) -> tuple[list[tuple[str, str, float]], int]:
    """(cache, method, median seconds) of every local method, and the snapshot's bytes."""
    import torch.distributed.checkpoint as dcp

    import ckptd

    layers, width = (6, 512) if args.quick else (40, 1024)
    model, opt = make_state(layers, width)
    store = os.path.join(work, "store")
    with ckptd.Checkpointer(store, model=model, optimizer=opt, policy="every:1000000000") as ck:
        ck.save(0)
    snap = os.path.join(store, STEP_DIR)
    snap_files = [os.path.join(snap, n) for n in sorted(os.listdir(snap))]
    data_files = [p for p in snap_files if p.endswith(".distcp")]
    pt = os.path.join(work, "state.pt")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, pt)
    nbytes = sum(os.path.getsize(p) for p in data_files)

    target, target_opt = make_state(layers, width, seed=1)  # every method loads into the same objects, in place
    ck = ckptd.Checkpointer(store, model=target, optimizer=target_opt, policy="every:1000000000")

    def ckptd_restore():
        assert ck.restore() == 1

    def ckptd_load():
        ckptd.load(store)

    def dcp_load():
        sd = {"model": target.state_dict(), "optimizer": {"state": target_opt.state_dict()["state"]}}
        dcp.load(sd, checkpoint_id=snap)
        target.load_state_dict(sd["model"])
        target_opt.load_state_dict(
            {"state": sd["optimizer"]["state"], "param_groups": target_opt.state_dict()["param_groups"]}
        )

    def torch_load():
        sd = torch.load(pt, map_location="cpu", weights_only=True)
        target.load_state_dict(sd["model"])
        target_opt.load_state_dict(sd["optimizer"])

    def nothing():
        pass

    def empty_optimizer():
        target_opt.state.clear()  # as at a job's start: the load makes the optimizer's tensors

    methods = [
        ("raw read", RawRead(data_files), data_files, nothing),
        ("ckptd restore()", ckptd_restore, snap_files, nothing),
        ("ckptd restore(), new optim", ckptd_restore, snap_files, empty_optimizer),
        ("ckptd.load", ckptd_load, snap_files, nothing),
        ("dcp.load", dcp_load, snap_files, nothing),
        ("torch.load+load_state_dict", torch_load, [pt], nothing),
    ]
    rows = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for cache in ("warm", "cold"):
                times: dict[str, list[float]] = {name: [] for name, *_ in methods}
                for _name, fn, _, prepare in methods:  # warm-up: the page cache, torch's lazy imports
                    prepare()
                    fn()
                for _ in range(args.reps):  # interleaved, so a noisy moment hits every method alike
                    for name, fn, files, prepare in methods:
                        prepare()
                        if cache == "cold":
                            drop_cache(files)
                        times[name].append(timed(fn))
                rows += [(cache, name, statistics.median(v)) for name, v in times.items()]
    finally:
        ck.close()
    _check_restored(target, target_opt, model, opt)
    return rows, nbytes


def _check_restored(target, target_opt, model, opt) -> None:
    for a, b in zip(target.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b), "a restore did not reproduce the model"
    for sa, sb in zip(target_opt.state.values(), opt.state.values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sb), "a restore did not reproduce the optimizer"


def s3_rows(args, work: str) -> list[tuple[str, str, float]]:
    """ckptd restore from S3 into an empty local tier against a raw ranged download of the same objects."""
    from _seaweed import SeaweedServer
    from s3transfer.manager import TransferConfig, TransferManager

    import ckptd
    from ckptd.persist.transfer import upload_snapshot
    from ckptd.store import open_store
    from ckptd.store.file import FileStore

    server = SeaweedServer(os.path.join(work, "weed"))
    server.start()
    saved_env = {k: os.environ.get(k) for k in server.env()}
    os.environ.update(server.env())
    try:
        bucket = server.make_bucket()
        uri = f"s3://{bucket}/run"
        remote = open_store(uri)
        local = FileStore(os.path.join(work, "store"))
        manifest = upload_snapshot(local, 0, remote)
        keys = [remote._key(manifest.object_key(f.name)) for f in manifest.files]
        cfg = remote.config
        client = server.client()
        transfers = TransferManager(
            client,
            TransferConfig(
                multipart_threshold=cfg.part_size + 1,
                multipart_chunksize=cfg.part_size,
                max_request_concurrency=cfg.concurrency,
                max_in_memory_download_chunks=cfg.concurrency * 2,
            ),
        )

        def raw():
            sinks = [open(os.devnull, "wb") for _ in keys]
            try:
                for f in [transfers.download(bucket, k, sink) for k, sink in zip(keys, sinks)]:
                    f.result()
            finally:
                for s in sinks:
                    s.close()

        layers, width = (6, 512) if args.quick else (40, 1024)
        target, target_opt = make_state(layers, width, seed=2)
        times: dict[str, list[float]] = {"raw ranged download": [], "ckptd restore() from S3": []}
        raw()  # warm-up: connections, the server's own caches
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for rep in range(args.reps + 1):
                empty = os.path.join(work, f"empty-local-{rep}")
                with ckptd.Checkpointer(
                    uri, model=target, optimizer=target_opt, local=empty, policy="every:1000000000"
                ) as ck:
                    t = timed(lambda: ck.restore())
                shutil.rmtree(empty, ignore_errors=True)
                if rep:  # rep 0 warms up
                    times["ckptd restore() from S3"].append(t)
                    times["raw ranged download"].append(timed(raw))
        transfers.shutdown()
        remote.close()
        return [("s3", name, statistics.median(v)) for name, v in times.items()]
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="a small state (6 x Linear(512, 512)), for a smoke run")
    p.add_argument("--no-s3", action="store_true", help="skip the SeaweedFS part")
    p.add_argument("--dir", default=tempfile.gettempdir())
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="ckptd-restore-bench-", dir=args.dir)
    try:
        rows, nbytes = local_rows(args, work)
        if not args.no_s3:
            try:
                rows += s3_rows(args, work)
            except RuntimeError as e:  # no weed binary, a server that would not start
                print(f"S3 part skipped: {e}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"state: {nbytes / _MiB:.0f} MiB of data files (model + Adam), 1 torch thread; medians of {args.reps}; "
        "ratio = seconds / the raw figure of the same block"
    )
    print(f"{'cache':6s} {'method':28s} {'seconds':>8s} {'MiB/s':>7s} {'ratio':>6s}")
    for cache in ("warm", "cold", "s3"):
        block = [(name, s) for c, name, s in rows if c == cache]
        if not block:
            continue
        base = block[0][1] if cache != "s3" else dict(block)["raw ranged download"]
        for name, s in block:
            print(f"{cache:6s} {name:28s} {s:8.3f} {nbytes / _MiB / s:7.0f} {s / base:6.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
