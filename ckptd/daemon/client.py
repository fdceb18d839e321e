"""The hook's side of the socket (no torch): register, heartbeat, report commits, get commands."""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from ..errors import DaemonUnavailable, ProtocolError, warn
from .protocol import Committed, Heartbeat, Register, Reply, Status, decode, encode, read_frame
from .server import default_socket

log = logging.getLogger("ckptd")

_BEAT_EVERY = 0.2
_TIMEOUT = 5.0
"""Seconds a request may wait for the daemon's reply."""
_CONNECT_WITHIN = 15.0
"""Seconds to keep retrying a connection the daemon's full backlog refused."""


class DaemonLink:
    """One connection to the node's daemon. Thread-safe (a lock serialises requests).

    A connection the daemon closed while idle is opened again, and this
    process registered again, once per request; a daemon that is gone
    raises DaemonUnavailable (an OSError).
    """

    def __init__(self, sock: socket.socket, path: str, pid: int, register: Register | None = None) -> None:
        self._sock, self.path, self.pid = sock, path, pid
        self._register = register
        self._lock = threading.Lock()
        self._last_beat = 0.0

    @classmethod
    def connect(
        cls,
        path: str | None = None,
        *,
        rank: int = 0,
        devices: tuple[int, ...] = (),
        store: str = "",
        local: str = "",
        job: str = "",
        world_size: int = 1,
    ) -> DaemonLink | None:
        """Register with the daemon at ``path`` (default: $CKPTD_SOCKET or the default socket); None if none."""
        path = path or default_socket()
        if not os.path.exists(path):
            log.info("ckptd: no daemon at %s: embedded mode", path)
            return None
        register = Register(
            pid=os.getpid(), rank=rank, devices=tuple(devices), store=store, local=local, job=job, world_size=world_size
        )
        try:
            link = cls(open_socket(path), path, os.getpid(), register)
            reply = link.request(register)
        except (OSError, ProtocolError) as e:
            _fell_back(path, f"it does not answer ({e})")
            return None
        if not reply.ok:
            link.close()
            _fell_back(path, f"it refused us ({reply.error})")
            return None
        log.info("ckptd: registered with the daemon at %s", path)
        return link

    def request(self, msg) -> Reply:
        with self._lock:
            try:
                body = self._exchange(msg)
            except (BrokenPipeError, ConnectionResetError, DaemonUnavailable):
                if self._register is None or isinstance(msg, Register):
                    raise
                self._reopen()
                body = self._exchange(msg)
        reply = decode(body)
        if not isinstance(reply, Reply):
            raise ProtocolError(f"expected a reply, got {type(reply).__name__}")
        return reply

    def _exchange(self, msg) -> bytes:
        self._sock.sendall(encode(msg))
        body = read_frame(self._sock)
        if body is None:
            raise DaemonUnavailable(f"daemon at {self.path} closed the connection")
        return body

    def _reopen(self) -> None:
        """The daemon closed an idle connection (or restarted): connect and register again."""
        self._sock.close()
        self._sock = open_socket(self.path)
        reply = decode(self._exchange(self._register))
        if not isinstance(reply, Reply) or not reply.ok:
            raise DaemonUnavailable(
                f"daemon at {self.path} refused to register us again: {getattr(reply, 'error', reply)}"
            )
        log.info("ckptd: connected to the daemon at %s again", self.path)

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


def open_socket(path: str, *, within: float = _CONNECT_WITHIN) -> socket.socket:
    """A connected socket to ``path``, retrying with backoff while the daemon's backlog is full.

    A Unix socket's connect() fails at once with EAGAIN when the listener's
    queue is full (a burst of ranks); that is worth waiting for, unlike a
    refused connection (no daemon listens).
    """
    deadline = time.monotonic() + within
    delay = 0.005
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(_TIMEOUT)
        try:
            sock.connect(path)
            return sock
        except (BlockingIOError, InterruptedError) as e:
            sock.close()
            if time.monotonic() + delay > deadline:
                raise DaemonUnavailable(
                    f"daemon at {path} is too busy to accept a connection within {within:.0f} s ({e.strerror or e})"
                ) from e
            time.sleep(delay)
            delay = min(delay * 2, 0.25)
        except BaseException:
            sock.close()
            raise


def _fell_back(path: str, why: str) -> None:
    """A daemon socket exists but could not be used: say so loudly, then run without it."""
    msg = f"ckptd: a daemon socket is at {path}, but {why}; running in embedded mode (this process uploads)"
    warn(log, msg, RuntimeWarning, stacklevel=3)


def status_of(path: str | None = None) -> dict:
    """The daemon's status without registering (``ckptd status``)."""
    path = path or default_socket()
    try:
        sock = open_socket(path)
    except DaemonUnavailable:
        raise
    except OSError as e:
        raise DaemonUnavailable(f"no daemon at {path} ({e.strerror or e}); start one with `ckptd daemon`") from e
    link = DaemonLink(sock, path, os.getpid())
    try:
        reply = link.request(Status())
    finally:
        link.close()
    if not reply.ok:
        raise DaemonUnavailable(f"daemon at {path}: {reply.error}")
    return reply.status


def read_bad_gpus(socket_path: str) -> set[int]:
    """GPUs the daemon at ``socket_path`` marked bad (for ``ckptd run``); empty if none or no daemon."""
    try:
        with open(socket_path + ".state.json") as f:
            return {int(g) for g in json.load(f).get("bad_gpus", {})}
    except (OSError, ValueError):
        return set()
