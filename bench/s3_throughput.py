"""Upload and download throughput of a ~1 GiB snapshot to a local SeaweedFS, against the raw figures.

One run, one server, the same bytes for every row, the rows interleaved (each
rep runs them in a rotated order, after a ``sync``):

    upload    disk write+fsync of the snapshot's files (the raw figure)
              boto3 upload_file, default settings, one file after another
              ckptd upload_snapshot (S3Store: s3transfer multipart, CRC32C, commit)
    download  disk read of the same files, cold (evicted from the page cache)
              boto3 download_file of ckptd's objects
              ckptd download_snapshot (ranged GETs, every file verified, atomic)

For each row: the median MiB/s of --reps, its ratio to the raw disk figure
and to boto3, the CPU seconds per GiB spent by this process (the client) and
by the SeaweedFS server, and how many cores everything else on the machine
kept busy meanwhile ("others"; kernel threads count there, so the disk rows'
own writeback does). The server and the client share this machine's cores,
so when a row's MiB/s falls while its CPU per GiB does not and "others"
rises, the machine was busier, not the code slower. ``--old-multipart`` adds
the hand-written multipart upload and ranged download ckptd had before
s3transfer (bench/_s3_legacy.py) as a reference row. Never fails on timing.

    python bench/s3_throughput.py --reps 3 [--gib 1.0] [--old-multipart]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from _seaweed import SeaweedServer  # noqa: E402

_MiB = 1 << 20
STEP_DIR = "step-000000000000"


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
    p.add_argument(
        "--old-multipart", action="store_true", help="add the pre-s3transfer hand-written path as a reference row"
    )
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


class Meter:
    """Wall time and CPU time of each measured call: this process's, the server's, everyone else's."""

    def __init__(self, server_pgid: int) -> None:
        self.pgid = server_pgid
        self.rows: dict[str, list[tuple[float, float, float, float]]] = {}

    def measure(self, name: str, fn: Callable[[], object], prepare: Callable[[], object] | None = None) -> None:
        if prepare is not None:
            prepare()
        os.sync()
        c0, s0, m0, t0 = _own_cpu(), _group_cpu(self.pgid), _machine_cpu(), time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
        own, server = _own_cpu() - c0, _group_cpu(self.pgid) - s0
        others = max(0.0, _machine_cpu() - m0 - own - server)
        self.rows.setdefault(name, []).append((wall, own, server, others / wall))


