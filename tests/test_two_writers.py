"""Two jobs started at the same moment on one store, round after round: a race may cost an attempt, never a
committed snapshot."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

import ckptd

WRITER = """
import sys, time, torch, ckptd
from ckptd.errors import StoreInUse
sys.path.insert(0, {tests!r})
from test_snapshot import make, train_step, ckpt_for
while time.time() < {start}:
    time.sleep(0.001)
model, opt, sched, counter = make({seed})
try:
    ck = ckpt_for({store!r}, model, opt, sched, counter, policy="every:1", keep_last=4, **{extra})
except StoreInUse as e:
    print("refused:", e)
    sys.exit(3)
try:
    first = ck.restore()
    for s in range(first, first + 20):
        train_step(model, opt, sched, counter)
        ck.step(s)
    ck.close(timeout=60)
except ckptd.CkptdError as e:
    print("stopped:", type(e).__name__, str(e)[:200])
    sys.exit(4)
print("done")
"""


def race(store: str, extra: dict, env: dict) -> list[int]:
    start = time.time() + 2.0
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER.format(tests=os.path.dirname(__file__), start=start, seed=i, store=store, extra=extra),
            ],
            env={**os.environ, **env, "CKPTD_JOB": f"writer-{i}"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    codes = []
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode in (0, 3, 4), out[-3000:]
        codes.append(p.returncode)
    return codes


@pytest.mark.parametrize("take_over", [False, True], ids=["lease", "take over"])
@pytest.mark.parametrize("kind", ["file", "s3"])
def test_racing_writers_never_damage_a_committed_snapshot(kind, take_over, s3env, tmp_path):
    store = str(tmp_path / "store") if kind == "file" else f"s3://{s3env.make_bucket()}/race"
    env = {**s3env.env(), "CKPTD_LOCAL": str(tmp_path / "tier")}  # same node, so the same local tier base
    extra = {"take_over": True} if take_over else {}
    outcomes = []
    for _round in range(2):
        codes = race(store, extra, env)
        outcomes.append(codes)
        assert 0 in codes or 4 in codes, codes
        if not take_over:
            assert codes.count(0) >= 1 and 4 not in codes, f"the lease holder finishes; the other is refused: {codes}"
        res = subprocess.run(
            [sys.executable, "-m", "ckptd.cli", "verify", store, "--all"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **env},
        )
        assert res.returncode == 0, f"round {_round} {codes}:\n{res.stdout}{res.stderr}"
    committed = [i for i in ckptd.list_snapshots(store) if i.committed]
    assert committed, outcomes
