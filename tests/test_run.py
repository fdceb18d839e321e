"""`ckptd run`: a job that dies by itself is relaunched and ends as if it never died."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time

import pytest
from _trainer import TRAIN, assert_same_state, read_losses

ARGS = ["--steps", "30", "--policy", "every:4", "--width", "128"]


def ckptd_run(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ckptd.cli", "run", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    subprocess.run(
        [
            sys.executable,
            TRAIN,
            "--store",
            str(d / "s"),
            *ARGS,
            "--out",
            str(d / "final.pt"),
            "--loss-log",
            str(d / "loss.log"),
        ],
        check=True,
        capture_output=True,
    )
    return d


@pytest.mark.parametrize("how,at", [("exit", 13), ("sigkill", 18)])
def test_job_that_crashes_once_finishes_equal_to_uninterrupted(reference, tmp_path, how, at):
    out, losses = str(tmp_path / "final.pt"), str(tmp_path / "loss.log")
    res = ckptd_run(
        "--store",
        str(tmp_path / "s"),
        "--backoff",
        "0.1",
        "--",
        sys.executable,
        TRAIN,
        *ARGS,
        "--out",
        out,
        "--loss-log",
        losses,
        "--crash-at",
        str(at),
        "--crash-with",
        how,
        "--crash-marker",
        str(tmp_path / "crashed"),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert "completed" in res.stderr and "1 restarts" in res.stderr
    cause = "exit 1" if how == "exit" else "killed by SIGKILL"
    assert cause in res.stderr
    row = re.search(rf"│ 1 │ {cause}\s*│\s*(\d+) │", res.stderr)
    assert row and int(row.group(1)) == at - (at // 4 * 4 - 1), res.stderr[-1500:]  # redone since the last every:4
    assert_same_state(str(reference / "final.pt"), out)
    ref = read_losses(str(reference / "loss.log"))
    assert read_losses(losses) == ref


def test_exhausted_restarts_end_non_zero_with_a_summary(tmp_path):
    res = ckptd_run(
        "--store",
        str(tmp_path / "s"),
        "--max-restarts",
        "2",
        "--backoff",
        "0.05",
        "--",
        sys.executable,
        "-c",
        "import sys; sys.exit(7)",
    )
    assert res.returncode == 7
    assert "exhausted after 2 restarts (exit 7)" in res.stderr
    assert res.stderr.count("exit 7") >= 3


def test_sigterm_to_ckptd_run_preempts_the_job_resumably(tmp_path):
    store, losses = str(tmp_path / "s"), str(tmp_path / "loss.log")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ckptd.cli",
            "run",
            "--store",
            store,
            "--grace",
            "20",
            "--",
            sys.executable,
            TRAIN,
            "--steps",
            "500",
            "--policy",
            "every:1000",
            "--step-sleep",
            "0.02",
            "--loss-log",
            losses,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (os.path.exists(losses) and os.path.getsize(losses) > 100):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err[-2000:]
    assert "preempted" in err
    done = max(read_losses(losses))
    assert os.path.exists(os.path.join(store, f"step-{done:012d}", "ckptd.json"))


def test_torchrun_nproc_follows_the_gpus_left():
    from ckptd.supervisor import with_nproc

    assert with_nproc(["torchrun", "--nproc-per-node", "4", "train.py"], 3)[2] == "3"
    assert with_nproc(["torchrun", "--nproc_per_node=4", "train.py"], 2)[1] == "--nproc_per_node=2"
    assert with_nproc([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "8", "t.py"], 7)[4] == "7"
    assert with_nproc(["python", "train.py", "--nproc-per-node", "4"], 1) == [
        "python",
        "train.py",
        "--nproc-per-node",
        "4",
    ]


def test_bad_gpus_leave_cuda_visible_devices(tmp_path):
    from ckptd.supervisor import RunConfig, Supervisor

    probe = tmp_path / "env.txt"
    cfg = RunConfig(
        store=str(tmp_path / "s"),
        gpus=(0, 1, 2),
        max_restarts=0,
        command=(
            sys.executable,
            "-c",
            f"import os; open({str(probe)!r}, 'w').write(os.environ['CUDA_VISIBLE_DEVICES'])",
        ),
    )
    summary = Supervisor(cfg, bad_gpus=lambda: {1}).run()  # CKPTD_SOCKET: the session's own path
    assert summary.exit_code == 0 and probe.read_text() == "0,2"


def test_slurm_requeue_runs_the_documented_scontrol_commands(tmp_path, monkeypatch):
    """A real `scontrol` executable on PATH (a recorder script) sees hold, exclude, release."""
    from ckptd.supervisor import RunConfig, Supervisor

    log = tmp_path / "scontrol.log"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURMD_NODENAME", "gpu-node-7")
    cfg = RunConfig(
        store=str(tmp_path / "s"), gpus=(0, 1), max_restarts=0, daemon=False, command=(sys.executable, "-c", "pass")
    )
    summary = Supervisor(cfg, bad_gpus=lambda: {0, 1}).run()
    assert (summary.exit_code, summary.outcome) == (75, "requeued Slurm job 4242 without node gpu-node-7")
    assert log.read_text().splitlines() == [
        "show job -o 4242",
        "requeuehold 4242",
        "update JobId=4242 ExcNodeList=gpu-node-7",
        "release 4242",
    ]


REPORT_POLICY = """
import sys, torch, ckptd
ck = ckptd.Checkpointer(sys.argv[1], model=torch.nn.Linear(2, 2))
with open(sys.argv[2], "a") as f:
    print(ck.policy.rate.failures, file=f)
ck.close()
launches = len(open(sys.argv[2]).readlines())
sys.exit(0 if launches == 3 else 3)  # fail twice, then succeed
"""


def test_restarts_under_ckptd_run_reach_the_policy(tmp_path):
    script, report = tmp_path / "job.py", tmp_path / "failures.txt"
    script.write_text(REPORT_POLICY)
    res = ckptd_run(
        "--store",
        str(tmp_path / "s"),
        "--backoff",
        "0.05",
        "--",
        sys.executable,
        str(script),
        str(tmp_path / "s"),
        str(report),
    )
    assert res.returncode == 0, res.stderr[-3000:]
    failures = [int(line.split()[0]) for line in report.read_text().splitlines()]
    assert failures == [0, 1, 2]  # each launch's policy knows the restarts before it


QUIET_JOB = """
import logging, sys, torch, ckptd
logging.basicConfig(level=logging.INFO)  # a job that logs at INFO still sees none of the daemon's lines
with ckptd.Checkpointer(model=torch.nn.Linear(2, 2), policy="every:1") as ck:
    for s in range(3):
        ck.step(s)
print("job says hello")
"""


def test_the_daemon_logs_to_its_own_file_not_into_the_job_output(bucket, tmp_path):
    script = tmp_path / "job.py"
    script.write_text(QUIET_JOB)
    sock = tempfile.mkdtemp(prefix="ckd-", dir="/tmp") + "/d.sock"
    res = ckptd_run("--store", f"s3://{bucket}/run", "--socket", sock, "--", sys.executable, str(script))
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout == "job says hello\n"
    assert "ckptd daemon" not in res.stderr and "Found credentials" not in res.stderr
    with open(sock + ".log") as f:
        assert "ckptd daemon: listening" in f.read()
