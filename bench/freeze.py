"""Transparent mode against the hook, for one model: how long a CRIU dump stops the job (its freeze)
and how big its image is, against the hook's stall and snapshot size; and how fast a dump and a
restore move bytes, against a plain copy and a plain read of the same bytes.

The same model and AdamW state (``stall.make_state``) is trained in this process under
``ckptd.Checkpointer`` (stall per snapshot, as ``bench/stall.py`` measures it) and in a child process
that knows nothing of ckptd, started the way ``ckptd run --transparent`` starts a job (its own PID
namespace), dumped with ``criu dump --leave-running`` (the freeze is CRIU's own ``frozen_time``),
committed as ckptd commits an image (checksums, manifest), then killed and restored from the image.
Dumps and copies start after ``sync`` (no writeback backlog) and land in the page cache, as CRIU's
writes do. Needs root and CRIU >= 4 (``CKPTD_CRIU`` or PATH). Medians of ``--reps``; prints ratios from
one run; never fails on timing.

    python bench/freeze.py [--gib 0.5] [--reps 3] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def job(gib: float, ready: str) -> None:
    """The child: the model trains step after step until it is killed."""
    import torch
    from stall import make_state

    torch.set_num_threads(1)
    model, opt, _ = make_state(gib)
    x = torch.randn(8, 2048)
    open(ready, "w").close()
    while True:
        model(x).sum().backward()
        opt.step()
        opt.zero_grad()
        time.sleep(0.05)


def hook_rows(gib: float, work: str, reps: int) -> tuple[float, int]:
    """(median stall of a hook snapshot, its size in bytes)."""
    from stall import make_state

    import ckptd

    model, opt, _ = make_state(gib)
    store = os.path.join(work, "hook")
    ck = ckptd.Checkpointer(store, model=model, optimizer=opt, policy="every:1000000000", keep_last=1)
    ck.save(0).durable.result()  # the staging pool is made once, as the first snapshot of a run does
    stalls = []
    for i in range(1, reps + 1):
        h = ck.save(i)
        opt.step()
        h.staged.result()
        stalls.append(h.stall)
        h.durable.result()
    size = ck.snapshots()[-1].nbytes
    ck.close()
    shutil.rmtree(store, ignore_errors=True)
    return statistics.median(stalls), size


def criu_rows(gib: float, work: str, reps: int) -> dict[str, float]:
    from ckptd.process import launch
    from ckptd.process.criu import Criu
    from ckptd.process.image import ProcessMeta, commit, kernel, start_attempt
    from ckptd.store.file import FileStore

    criu = Criu.find()
    ready = os.path.join(work, "ready")
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-S", launch.__file__, str(w), "--", sys.executable, __file__, "--job", "--gib", str(gib)]
        + ["--ready", ready],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        pass_fds=(w,),
        start_new_session=True,
    )
    os.close(w)
    pid = int(os.read(r, 64))
    os.close(r)
    proc.wait()
    while not os.path.exists(ready):
        time.sleep(0.1)
    time.sleep(1.0)
    local = FileStore(os.path.join(work, "tier"))
    logs = os.path.join(work, "logs")
    os.makedirs(logs)
    frozen, dump_s, commit_s, sizes, copy_s, restore_s, read_s = [], [], [], [], [], [], []
    try:
        for step in range(reps):
            attempt, images = start_attempt(local, step)
            os.sync()  # no writeback backlog from the last round slows this one (nor the copy below)
            t0 = time.perf_counter()
            stats = criu.dump(pid, images, work=logs)
            dump_s.append(time.perf_counter() - t0)
            frozen.append(stats.frozen_s)
            nbytes = sum(os.path.getsize(os.path.join(images, n)) for n in os.listdir(images))
            sizes.append(nbytes)
            copy_s.append(_copy(images, os.path.join(work, f"copy{step}")))
            meta = ProcessMeta(command=("bench",), criu=criu.version_text, kernel=kernel(), stdio=())
            t0 = time.perf_counter()
            done = commit(local, images, step=step, attempt=attempt, job="bench", meta=meta, metrics={})
            commit_s.append(time.perf_counter() - t0)
        os.kill(pid, signal.SIGKILL)
        _reap(pid)
        image = done.directory
        for _ in range(reps):
            read_s.append(_read(image))
            t0 = time.perf_counter()
            pid = criu.restore(image, work=logs, inherit={})
            restore_s.append(time.perf_counter() - t0)
            os.kill(pid, signal.SIGKILL)
            _reap(pid)
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    size = statistics.median(sizes)
    return {
        "frozen": statistics.median(frozen),
        "dump": statistics.median(dump_s),
        "commit": statistics.median(commit_s),
        "size": size,
        "copy": statistics.median(copy_s),
        "restore": statistics.median(restore_s),
        "read": statistics.median(read_s),
    }


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        while os.path.exists(f"/proc/{pid}"):
            time.sleep(0.05)


def _copy(src: str, dest: str) -> float:
    """Seconds to write an image's bytes, already in memory, into fresh files: the raw copy of the bytes
    a dump moves from the job's memory into the page cache."""
    import mmap

    names = sorted(os.listdir(src))
    total = sum(os.path.getsize(os.path.join(src, n)) for n in names)
    buf = mmap.mmap(-1, max(total, 1))  # page-aligned, touched once below: the job's memory stands ready
    view, at = memoryview(buf), 0
    for name in names:
        with open(os.path.join(src, name), "rb", buffering=0) as f:
            at += f.readinto(view[at:])

    def write() -> float:
        os.makedirs(dest)
        os.sync()
        t0 = time.perf_counter()
        at = 0
        for name in names:
            size = os.path.getsize(os.path.join(src, name))
            with open(os.path.join(dest, name), "wb", buffering=0) as f:
                f.write(view[at : at + size])
            at += size
        elapsed = time.perf_counter() - t0
        shutil.rmtree(dest)
        return elapsed

    write()  # the first write of a run pays for the page cache's own warm-up: not counted, as in stall.py
    elapsed = write()
    view.release()
    buf.close()
    return elapsed


