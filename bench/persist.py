"""Persist throughput of the local tier: ckptd's write of a staged snapshot against a raw O_DIRECT write.

Both write the same number of bytes to the same directory, interleaved rep
by rep, with training idle, so the ratio compares the write paths alone:
ckptd's is the file image written with O_DIRECT, its CRC32C and the zip
records' CRC-32 computed in the same pass, ``.metadata`` and an fsync
(the manifest's ``write_s``); raw is the same bytes from an aligned buffer
in 8 MiB O_DIRECT writes, then fsync, no format and no checksum. A
buffered ``write`` + ``fsync`` of the same bytes is printed as the page
cache path. Medians of ``--reps``; never fails on timing.

    python bench/persist.py [--reps 5] [--dir /var/tmp]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from overhead import make_state, raw_direct_write, state_tensors  # noqa: E402

_MiB = 1 << 20


def buffered_write(path: str, view: memoryview) -> float:
    """Write ``view`` through the page cache in 8 MiB writes, fsync; seconds."""
    t0 = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for i in range(0, len(view), 8 * _MiB):
            f.write(view[i : i + 8 * _MiB])
        os.fsync(f.fileno())
    return time.perf_counter() - t0


def ckptd_write_s(store: str, step: int) -> tuple[float, int, str]:
    """The committed snapshot's write seconds, data bytes and write path, from its manifest."""
    m = json.loads(open(os.path.join(store, f"step-{step:012d}", "ckptd.json"), "rb").read())
    return m["meta"]["write_s"], sum(f["size"] for f in m["files"]), m["meta"].get("io", "?")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--dir", default="/var/tmp", help="a directory on a disk file system (tmpfs refuses O_DIRECT)")
    args = p.parse_args()
    import ckptd

    model, opt, _ = make_state()
    work = tempfile.mkdtemp(prefix="ckptd-persist-", dir=args.dir)
    store = os.path.join(work, "store")
    ck = ckptd.Checkpointer(store, model=model, optimizer=opt, policy="every:1000000000", keep_last=2)
    nbytes = sum(t.nbytes for t in state_tensors(model, opt))
    buf = mmap.mmap(-1, (nbytes + 4095) // 4096 * 4096)
    for i in range(0, len(buf), _MiB):
        buf[i : i + _MiB] = os.urandom(min(_MiB, len(buf) - i))
    view = memoryview(buf)
    ours, raws, cached = [], [], []
    try:
        ck.save(0)
        ck.wait()  # warm-up: the pool and the I/O thread are made here
        for rep in range(1, args.reps + 1):
            path = os.path.join(work, "raw")
            raws.append(raw_direct_write(path, view))
            os.unlink(path)
            ck.save(rep)
            ck.wait()
            write_s, size, io = ckptd_write_s(store, rep)
            ours.append(write_s)
            cached.append(buffered_write(path, view))
            os.unlink(path)
    finally:
        ck.close()
        view.release()
        buf.close()
        shutil.rmtree(work, ignore_errors=True)
    mib = size / _MiB
    ck_s, raw_s, buf_s = (statistics.median(x) for x in (ours, raws, cached))
    print(f"persist of {mib:.0f} MiB into {args.dir}, medians of {args.reps}, training idle")
    rows = [
        (f"ckptd ({io}, checksummed)", ck_s),
        ("raw O_DIRECT write + fsync", raw_s),
        ("buffered write + fsync", buf_s),
    ]
    for name, secs in rows:
        print(f"  {name:32s} {mib / secs:7.0f} MiB/s   {secs:.3f} s")
    print(f"  ckptd / raw O_DIRECT = {raw_s / ck_s:.2f}  (goal >= 0.8)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
