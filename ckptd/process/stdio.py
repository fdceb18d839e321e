"""The job's stdout and stderr: pipes whose read ends ``ckptd run`` pumps into its own (no torch).

Pipes, not files: CRIU refuses to restore a regular file that grew after the dump ("has bad size"), and
a terminal belongs to a session the job left. A restored job gets new pipes in place of the ones in its
image (``criu restore --inherit-fd fd[N]:pipe:[INODE]``), so its output keeps reaching the same place.
"""

from __future__ import annotations

import os
import threading


class JobOutput:
    """One incarnation's two pipes and the threads that copy them to fds 1 and 2. Not thread-safe; one owner.

    ``close_job_ends()`` once the job (or CRIU) holds its ends; ``close()`` waits for the pumps to reach
    the end of the job's output.
    """

    def __init__(self, targets: tuple[int, int] = (1, 2)) -> None:
        self._read: list[int] = []
        self.job_ends: list[int] = []
        for _ in targets:
            r, w = os.pipe()
            self._read.append(r)
            self.job_ends.append(w)
        self._pumps = [
            threading.Thread(target=_pump, args=(r, dest), name=f"ckptd-stdio-{dest}", daemon=True)
            for r, dest in zip(self._read, targets)
        ]
        for t in self._pumps:
            t.start()

    @property
    def inodes(self) -> tuple[int, ...]:
        """The pipes' inode numbers, as CRIU names them in an image (``pipe:[INODE]``)."""
        return tuple(os.fstat(r).st_ino for r in self._read)

    def close_job_ends(self) -> None:
        for w in self.job_ends:
            os.close(w)
        self.job_ends = []

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the job's last byte (the pumps end when every writer is gone), or after ``timeout``."""
        self.close_job_ends()
        for t in self._pumps:
            t.join(timeout)
        for r in self._read:
            try:
                os.close(r)
            except OSError:
                pass
        self._read = []


def _pump(src: int, dest: int) -> None:
    while True:
        try:
            data = os.read(src, 1 << 16)
        except OSError:
            return
        if not data:
            return
        view = memoryview(data)
        while view:
            try:
                view = view[os.write(dest, view) :]
            except BrokenPipeError:
                view = view[:0]  # nobody reads ckptd run's output: drop the job's too, keep it running
            except OSError:
                return