def _read(src: str) -> float:
    """Seconds to read an image's files once (the raw read of the bytes a restore reads)."""
    buf = bytearray(8 << 20)
    t0 = time.perf_counter()
    for name in os.listdir(src):
        with open(os.path.join(src, name), "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=0.5, help="model + AdamW state, GiB")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the images and snapshots go (default: the temp dir)")
    p.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ready", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.job:
        job(args.gib, args.ready)
        return 0
    if os.geteuid() != 0:
        print("bench/freeze.py needs root: CRIU dumps and restores another process")
        return 0
    import ctypes

    ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # a subreaper, as ckptd run is: restored jobs are our children
    work = tempfile.mkdtemp(prefix="ckptd-freeze-", dir=args.dir)
    try:
        stall, snap = hook_rows(args.gib, work, args.reps)
        c = criu_rows(args.gib, work, args.reps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    mib = 1 << 20
    print(f"model + AdamW: {args.gib} GiB; medians of {args.reps}; {work}")
    rows = [
        (
            "training stopped per snapshot",
            f"CRIU freeze {c['frozen']:.3f} s",
            f"hook stall {stall:.3f} s",
            c["frozen"] / stall,
        ),
        (
            "bytes per snapshot",
            f"image {c['size'] / mib:,.0f} MiB",
            f"hook snapshot {snap / mib:,.0f} MiB",
            c["size"] / snap,
        ),
        (
            "dump (criu dump, wall)",
            f"{c['size'] / mib / c['dump']:,.0f} MiB/s ({c['dump']:.2f} s)",
            f"raw copy {c['size'] / mib / c['copy']:,.0f} MiB/s",
            c["copy"] / c["dump"],
        ),
        (
            "+ commit (checksums, manifest)",
            f"{c['commit']:.2f} s",
            f"dump + commit {c['size'] / mib / (c['dump'] + c['commit']):,.0f} MiB/s",
            c["copy"] / (c["dump"] + c["commit"]),
        ),
        (
            "restore (criu restore, wall)",
            f"{c['size'] / mib / c['restore']:,.0f} MiB/s ({c['restore']:.2f} s)",
            f"raw read {c['size'] / mib / c['read']:,.0f} MiB/s",
            c["read"] / c["restore"],
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  {'transparent (CRIU)':<28} {'against':<30} ratio")
    for name, ours, theirs, ratio in rows:
        print(f"{name:{width}}  {ours:<28} {theirs:<30} {ratio:.2f}x")
    print("ratio: rows 1-2 CRIU / hook; rows 3-5 speed as a fraction of the raw copy or read of the same bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
