"""Slurm: requeue this job with the current node excluded after a node-fatal fault (no torch).

The commands, in order (a running job's ExcNodeList can only change while it is held):

    scontrol requeuehold $SLURM_JOB_ID
    scontrol update JobId=$SLURM_JOB_ID ExcNodeList=<this node>[,<nodes excluded before>]
    scontrol release $SLURM_JOB_ID

The job comes back on another node and resumes from its newest snapshot.
"""

from __future__ import annotations

import os
import socket
import subprocess

from .errors import CkptdError


def in_slurm() -> bool:
    return bool(os.environ.get("SLURM_JOB_ID"))


def this_node() -> str:
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]


def requeue_excluding(job_id: str, node: str, *, excluded: str = "") -> list[list[str]]:
    """Run the three scontrol commands; return them. CkptdError naming the one that failed."""
    nodes = ",".join(n for n in (excluded, node) if n)
    commands = [["scontrol", "requeuehold", job_id],
                ["scontrol", "update", f"JobId={job_id}", f"ExcNodeList={nodes}"],
                ["scontrol", "release", job_id]]
    for cmd in commands:
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CkptdError(f"`{' '.join(cmd)}` could not run ({e}); is Slurm's scontrol on PATH?") from e
        if res.returncode != 0:
            raise CkptdError(f"`{' '.join(cmd)}` failed: {res.stderr.strip() or res.returncode}")
    return commands
