"""Slurm: requeue this job, after a preemption or without this node after a node-fatal fault (no torch).

Without this node (a running job's ExcNodeList can only change while it is pending):

    scontrol show job -o $SLURM_JOB_ID          the nodes it already excludes
    scontrol requeuehold $SLURM_JOB_ID
    scontrol update JobId=$SLURM_JOB_ID ExcNodeList=<nodes excluded before>,<this node>
    scontrol release $SLURM_JOB_ID

After a preemption signal Slurm did not follow with an end of its own (``scancel --signal``,
``sbatch --signal`` before the time limit): ``scontrol requeue $SLURM_JOB_ID``.

A requeue makes Slurm SIGTERM every process of the job at once, these commands
too, so each runs with SIGTERM ignored; SIGKILL follows only after KillWait.
The job comes back (on another node) and resumes from its newest snapshot.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import subprocess

from .errors import CkptdError

log = logging.getLogger("ckptd")


def in_slurm() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID"))


def this_node() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def job_fields(job_id: str) -> dict[str, str]:
    """``scontrol show job -o`` as {key: value} for the space-free values (JobState, ExcNodeList, Requeue...)."""
    out = _scontrol("show", "job", "-o", job_id)
    return dict(re.findall(r"(?:^|\s)(\w+)=(\S*)", out))


def requeue_excluding(job_id: str, node: str) -> list[list[str]]:
    """Requeue ``job_id`` with ``node`` added to the nodes it excludes; the commands run. CkptdError if one fails."""
    before = job_fields(job_id).get("ExcNodeList", "")
    nodes = ",".join(n for n in (before if before != "(null)" else "", node) if n)
    commands = [["requeuehold", job_id], ["update", f"JobId={job_id}", f"ExcNodeList={nodes}"], ["release", job_id]]
    for args in commands:
        _scontrol(*args)
    return [["scontrol", *args] for args in commands]


def requeue_after_preemption(job_id: str) -> bool:
    """Requeue a job that was signalled but is still running in Slurm's eyes; False when Slurm decides."""
    fields = job_fields(job_id)
    state = fields.get("JobState", "")
    if state != "RUNNING":
        log.info("ckptd run: Slurm job %s is %s; its requeue is Slurm's", job_id, state or "unknown")
        return False
    if fields.get("Requeue") == "0":
        log.warning(
            "ckptd run: Slurm job %s may not be requeued; submit it with `sbatch --requeue` to resume it automatically",
            job_id,
        )
        return False
    _scontrol("requeue", job_id)
    return True


def _ignore_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _scontrol(*args: str) -> str:
    cmd = ["scontrol", *args]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60, preexec_fn=_ignore_sigterm)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise CkptdError(f"`{' '.join(cmd)}` could not run ({e}); is Slurm's scontrol on PATH?") from e
    if res.returncode != 0:
        raise CkptdError(f"`{' '.join(cmd)}` failed: {res.stderr.strip() or res.returncode}")
    return res.stdout