def run(args, work: str, server: SeaweedServer) -> int:
    from ckptd.persist.transfer import download_snapshot, upload_snapshot
    from ckptd.store.file import FileStore
    from ckptd.store.s3 import S3Store

    stores: dict[str, type[S3Store]] = {"ckptd": S3Store}
    if args.old_multipart:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from _s3_legacy import LegacyS3Store

        stores["ref: pre-s3transfer"] = LegacyS3Store

    local_uri, step = make_snapshot(work, args.gib)
    local = FileStore(local_uri)
    files = [os.path.join(local.path_of(STEP_DIR), n) for n in sorted(os.listdir(local.path_of(STEP_DIR)))]
    nbytes = sum(os.path.getsize(f) for f in files)
    _disk_read(local.path_of(STEP_DIR))  # written with O_DIRECT: every row reads them from the page cache
    client = server.client()
    meter = Meter(server.proc.pid)

    for rep in range(args.reps):
        # a directory of its own each rep, kept to the end: rewriting blocks just freed ran 4-5x faster
        # here than the first write, which is what a new snapshot gets
        disk = os.path.join(work, f"disk{rep}")
        # upload: each row into a bucket of its own
        uploads: list[tuple[str, Callable[[], object], Callable[[], object] | None]] = [
            ("disk write+fsync", lambda d=disk: _disk_write(files, d), None),
        ]
        b3 = server.make_bucket()
        uploads.append(
            (
                "boto3 upload_file",
                lambda b=b3: [client.upload_file(f, b, f"plain/{os.path.basename(f)}") for f in files],
                None,
            )
        )
        opened = []
        for name, cls in stores.items():
            store = cls(server.make_bucket(), "run")
            opened.append(store)
            uploads.append((f"{name} upload", lambda s=store: upload_snapshot(local, step, s), None))
        for name, fn, prep in _rotated(uploads, rep):
            meter.measure(name, fn, prep)
        # download: every row reads the objects ckptd uploaded in this rep
        src = opened[0]
        keys = [o.key for o in src.list(STEP_DIR)]

        def boto3_download(dest: str) -> None:
            os.makedirs(dest)
            for i, k in enumerate(keys):
                client.download_file(src.bucket, f"run/{k}", os.path.join(dest, f"{i}-{os.path.basename(k)}"))

        downloads: list[tuple[str, Callable[[], object], Callable[[], object] | None]] = [
            ("disk read (cold)", lambda d=disk: _disk_read(d), lambda d=disk: _evict(d)),
            ("boto3 download_file", lambda: boto3_download(os.path.join(work, "b3down")), None),
        ]
        readers = [cls(src.bucket, "run") for cls in stores.values()]
        for (name, _), reader in zip(stores.items(), readers, strict=True):
            dest = os.path.join(work, f"down-{name.replace(' ', '-')}")
            downloads.append(
                (f"{name} download", lambda r=reader, d=dest: download_snapshot(r, step, FileStore(d)), None)
            )
        for name, fn, prep in _rotated(downloads, rep):
            meter.measure(name, fn, prep)
        for store in opened + readers:
            store.close()
        for d in os.listdir(work):
            if d.startswith(("down-", "b3down")):
                shutil.rmtree(os.path.join(work, d))
        for bucket in [b3] + [s.bucket for s in opened]:
            _empty(client, bucket)

    print(
        f"snapshot: {nbytes / 2**30:.2f} GiB in {len(files)} files; SeaweedFS on 127.0.0.1 (one server for every "
        f"row); {os.cpu_count()} CPUs shared by client and server; medians of {args.reps} interleaved reps"
    )
    print(
        f"{'':28s} {'MiB/s':>7s} {'/disk':>6s} {'/boto3':>7s} {'client CPU':>11s} {'server CPU':>11s} "
        f"{'others':>7s}   each rep (MiB/s)"
    )
    print(f"{'':28s} {'':7s} {'':6s} {'':7s} {'s per GiB':>11s} {'s per GiB':>11s} {'cores':>7s}")
    for title, raw, b3name in (
        ("upload", "disk write+fsync", "boto3 upload_file"),
        ("download", "disk read (cold)", "boto3 download_file"),
    ):
        print(title)
        names = [raw, b3name] + [f"{n} {title}" for n in stores]
        mibs = {n: nbytes / _MiB / statistics.median(r[0] for r in meter.rows[n]) for n in names}
        for n in names:
            reps = meter.rows[n]
            gib = nbytes / 2**30
            print(
                f"  {n:26s} {mibs[n]:7.0f} {mibs[n] / mibs[raw]:6.2f} {mibs[n] / mibs[b3name]:7.2f} "
                f"{statistics.median(r[1] for r in reps) / gib:11.2f} {statistics.median(r[2] for r in reps) / gib:11.2f} "
                f"{statistics.median(r[3] for r in reps):7.2f}   {' '.join(f'{nbytes / _MiB / r[0]:.0f}' for r in reps)}"
            )
    return 0


def _rotated(rows: list, rep: int) -> list:
    k = rep % len(rows)
    return rows[k:] + rows[:k]


def _disk_write(files: list[str], target: str) -> None:
    os.makedirs(target, exist_ok=True)
    for f in files:
        with open(f, "rb") as src, open(os.path.join(target, os.path.basename(f)), "wb") as dst:
            while chunk := src.read(8 * _MiB):
                dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())


def _evict(target: str) -> None:
    for name in os.listdir(target):
        fd = os.open(os.path.join(target, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _disk_read(target: str) -> None:
    for name in os.listdir(target):
        with open(os.path.join(target, name), "rb") as f:
            while f.read(8 * _MiB):
                pass


def _empty(client, bucket: str) -> None:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        objects = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if objects:
            client.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})


def _own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def _machine_cpu() -> float:
    """CPU seconds all processes of the machine have used (the busy fields of /proc/stat's first line)."""
    with open("/proc/stat") as f:
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _group_cpu(pgid: int) -> float:
    """CPU seconds used so far by the processes of group ``pgid`` (the server runs in its own session)."""
    ticks = 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    sys.exit(main())
