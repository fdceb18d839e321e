"""Upload and download throughput of a ~1 GiB snapshot to a local SeaweedFS.

ckptd (upload_snapshot / download_snapshot: parallel multipart, ranged GETs,
CRC32C verified) against boto3's own upload_file / download_file with
default settings on the same bytes, and a plain sequential write+fsync /
read of the same bytes on local disk. Medians of --reps; prints MiB/s and
ratios; never fails on timing.

    python bench/s3_throughput.py [--gib 1.0] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from _seaweed import SeaweedServer  # noqa: E402

_MiB = 1 << 20


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def make_snapshot(work: str, gib: float) -> tuple[str, int]:
    """A real ckptd snapshot of about ``gib`` GiB in a local store under ``work``."""
    import torch

    import ckptd

    width = 2048
    layers = max(1, round(gib * 2**30 / (3 * 4 * width * width)))
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(layers)])
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    store = os.path.join(work, "local")
    with ckptd.Checkpointer(store, model=model, optimizer=opt, policy="every:1000000") as ck:
        ck.save(0)
    return store, 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=1.0)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="ckptd-s3bench-")
    server = SeaweedServer(os.path.join(work, "weed"))
    server.start()
    os.environ.update(server.env())
    try:
        return run(args, work, server)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def run(args, work: str, server: SeaweedServer) -> int:
    from ckptd.persist.transfer import download_snapshot, upload_snapshot
    from ckptd.store import open_store
    from ckptd.store.file import FileStore

    local_uri, step = make_snapshot(work, args.gib)
    local = FileStore(local_uri)
    files = [
        os.path.join(local.path_of("step-000000000000"), n)
        for n in sorted(os.listdir(local.path_of("step-000000000000")))
    ]
    nbytes = sum(os.path.getsize(f) for f in files)
    client = server.client()
    rows: dict[str, list[float]] = {
        k: []
        for k in (
            "ckptd upload",
            "boto3 upload_file",
            "disk write+fsync",
            "ckptd download",
            "boto3 download_file",
            "disk read",
        )
    }
    for rep in range(args.reps):
        bucket = server.make_bucket()
        remote = open_store(f"s3://{bucket}/run")
        rows["ckptd upload"].append(timed(lambda: upload_snapshot(local, step, remote)))
        rows["boto3 upload_file"].append(
            timed(lambda: [client.upload_file(f, bucket, f"plain/{os.path.basename(f)}") for f in files])
        )
        target = os.path.join(work, f"disk{rep}")
        rows["disk write+fsync"].append(timed(lambda: _disk_write(files, target)))
        dest = FileStore(os.path.join(work, f"down{rep}"))
        rows["ckptd download"].append(timed(lambda: download_snapshot(remote, step, dest)))
        rows["boto3 download_file"].append(
            timed(
                lambda: [
                    client.download_file(
                        bucket, f"plain/{os.path.basename(f)}", os.path.join(work, f"b3-{rep}-{os.path.basename(f)}")
                    )
                    for f in files
                ]
            )
        )
        os.system("sync")
        rows["disk read"].append(timed(lambda: _disk_read(target)))
        remote.close()
        shutil.rmtree(os.path.join(work, f"down{rep}"), ignore_errors=True)
        shutil.rmtree(target, ignore_errors=True)
        for f in os.listdir(work):
            if f.startswith("b3-"):
                os.unlink(os.path.join(work, f))
    mibs = {k: nbytes / _MiB / statistics.median(v) for k, v in rows.items()}
    print(f"snapshot: {nbytes / 2**30:.2f} GiB in {len(files)} files; SeaweedFS on 127.0.0.1; medians of {args.reps}")
    print(f"{'what':24s} {'MiB/s':>8s}   ratio")
    for direction, raws in (
        ("upload", ("boto3 upload_file", "disk write+fsync")),
        ("download", ("boto3 download_file", "disk read")),
    ):
        best = max(mibs[r] for r in raws)
        for name in (f"ckptd {direction}",) + raws:
            print(f"{name:24s} {mibs[name]:8.0f}   {mibs[name] / best:.2f} of the better raw figure")
    return 0


def _disk_write(files: list[str], target: str) -> None:
    os.makedirs(target, exist_ok=True)
    for f in files:
        with open(f, "rb") as src, open(os.path.join(target, os.path.basename(f)), "wb") as dst:
            while chunk := src.read(8 * _MiB):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())


def _disk_read(target: str) -> None:
    for name in os.listdir(target):
        with open(os.path.join(target, name), "rb") as f:
            while f.read(8 * _MiB):
                pass


if __name__ == "__main__":
    sys.exit(main())
