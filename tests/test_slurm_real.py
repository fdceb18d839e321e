"""`ckptd run` under a real Slurm (munged, slurmctld, slurmd on this host): preemption, requeue, resume."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
from _slurm import SlurmCluster, why_not
from _trainer import TRAIN, assert_same_state, read_losses

import ckptd

TESTS = os.path.dirname(os.path.abspath(__file__))
WHY_NOT = why_not()
pytestmark = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))


@pytest.fixture(scope="session")
def slurm():
    cluster = SlurmCluster().start()
    yield cluster
    cluster.stop(remove=True)


class Job:
    """A batch job running `ckptd run -- python examples/train.py ...`, its files in one directory."""

    def __init__(
        self,
        slurm: SlurmCluster,
        tmp,
        train_args: list[str],
        run_args: list[str] = (),
        env: dict | None = None,
        requeue: str = "--requeue",
    ) -> None:
        self.slurm, self.dir = slurm, tmp
        self.store, self.losses, self.out = str(tmp / "store"), str(tmp / "loss.log"), str(tmp / "job.out")
        self.socket = str(tmp / "d.sock")  # pytest names keep this well under the 108 bytes of a socket path
        script = tmp / "job.sh"
        cmd = [
            sys.executable,
            "-m",
            "ckptd.cli",
            "run",
            "--store",
            self.store,
            "--socket",
            self.socket,
            "--backoff",
            "0.1",
            *run_args,
            "--",
            sys.executable,
            TRAIN,
            "--loss-log",
            self.losses,
            *train_args,
        ]
        script.write_text("#!/bin/bash\nexec " + " ".join(f"'{c}'" for c in cmd) + "\n")
        env = slurm.env(PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env or {}))
        self.id = slurm.sbatch(requeue, "--open-mode=append", "-o", self.out, "-D", str(tmp), str(script), env=env)

    def output(self) -> str:
        with open(self.out) as f:
            return f.read()

    def wait_for_steps(self, n: int, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while not (os.path.exists(self.losses) and _lines(self.losses) >= n):
            fields = self.slurm.job(self.id)
            assert time.monotonic() < deadline and fields["JobState"] in ("PENDING", "RUNNING"), (
                f"{fields}\n{self.output() if os.path.exists(self.out) else ''}\n{self.slurm.logs()}"
            )
            time.sleep(0.2)

    def starts(self) -> list[int]:
        return [int(m) for m in re.findall(r"^starting at step (\d+)", self.output(), re.M)]


def _lines(path: str) -> int:
    with open(path) as f:
        return sum(1 for _ in f)


ARGS = ["--steps", "300", "--policy", "every:100000", "--width", "128", "--step-sleep", "0.02"]


def test_preempted_job_snapshots_is_requeued_and_resumes_from_that_snapshot(slurm, tmp_path):
    ref = tmp_path / "ref"
    subprocess.run(
        [
            sys.executable,
            TRAIN,
            "--store",
            str(ref / "s"),
            *ARGS,
            "--out",
            str(ref / "final.pt"),
            "--loss-log",
            str(ref / "loss.log"),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    job = Job(slurm, tmp_path, [*ARGS, "--out", str(tmp_path / "final.pt")], ["--grace", "30"])
    job.wait_for_steps(40)
    slurm.run("scancel", "--signal=TERM", "--batch", job.id, check=True)  # Slurm's preemption warning
    done = slurm.wait_job(
        job.id, lambda f: f["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"), 180, "the requeued job to finish"
    )
    out = job.output()
    assert done["JobState"] == "COMPLETED" and done["Restarts"] == "1", out
    assert "ckptd run: preempted in" in out and f"ckptd run: requeued Slurm job {job.id};" in out, out
    assert "killed by SIGKILL" not in out, out
    # Policy every:100000: the one snapshot is the emergency one, and the second run starts right after it.
    (snap,) = ckptd.list_snapshots(job.store)
    assert snap.committed and job.starts() == [0, snap.step + 1], out
    assert_same_state(str(ref / "final.pt"), str(tmp_path / "final.pt"))
    assert read_losses(job.losses) == read_losses(str(ref / "loss.log"))


def test_fatal_gpu_requeues_the_job_without_this_node(slurm, tmp_path):
    cue = tmp_path / "fault-now"
    timeline = tmp_path / "timeline.json"
    timeline.write_text(json.dumps({"gpus": 1, "events": [{"when_exists": str(cue), "gpu": 0, "xid": 79}]}))
    job = Job(
        slurm,
        tmp_path,
        ["--steps", "100000", "--policy", "every:100000", "--step-sleep", "0.02"],
        ["--gpus", "0", "--grace", "30"],
        env={"CKPTD_NVML_MODULE": "fake_nvml", "FAKE_NVML_TIMELINE": str(timeline)},
    )
    try:
        job.wait_for_steps(20)
        cue.touch()
        held = slurm.wait_job(job.id, lambda f: f["Restarts"] == "1" and f["JobState"] == "PENDING", 120, "the requeue")
        assert held["ExcNodeList"] == slurm.node, held
        deadline = time.monotonic() + 60
        while f"requeued Slurm job {job.id} without node {slurm.node}" not in job.output():
            assert time.monotonic() < deadline, job.output()
            time.sleep(0.2)
        # The daemon stopped the job for the fault: it took its emergency snapshot first.
        assert "preempted (exit 75)" in job.output()
        (snap,) = ckptd.list_snapshots(job.store)
        assert snap.committed
        time.sleep(2 * 2 + 1)  # past a scheduling pass: it stays pending, since its only node is excluded
        now = slurm.job(job.id)
        assert now["JobState"] == "PENDING" and "held" not in now["Reason"], now  # released, not left on hold
    finally:
        slurm.run("scancel", job.id)


def test_status_names_the_slurm_job_and_scancel_is_not_requeued(slurm, tmp_path):
    job = Job(slurm, tmp_path, ["--steps", "100000", "--policy", "every:100000", "--step-sleep", "0.02"])
    try:
        job.wait_for_steps(5)
        st = subprocess.run(
            [sys.executable, "-m", "ckptd.cli", "status", "--socket", job.socket, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        (row,) = json.loads(st.stdout)["jobs"]
        assert row["job"] == job.id
        text = subprocess.run(
            [sys.executable, "-m", "ckptd.cli", "status", "--socket", job.socket],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        assert re.search(rf"│ {job.id} +│ {row['pid']} +│ 0 ", text), text
    finally:
        slurm.run("scancel", job.id, check=True)  # an end, not a preemption warning: Slurm's to decide
    ended = slurm.wait_job(job.id, lambda f: f["JobState"] not in ("PENDING", "RUNNING", "COMPLETING"), 60, "scancel")
    assert ended["JobState"] == "CANCELLED" and ended["Restarts"] == "0", ended


def test_a_job_slurm_may_not_requeue_ends_preempted_and_says_how_to_resume(slurm, tmp_path):
    job = Job(
        slurm,
        tmp_path,
        ["--steps", "100000", "--policy", "every:100000", "--step-sleep", "0.02"],
        requeue="--no-requeue",
    )
    job.wait_for_steps(5)
    slurm.run("scancel", "--signal=TERM", "--batch", job.id, check=True)
    ended = slurm.wait_job(job.id, lambda f: f["JobState"] not in ("PENDING", "RUNNING", "COMPLETING"), 60, "its end")
    assert (ended["JobState"], ended["ExitCode"], ended["Restarts"]) == ("FAILED", "75:0", "0"), ended
    assert f"Slurm job {job.id} may not be requeued; submit it with `sbatch --requeue`" in job.output()


REPORT_POLICY = """
import sys, time, torch, ckptd
ck = ckptd.Checkpointer(sys.argv[1], model=torch.nn.Linear(2, 2))  # the adaptive policy: it learns the rate
with open(sys.argv[2], "a") as f:
    print(ck.policy.rate.failures, file=f)
