"""The job's processes as ``ckptd run`` holds them: launched or restored, waited for, stopped (no torch).

The job's root is PID 1 of its own PID namespace and a child of ``ckptd run`` (a subreaper: the launcher
and ``criu restore -d`` exit and leave it there), so its end is read with ``waitpid`` and SIGKILL to it
takes the whole tree.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping

from ..errors import ConfigError
from . import launch
from .criu import Criu
from .image import ProcessMeta, link_images
from .stdio import JobOutput

_PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> None:
    """Orphans below this process (a launched or restored job) become its children, not init's."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


class JobProcess:
    """One incarnation of the job: its root pid and its output pipes. Not thread-safe; one owner."""

    def __init__(self, pid: int, output: JobOutput) -> None:
        self.pid: int | None = pid
        self.output = output
        self.inodes = output.inodes
        """The inodes of the pipes that are its stdout and stderr, which an image of it records."""

    @classmethod
    def launch(cls, command: tuple[str, ...], env: Mapping[str, str]) -> JobProcess:
        """Start ``command`` as PID 1 of a new PID namespace, in a session of its own."""
        output = JobOutput()
        report_r, report_w = os.pipe()
        try:
            proc = subprocess.Popen(
                [sys.executable, "-S", launch.__file__, str(report_w), "--", *command],
                stdin=subprocess.DEVNULL,
                stdout=output.job_ends[0],
                stderr=output.job_ends[1],
                pass_fds=(report_w,),
                env=dict(env),
            )
        finally:
            os.close(report_w)
        output.close_job_ends()
        with os.fdopen(report_r, "rb") as f:
            reported = f.read(64)
        code = proc.wait()
        if code != 0 or not reported.strip().isdigit():
            output.close()
            raise ConfigError(f"could not start {command[0]!r} in a PID namespace (launcher exit {code})")
        return cls(int(reported), output)

    @classmethod
    def restore(
        cls,
        criu: Criu,
        images: str,
        meta: ProcessMeta,
        names: list[str],
        *,
        work: str,
    ) -> JobProcess:
        """Restore the image in ``images`` (files ``names``), its stdout and stderr on new pipes."""
        scratch = os.path.join(work, f"restore-{uuid.uuid4().hex[:8]}")
        link_images(images, names, scratch)
        output = JobOutput()
        try:
            pid = criu.restore(
                scratch,
                work=work,
                inherit={f"pipe:[{ino}]": fd for ino, fd in zip(meta.stdio, output.job_ends)},
                tcp_established=meta.tcp_established,
                plugins=bool(meta.driver),
            )
        except BaseException:
            output.close(timeout=0.5)
            raise
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        output.close_job_ends()
        return cls(pid, output)

    def alive(self) -> bool:
        return self.pid is not None and os.path.exists(f"/proc/{self.pid}/fd")

    def poll(self) -> int | None:
        """Its exit code once it has ended (negative: the signal that killed it); None while it runs."""
        if self.pid is None:
            raise RuntimeError("this incarnation of the job was already reaped")
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:  # not our child (no subreaper): judge by /proc
            if os.path.exists(f"/proc/{self.pid}"):
                return None
            pid, status = self.pid, 1 << 8
        if pid == 0:
            return None
        self._ended()
        return os.waitstatus_to_exitcode(status)

    def kill(self, grace: float = 0.0) -> None:
        """SIGTERM first when given a grace period, then SIGKILL to the namespace's init (the whole tree)."""
        if self.pid is None:
            return
        if grace > 0:
            _signal(self.pid, signal.SIGTERM)
            end = time.monotonic() + grace
            while time.monotonic() < end:
                if self.poll() is not None:
                    return
                time.sleep(0.05)
        _signal(self.pid, signal.SIGKILL)
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self._ended()

    def _ended(self) -> None:
        self.pid = None
        self.output.close()


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
