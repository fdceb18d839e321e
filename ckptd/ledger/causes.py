"""The causes a ledger splits wall time into, and a stretch of time with its cause (no torch)."""

from __future__ import annotations

from dataclasses import dataclass

CAUSES = ("productive", "stall", "lost", "restart", "hang", "paused", "startup")
"""Every second of a job goes to exactly one of these."""
BADPUT = CAUSES[1:]
MEANING = {
    "productive": "steps whose work was kept",
    "stall": "training waited for a snapshot (staging, emergency and last snapshots)",
    "lost": "work after the snapshot a failure fell back to (redone after the restore)",
    "restart": "after a failure: detection, stopping, backoff, process start, restore",
    "hang": "no progress until the daemon declared a hang",
    "paused": "no process of the job: preempted, paused, waiting for a node (no GPUs held)",
    "startup": "first process start and restore; exit at the end",
}


@dataclass(frozen=True)
class Segment:
    """A stretch of wall time (Unix s) and its cause."""

    t0: float
    t1: float
    cause: str
