"""Recovery time after SIGKILL for a job of about 1 GiB of state, split into its parts.

The trainer (examples/train.py) runs under ckptd's supervisor, snapshots at
step N, and SIGKILLs itself right after; the supervisor relaunches it and
its progress events give detection, restart, restore and catch-up times.
Beside it: the time the same job takes to start from nothing (launch to
first step). Benchmarks print; they never fail on timing.

    python bench/recovery.py [--width 4096 --depth 5] [--s3]

``--s3`` also measures recovery from a local SeaweedFS with an empty local
tier (the node's disk is gone), using the test suite's server helper.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
TRAIN = os.path.join(ROOT, "examples", "train.py")

from ckptd.progress import ENV as PROGRESS_ENV  # noqa: E402
from ckptd.progress import read_attempts  # noqa: E402
from ckptd.supervisor import RunConfig, Supervisor  # noqa: E402


def trainer_cmd(args, extra=()) -> tuple[str, ...]:
    return (
        sys.executable,
        TRAIN,
        "--width",
        str(args.width),
        "--depth",
        str(args.depth),
        "--steps",
        str(args.crash_at + 3),
        "--policy",
        f"every:{args.crash_at + 1}",
        *extra,
    )


def cold_start(args, work: str) -> float:
    """Launch → first completed step, on an empty store."""
    path = tempfile.mktemp(prefix="ckptd-progress-")
    cmd = trainer_cmd(args)[:-4] + ("--steps", "1", "--policy", "every:1000", "--store", os.path.join(work, "cold"))
    t0 = time.time()
    subprocess.run(cmd, env={**os.environ, PROGRESS_ENV: path}, check=True, stderr=subprocess.DEVNULL)
    first = read_attempts(path)[0].first_step_at
    os.unlink(path)
    shutil.rmtree(os.path.join(work, "cold"), ignore_errors=True)
    return first - t0 if first else float("nan")


def recover(args, store: str, env: dict | None = None, wipe_local: str | None = None):
    marker = tempfile.mktemp(prefix="ckptd-crash-")
    extra = ("--crash-at", str(args.crash_at), "--crash-with", "sigkill", "--crash-marker", marker)
    os.environ.update(env or {})
    sup = Supervisor(RunConfig(store=store, command=trainer_cmd(args, extra), max_restarts=2, backoff=0.0))
    if wipe_local:  # the relaunch finds an empty local tier: a new node
        original = sup._launch_and_wait

        def launch_and_wipe():
            result = original()
            shutil.rmtree(wipe_local, ignore_errors=True)
            return result

        sup._launch_and_wait = launch_and_wipe
    summary = sup.run()
    os.path.exists(marker) and os.unlink(marker)
    return summary.restarts[0] if summary.restarts else None


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--depth", type=int, default=5)
    p.add_argument("--crash-at", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--s3", action="store_true")
    args = p.parse_args()
    params = args.depth * args.width * args.width
    print(f"state: about {params * 12 / 2**30:.2f} GiB (params + AdamW moments, fp32)")
    work = tempfile.mkdtemp(prefix="ckptd-bench-")
    rows = {}
    try:
        rows["start from nothing"] = [cold_start(args, work) for _ in range(args.reps)]
        local = [recover(args, os.path.join(work, f"local{i}")) for i in range(args.reps)]
        rows.update(_split("local tier", local))
        if args.s3:
            rows.update(_split("SeaweedFS, empty local tier", _s3_runs(args, work)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{'measure':<45} {'median s':>9}   (runs)")
    for name, values in rows.items():
        vals = [v for v in values if v == v]
        med = statistics.median(vals) if vals else float("nan")
        print(f"{name:<45} {med:9.2f}   {', '.join(f'{v:.2f}' for v in values)}")
    return 0


def _split(label: str, restarts) -> dict[str, list[float]]:
    out = {
        f"{label}: lost steps": [
            float("nan") if r is None or r.lost_steps is None else float(r.lost_steps) for r in restarts
        ]
    }
    for part in ("detection_s", "restart_s", "restore_s", "catch_up_s", "recovery_s"):
        out[f"{label}: {part[:-2].replace('_', '-')}"] = [
            float("nan") if r is None or getattr(r, part) is None else getattr(r, part) for r in restarts
        ]
    return out


def _s3_runs(args, work: str):
    from _seaweed import SeaweedServer  # the test suite's real server on loopback

    server = SeaweedServer(os.path.join(work, "weed"))
    server.start()
    try:
        runs = []
        for i in range(args.reps):
            bucket = server.make_bucket()
            local = os.path.join(work, f"tier{i}")
            env = {**server.env(), "CKPTD_LOCAL": local}
            runs.append(recover(args, f"s3://{bucket}/run", env=env, wipe_local=local))
        return runs
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
