"""Bitwise resume: a trainer SIGKILLed at every phase of a snapshot ends as if never stopped."""

from __future__ import annotations

import os
import random
import signal

import pytest
from _trainer import assert_same_state, read_losses, run_trainer

STEPS = 40
ARGS = ("--steps", str(STEPS), "--policy", "every:5", "--width", "768", "--depth", "4")


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("reference")
    run = run_trainer(str(d / "store"), *ARGS, "--loss-log", str(d / "loss.log"), "--out", str(d / "final.pt"))
    assert run.returncode == 0, "\n".join(run.lines[-20:])
    return d


# Each kill lands right after the trainer announced a phase of some snapshot.
PHASES = [
    r"step 4: staging",
    r"step 9: staged, writing",
    r"step 14: files written, committing",
    r"step 19: committed",
]


def test_sigkill_at_every_phase_resumes_bitwise(reference, tmp_path):
    store, losses, out = str(tmp_path / "store"), str(tmp_path / "loss.log"), str(tmp_path / "final.pt")
    args = (*ARGS, "--loss-log", losses, "--out", out)
    kills = []
    for phase in PHASES:
        run = run_trainer(store, *args, kill_on=phase)
        assert run.returncode == -signal.SIGKILL, f"trainer finished before {phase!r} was seen"
        kills.append(run.killed_after)
    rng = random.Random(1234)
    for _ in range(2):  # and at random moments of a step
        run = run_trainer(store, *args, kill_on=r"starting at step", kill_delay=rng.uniform(0.5, 2.5))
        kills.append((run.killed_after, run.returncode))
    final = run_trainer(store, *args)
    assert final.returncode == 0, "\n".join(final.lines[-20:])
    assert_same_state(str(reference / "final.pt"), out)
    ref = read_losses(str(reference / "loss.log"))
    got = read_losses(losses)
    assert set(got) == set(range(STEPS))
    for step, values in got.items():
        assert values == ref[step], f"step {step}: losses {values} vs uninterrupted {ref[step]}"
    with open(losses) as f:
        logged = sum(1 for _ in f)
    assert logged > STEPS, "no step was redone: the kills did not interrupt unsaved work"


def test_kill_during_write_leaves_no_committed_partial(tmp_path):
    store = str(tmp_path / "store")
    run = run_trainer(store, *ARGS, kill_on=r"step 4: staged, writing", kill_delay=0.01)
    assert run.returncode == -signal.SIGKILL
    step_dir = os.path.join(store, "step-000000000004")
    if os.path.isdir(step_dir):  # the writer died before its manifest: not a snapshot
        assert not os.path.exists(os.path.join(step_dir, "ckptd.json"))
    resumed = run_trainer(store, *ARGS)
    assert resumed.returncode == 0
    assert any("starting at step 0" in line for line in resumed.lines)


def test_sigterm_takes_an_emergency_snapshot_and_exits_resumable(tmp_path):
    store, losses = str(tmp_path / "store"), str(tmp_path / "loss.log")
    args = ("--steps", "200", "--policy", "every:1000", "--step-sleep", "0.02", "--loss-log", losses)
    run = run_trainer(store, *args, kill_on=r"starting at step", kill_delay=1.0, sig=signal.SIGTERM)
    assert run.returncode == 75, "\n".join(run.lines[-10:])
    with open(losses) as f:
        last_done = max(int(line.split()[0]) for line in f)
    committed = [d for d in os.listdir(store) if os.path.exists(os.path.join(store, d, "ckptd.json"))]
    assert committed == [f"step-{last_done:012d}"], "the emergency snapshot must hold every completed step"
    resumed = run_trainer(store, "--steps", str(last_done + 3), "--policy", "every:1000")
    assert resumed.returncode == 0
    assert any(f"starting at step {last_done + 1}" in line for line in resumed.lines)


def check_invariants(store: str) -> int:
    """Every snapshot ls calls committed verifies, and restore takes the newest of them."""
    import ckptd
    from ckptd.store import open_store
    from ckptd.tools.verify import verify_snapshot

    st = open_store(store, create=False)
    committed = [i.step for i in ckptd.list_snapshots(store) if i.committed]
    for step in committed:
        assert verify_snapshot(st, step) == [], f"step {step} is committed but does not verify"
    if committed:
        assert ckptd.load(store)["meta"]["step"] == committed[-1]
    return committed[-1] if committed else -1


@pytest.mark.parametrize("seed", [11, 22, 33])
def test_random_sigkills_over_seeds_keep_invariants_and_resume_bitwise(reference, tmp_path, seed):
    store, losses, out = str(tmp_path / "store"), str(tmp_path / "loss.log"), str(tmp_path / "final.pt")
    args = (*ARGS, "--loss-log", losses, "--out", out)
    rng = random.Random(seed)
    newest = -1
    for _ in range(3):
        run = run_trainer(store, *args, kill_on=r"starting at step", kill_delay=rng.uniform(0.2, 3.0))
        if run.returncode == 0:
            break
        now = check_invariants(store)
        assert now >= newest, "a committed snapshot was lost"
        newest = now
    final = run_trainer(store, *args)
    assert final.returncode == 0
    assert_same_state(str(reference / "final.pt"), out)
    assert read_losses(losses) == read_losses(str(reference / "loss.log"))
