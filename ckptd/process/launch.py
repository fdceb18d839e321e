"""The launcher of a transparent job: ``python launch.py PID_FD -- CMD ...`` (run as a script, imports nothing).

It enters a new PID namespace and forks: the child is the namespace's init, starts a session of its
own and execs CMD; the launcher writes the child's pid (as ``ckptd run`` sees it) to PID_FD and exits,
so the job becomes a child of ``ckptd run``, its subreaper. In its own PID namespace the job keeps its
PIDs through any number of restores, on any machine, without colliding with anything there.
"""

from __future__ import annotations

import ctypes
import os
import sys

CLONE_NEWPID = 0x20000000


def main(argv: list[str]) -> int:
    if len(argv) < 3 or argv[1] != "--":
        sys.stderr.write("usage: launch.py PID_FD -- CMD ...\n")
        return 2
    report = int(argv[0])
    os.set_inheritable(report, False)  # the job must not hold it
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWPID) != 0:
        err = ctypes.get_errno()
        sys.stderr.write(f"ckptd: cannot make a PID namespace for the job: {os.strerror(err)}\n")
        return 126
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            os.execvp(argv[2], argv[2:])
        except OSError as e:
            sys.stderr.write(f"ckptd: cannot run {argv[2]!r}: {e.strerror}\n")
        os._exit(127)
    os.write(report, f"{pid}\n".encode())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
