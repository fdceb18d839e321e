"""How long a fresh reader (``ckptd goodput``) takes to read a long job's ledger: loose pages against bundles.

Writes --pages pages of a job to a local SeaweedFS (as a hook flushing a
train span each would leave them), reads them all with a fresh
LedgerReader, bundles them, and reads again. Medians of --reps; never fails
on timing.

    python bench/ledger_read.py [--pages 5000] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from _seaweed import SeaweedServer  # noqa: E402

T = 1.8e9
JOB = "job-1"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pages", type=int, default=5000)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    work = tempfile.mkdtemp(prefix="ckptd-ledgerbench-")
    server = SeaweedServer(os.path.join(work, "weed"))
    server.start()
    os.environ.update(server.env())
    try:
        return run(args, server)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


def run(args, server: SeaweedServer) -> int:
    from ckptd.ledger.book import LedgerReader, page_key
    from ckptd.ledger.record import Page, Record
    from ckptd.store import open_store

    bucket = server.make_bucket()
    store = open_store(f"s3://{bucket}/run")

    def put(i: int) -> None:
        rec = Record(kind="train", pid=7, t0=T + 30 * i, t1=T + 30 * (i + 1), step0=10 * i, step1=10 * i + 9, steps=10)
        store.put_bytes(page_key(JOB, "hook", "0123abcd", i, T + 30 * (i + 1)), Page(JOB, "hook", (rec,)).to_json())

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(args.pages)))

    def fresh_read() -> int:
        return len(LedgerReader(open_store(f"s3://{bucket}/run")).read(JOB).records(JOB))

    def timed() -> float:
        t0 = time.perf_counter()
        assert fresh_read() == args.pages
        return time.perf_counter() - t0

    loose = statistics.median(timed() for _ in range(args.reps))
    reader = LedgerReader(store)
    reader.read(JOB)
    t0 = time.perf_counter()
    done = reader.bundle()[JOB]
    took = time.perf_counter() - t0
    bundled = statistics.median(timed() for _ in range(args.reps))
    print(f"{args.pages} pages of one job on SeaweedFS (127.0.0.1); fresh reader, medians of {args.reps}")
    print(f"  read, loose pages      {loose:8.2f} s")
    print(f"  bundle them (once)     {took:8.2f} s  ({done.pages} pages into {done.bundles} object(s))")
    print(f"  read, bundled          {bundled:8.2f} s  ({loose / bundled:.0f}x faster)")
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
