"""The policy comparison of the policy issue, from the simulator (prints; never fails on results).

(a) Llama 3's failure rate at 1,024 and 16,384 GPUs; (b) bursty risk: job
MTBF 6 h, risk x20 for 2 h about once a day. Stall 20 s, persist 90 s,
restart 120 s, one week per seed. (c) a new user's one-GPU job under the
default policy (hardware plus job-level rate, stall 0.3 s overlapped)
against Lightning's per-epoch and the HF Trainer's every-500-steps
defaults, which save synchronously (2 s per save, the machine's torch.save
of 0.8 GB); step 0.5 s, epoch 10,000 steps, restart 60 s, two weeks a seed.

    python bench/policy_sim.py [--seeds 50]
"""

from __future__ import annotations

import argparse
import sys
import time

from ckptd.policy import LLAMA3_JOB_PER_HOUR
from ckptd.policy.simulate import Scenario, against_frameworks, simulate


def show(title: str, rows) -> dict:
    print(f"\n{title}")
    print(
        f"  {'policy':28s} {'interval':>9s} {'waste %':>8s} {'±95%':>6s} {'stall':>6s} {'rework':>7s} "
        f"{'restart':>7s} {'lost s':>7s} {'p95 s':>7s} {'$/GPU-h':>8s}"
    )
    for r in rows:
        print(
            f"  {r.name:28s} {r.interval:>9s} {r.waste * 100:8.3f} {r.waste_ci * 100:6.3f} {r.stall * 100:6.2f} "
            f"{r.rework * 100:7.2f} {r.restart * 100:7.2f} {r.loss_mean_s:7.0f} {r.loss_p95_s:7.0f} "
            f"{r.dollars:8.4f}"
        )
    return {r.name: r for r in rows}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=50)
    args = p.parse_args()
    t0 = time.time()
    common = dict(stall=20.0, persist=90.0, restart=120.0, hours=168.0)
    for gpus in (1024, 16384):
        rows = show(
            f"(a) Llama 3 rate, {gpus} GPUs, exponential, {args.seeds} seeds",
            simulate(Scenario(gpus=gpus, **common), seeds=args.seeds),
        )
        best = rows["best fixed (hindsight)"].waste
        for name in ("adaptive, 2% stall budget", "adaptive, no stall budget"):
            w = rows[name].waste
            print(
                f"  goal: {name} vs best fixed: {100 * (w - best):+.3f} percentage points "
                f"({100 * (w / best - 1):+.1f}% relative)"
            )
    bursty = Scenario(
        gpus=1, per_gpu_hour=1 / 6.0, kind="bursty", burst_factor=20.0, burst_hours=2.0, bursts_per_day=1.0, **common
    )
    rows = show(
        f"(b) bursty risk, job MTBF 6 h, x20 for 2 h about daily, {args.seeds} seeds",
        simulate(bursty, seeds=args.seeds),
    )
    daly = rows["Daly (static)"].waste
    for name in ("adaptive, 2% stall budget", "adaptive, no stall budget"):
        print(f"  goal: {name} vs static Daly: {100 * (1 - rows[name].waste / daly):.1f}% less waste")
    one = Scenario(
        gpus=1, job_per_hour=LLAMA3_JOB_PER_HOUR, stall=0.3, persist=5.0, restart=60.0, step_time=0.5, hours=24 * 14
    )
    rows = show(
        f"(c) one GPU, job MTBF {one.mtbf / 3600:.1f} h, the default policy against the frameworks' "
        f"defaults, {args.seeds} seeds",
        against_frameworks(one, sync_stall=2.0, epoch_steps=10000, seeds=args.seeds),
    )
    ours = rows["ckptd default policy"].waste
    for name, r in rows.items():
        if name != "ckptd default policy":
            print(f"  ckptd default policy vs {name}: {r.waste / ours:.1f}x less waste")
    print(f"\n({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
