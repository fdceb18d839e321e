"""The daemon's Unix socket: mode 0600, peer uid checked with SO_PEERCRED, one thread per client."""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import struct
from typing import Any, Callable

from .protocol import ProtocolError, Reply, decode, encode, read_frame

log = logging.getLogger("ckptd.daemon")

Handler = Callable[[Any, int], Reply]
"""(message, peer pid) -> reply."""


def default_socket() -> str:
    """$CKPTD_SOCKET, else $XDG_RUNTIME_DIR/ckptd.sock, else /tmp/ckptd-<uid>/daemon.sock."""
    if os.environ.get("CKPTD_SOCKET"):
        return os.environ["CKPTD_SOCKET"]
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "ckptd.sock")
    return os.path.join("/tmp", f"ckptd-{os.getuid()}", "daemon.sock")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)


class _Conn(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        server: SocketServer = self.server  # type: ignore[assignment]
        pid, uid, _gid = peer_credentials(self.request)
        if uid != os.getuid():
            log.warning("ckptd daemon: refused a connection from uid %d (pid %d)", uid, pid)
            self._send(Reply(ok=False, error=f"uid {uid} may not talk to this daemon (uid {os.getuid()})"))
            return
        while True:
            try:
                body = read_frame(self.request)
            except ProtocolError as e:
                self._send(Reply(ok=False, error=str(e)))
                return
            except OSError:
                return
            if body is None:
                return
            try:
                reply = server.handler(decode(body), pid)
            except ProtocolError as e:
                reply = Reply(ok=False, error=str(e))
            except Exception as e:  # a bug in handling one message must not take the daemon down
                log.exception("ckptd daemon: error handling a message")
                reply = Reply(ok=False, error=f"daemon error: {type(e).__name__}")
            if not self._send(reply):
                return

    def _send(self, reply: Reply) -> bool:
        try:
            self.request.sendall(encode(reply))
            return True
        except OSError:
            return False


class SocketServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Serves ``handler`` on ``path`` (created 0600; a stale socket file is replaced). Thread-safe handler required."""

    daemon_threads = True

    def __init__(self, path: str, handler: Handler) -> None:
        self.handler = handler
        os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
        if os.path.exists(path):
            _remove_stale(path)
        old = os.umask(0o177)
        try:
            super().__init__(path, _Conn)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        self.path = path

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _remove_stale(path: str) -> None:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)
        return
    finally:
        probe.close()
    raise OSError(f"a daemon already listens on {path}; stop it or pass another --socket")
