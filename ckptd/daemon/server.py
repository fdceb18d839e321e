"""The daemon's Unix socket: mode 0600, peer uid checked with SO_PEERCRED, one thread per client.

Hostile or merely crowded clients cost an error reply, never a dead handler:
connections are bounded, idle ones time out, a reply that cannot be encoded
becomes an error reply, and the listen backlog holds a burst of ranks.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import struct
import threading
from collections.abc import Callable
from typing import Any

from ..errors import ProtocolError
from .protocol import Reply, decode, encode, read_frame

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
        if not server.admit():
            self._send(
                Reply(
                    ok=False, error=f"the daemon serves at most {server.max_clients} connections at once; retry later"
                )
            )
            return
        try:
            self._serve(server, pid)
        finally:
            server.leave()

    def _serve(self, server: SocketServer, pid: int) -> None:
        self.request.settimeout(server.idle_timeout)
        while True:
            try:
                body = read_frame(self.request)
            except ProtocolError as e:
                self._send(Reply(ok=False, error=str(e)))
                return
            except OSError:  # includes the idle timeout: the client reconnects when it needs to
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
            frame = encode(reply)
        except (ValueError, TypeError) as e:  # ProtocolError (too large) is a ValueError too
            log.error("ckptd daemon: a reply could not be encoded (%s); sent an error instead", e)
            frame = encode(Reply(ok=False, error=f"daemon error: the reply could not be encoded ({e})"[:1000]))
        try:
            self.request.sendall(frame)
            return True
        except OSError:
            return False


class SocketServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    """Serves ``handler`` on ``path`` (created 0600; a stale socket file is replaced). Thread-safe handler required."""

    daemon_threads = True
    request_queue_size = 512
    """listen() backlog: a burst of ranks connecting at once waits here instead of being refused."""

    def __init__(self, path: str, handler: Handler, *, max_clients: int = 256, idle_timeout: float = 600.0) -> None:
        self.handler = handler
        self.max_clients = max_clients
        self.idle_timeout = idle_timeout
        self._clients = 0
        self._clients_lock = threading.Lock()
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

    def admit(self) -> bool:
        """Count one more connection, or False when ``max_clients`` are open."""
        with self._clients_lock:
            if self._clients >= self.max_clients:
                return False
            self._clients += 1
            return True

    def leave(self) -> None:
        with self._clients_lock:
            self._clients -= 1

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