if ck.restore():  # the requeued run: done
    ck.close()
    sys.exit(0)
for step in range(100000):
    ck.step(step)
    time.sleep(0.02)
"""


def test_the_policy_of_a_requeued_job_counts_slurms_requeue(slurm, tmp_path):
    script, report = tmp_path / "job.py", tmp_path / "failures.txt"
    script.write_text(REPORT_POLICY)
    store = str(tmp_path / "store")
    cmd = [
        sys.executable,
        "-m",
        "ckptd.cli",
        "run",
        "--store",
        store,
        "--no-daemon",
        "--",
        sys.executable,
        str(script),
        store,
        str(report),
    ]
    (tmp_path / "job.sh").write_text("#!/bin/bash\nexec " + " ".join(f"'{c}'" for c in cmd) + "\n")
    job = slurm.sbatch(
        "--requeue",
        "--open-mode=append",
        "-o",
        str(tmp_path / "job.out"),
        str(tmp_path / "job.sh"),
        env=slurm.env(PYTHONPATH=os.environ.get("PYTHONPATH", "")),
    )
    deadline = time.monotonic() + 90
    while not (report.exists() and report.read_text()):
        assert time.monotonic() < deadline and slurm.job(job)["JobState"] in ("PENDING", "RUNNING")
        time.sleep(0.2)
    slurm.run("scancel", "--signal=TERM", "--batch", job, check=True)
    done = slurm.wait_job(job, lambda f: f["JobState"] in ("COMPLETED", "FAILED", "CANCELLED"), 120, "its end")
    assert done["JobState"] == "COMPLETED" and done["Restarts"] == "1", (tmp_path / "job.out").read_text()
    assert [int(x) for x in report.read_text().split()] == [0, 1]
