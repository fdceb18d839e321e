"""The hook's side of the socket (no torch): register, heartbeat, report commits, get commands."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

from .protocol import Committed, Heartbeat, ProtocolError, Register, Reply, Status, decode, encode, read_frame
from .server import default_socket

log = logging.getLogger("ckptd")

_BEAT_EVERY = 0.2


class DaemonUnavailable(OSError):
    """No daemon answers at the socket."""


class DaemonLink:
    """One connection to the node's daemon. Thread-safe (a lock serialises requests)."""

    def __init__(self, sock: socket.socket, path: str, pid: int) -> None:
        self._sock, self.path, self.pid = sock, path, pid
        self._lock = threading.Lock()
        self._last_beat = 0.0

    @classmethod
    def connect(cls, path: str | None = None, *, rank: int = 0, devices: tuple[int, ...] = (),
                store: str = "", local: str = "", job: str = "", world_size: int = 1) -> "DaemonLink | None":
        """Register with the daemon at ``path`` (default: $CKPTD_SOCKET or the default socket); None if none."""
        path = path or default_socket()
        if not os.path.exists(path):
            log.info("ckptd: no daemon at %s: embedded mode", path)
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(5.0)
        try:
            sock.connect(path)
            link = cls(sock, path, os.getpid())
            reply = link.request(Register(pid=link.pid, rank=rank, devices=tuple(devices), store=store, local=local,
                                          job=job, world_size=world_size))
        except (OSError, ProtocolError) as e:
            sock.close()
            log.warning("ckptd: daemon at %s does not answer (%s): embedded mode", path, e)
            return None
        if not reply.ok:
            sock.close()
            log.warning("ckptd: daemon at %s refused us (%s): embedded mode", path, reply.error)
            return None
        log.info("ckptd: registered with the daemon at %s", path)
        return link

    def request(self, msg) -> Reply:
        with self._lock:
            self._sock.sendall(encode(msg))
            body = read_frame(self._sock)
        if body is None:
            raise DaemonUnavailable(f"daemon at {self.path} closed the connection")
        reply = decode(body)
        if not isinstance(reply, Reply):
            raise ProtocolError(f"expected a reply, got {type(reply).__name__}")
        return reply

    def heartbeat(self, step: int, step_time: float | None, *, force: bool = False) -> Reply | None:
        """Report progress at most every 0.2 s (or now with ``force``); the reply carries commands."""
        now = time.monotonic()
        if not force and now - self._last_beat < _BEAT_EVERY:
            return None
        self._last_beat = now
        return self.request(Heartbeat(pid=self.pid, step=step, step_time=step_time))

    def committed(self, step: int, path: str) -> None:
        self.request(Committed(pid=self.pid, step=step, path=path))

    def status(self) -> dict:
        return self.request(Status()).status

    def close(self) -> None:
        self._sock.close()


def status_of(path: str | None = None) -> dict:
    """The daemon's status without registering (``ckptd status``)."""
    path = path or default_socket()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5.0)
    try:
        sock.connect(path)
    except OSError as e:
        sock.close()
        raise DaemonUnavailable(f"no daemon at {path} ({e.strerror or e}); start one with `ckptd daemon`") from e
    link = DaemonLink(sock, path, os.getpid())
    try:
        reply = link.request(Status())
    finally:
        link.close()
    if not reply.ok:
        raise DaemonUnavailable(f"daemon at {path}: {reply.error}")
    return reply.status
