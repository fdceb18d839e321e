"""A real job that fails in the ways ckptd accounts for, then its goodput (the README's example and picture).

Two `ckptd run` sessions of examples/train.py on one store: a SIGKILL, a fatal XID on GPU 1 and a
preemption (SIGTERM) in the first; a pause (waiting for a node); a SIGKILL and the finish in the second.
No GPU here: the daemon's NVML is the test suite's fake (2 GPUs drawing 300 W each), so the energy
figures are the fake's; everything else (processes, signals, snapshots, restores) is real.

    python bench/goodput_demo.py --out /tmp/goodput-demo --plot docs/goodput.png
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "examples", "train.py")


def top(path: str) -> int:
    try:
        with open(path) as f:
            return max((int(line.split()[0]) for line in f if line.strip()), default=-1)
    except FileNotFoundError:
        return -1


def wait_step(proc: subprocess.Popen, losses: str, step: int) -> None:
    while top(losses) < step:
        if proc.poll() is not None:
            raise SystemExit(f"ckptd run ended (exit {proc.returncode}) before step {step}")
        time.sleep(0.02)


def kill_trainer(proc: subprocess.Popen) -> None:
    for p in psutil.Process(proc.pid).children(recursive=True):
        if TRAIN in " ".join(p.cmdline()):
            p.send_signal(signal.SIGKILL)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/goodput-demo", help="working directory (the store is OUT/store)")
    ap.add_argument("--plot", default=None, help="write the goodput timeline here")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    store, losses, fault = (os.path.join(args.out, n) for n in ("store", "loss.log", "fault"))
    timeline = os.path.join(args.out, "timeline.json")
    with open(timeline, "w") as f:
        json.dump({"gpus": 2, "power_w": 300, "events": [{"when_exists": fault, "gpu": 1, "xid": 79}]}, f)
    env = {
        **os.environ,
        "CKPTD_NVML_MODULE": "fake_nvml",
        "FAKE_NVML_TIMELINE": timeline,
        "PYTHONPATH": os.pathsep.join([os.path.join(ROOT, "tests"), ROOT, os.environ.get("PYTHONPATH", "")]),
        "CKPTD_JOB": "demo",
        "CKPTD_LEDGER_EVERY": "2",
    }
    trainer = [sys.executable, TRAIN, "--steps", "600", "--policy", "every:50", "--step-sleep", "0.05"]
    trainer += ["--loss-log", losses]

    def session(sock: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "ckptd.cli", "run", "--store", store, "--gpus", "0,1", "--backoff", "1"]
        return subprocess.Popen([*cmd, "--socket", os.path.join(args.out, sock), "--", *trainer], env=env)

    first = session("d1.sock")
    wait_step(first, losses, 120)
    kill_trainer(first)  # a crash: the work since step 99's snapshot is lost
    wait_step(first, losses, 260)
    open(fault, "w").close()  # XID 79 on GPU 1: the daemon stops the job, which snapshots first
    wait_step(first, losses, 380)
    first.send_signal(signal.SIGTERM)  # preempted: an emergency snapshot, exit 75
    first.wait()
    time.sleep(8)  # waiting for a node
    os.remove(fault)
    second = session("d2.sock")
    wait_step(second, losses, 480)
    kill_trainer(second)
    second.wait()
    cmd = [sys.executable, "-m", "ckptd.cli", "goodput", store, "--gpus", "2"]  # a CPU job: say its 2 (fake) GPUs
    subprocess.run(cmd + (["--plot", args.plot] if args.plot else []), env=env, check=True)
    print(f"\n$ ckptd goodput {store} --gpus 2" + (f" --plot {args.plot}" if args.plot else ""))


if __name__ == "__main__":
    main()
