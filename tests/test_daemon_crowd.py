"""The daemon under a crowd: bursts of ranks, floods of idle clients, hostile messages, foreign pids.

Each costs one clear error reply, never a dead handler, a silent fall back or a signal sent to a stranger.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from test_daemon import DaemonProc

from ckptd.daemon.client import DaemonLink, open_socket, status_of
from ckptd.daemon.protocol import Heartbeat, Register, decode, encode, read_frame


@pytest.fixture
def daemon():
    d = DaemonProc(args=("--max-clients", "16", "--idle-timeout", "1"))
    yield d
    d.stop()


def raw(d: DaemonProc, body: bytes, *, registered: bool = False) -> dict:
    """Send one frame with ``body`` as it is (after registering this process, if asked); the reply as a dict."""
    with open_socket(d.socket) as s:
        if registered:
            s.sendall(encode(Register(pid=os.getpid(), job="hostile")))
            assert decode(read_frame(s)).ok
        s.sendall(struct.pack(">I", len(body)) + body)
        return json.loads(read_frame(s))


def threads_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(next(line.split()[1] for line in f if line.startswith("Threads:")))


def test_a_burst_of_64_ranks_all_get_through(tmp_path):
    d = DaemonProc()
    try:
        start = threading.Barrier(64)
        got: list = []

        def rank(r: int) -> None:
            start.wait()
            try:
                got.append(status_of(d.socket)["pid"])
            except Exception as e:  # noqa: BLE001 - the test reports every failure
                got.append(repr(e))

        workers = [threading.Thread(target=rank, args=(r,)) for r in range(64)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=60)
        assert got == [d.proc.pid] * 64, [g for g in got if g != d.proc.pid][:3]
    finally:
        d.stop()


@pytest.mark.parametrize(
    "body",
    [
        b'{"v":1,"type":"heartbeat","pid":%d,"step":3,"step_time":NaN}',
        b'{"v":1,"type":"heartbeat","pid":%d,"step":3,"step_time":Infinity}',
        b'{"v":1,"type":"register","pid":%d,"devices":[' + b",".join([b"7"] * 200_000) + b"]}",
        b'{"v":1,"type":"register","pid":%d,"job":"' + b"j" * 100_000 + b'"}',
        b'{"v":1,"type":"heartbeat","pid":%d,"step":100000000000000000000000}',
        b'{"v":1,"type":"committed","pid":%d,"step":1,"path":["not","a","string"]}',
    ],
    ids=["nan step time", "infinite step time", "200k devices", "100 kB job id", "huge step", "path not a string"],
)
def test_a_hostile_message_gets_an_error_reply_and_status_still_works(daemon, body):
    reply = raw(daemon, body.replace(b"%d", str(os.getpid()).encode()), registered=True)
    assert reply["ok"] is False and reply["error"], reply
    assert status_of(daemon.socket)["pid"] == daemon.proc.pid, "every later status must still work"
    assert "Traceback" not in daemon.output()


def test_a_flood_of_idle_clients_is_bounded_and_times_out(daemon):
    idle = [open_socket(daemon.socket) for _ in range(40)]
    try:
        time.sleep(0.3)
        assert threads_of(daemon.proc.pid) < 16 + 10, "a thread per idle client beyond the bound"
        extra = open_socket(daemon.socket)
        extra.sendall(encode(Heartbeat(pid=os.getpid(), step=1)))
        body = read_frame(extra)
        extra.close()
        assert body is not None and "at most 16 connections" in decode(body).error
        time.sleep(1.5)  # the idle timeout closes them
        assert status_of(daemon.socket)["pid"] == daemon.proc.pid
        assert idle[0].recv(1) == b"", "an idle connection is closed by the daemon"
    finally:
        for s in idle:
            s.close()


def test_a_foreign_pid_is_refused_and_a_child_is_accepted(daemon):
    stranger = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        reply = raw(daemon, encode(Register(pid=1))[4:])
        assert reply["ok"] is False and "neither this connection's process" in reply["error"]
        # a child of the connecting process (this test) is its own: ckptd run registers for its job
        reply = raw(daemon, encode(Register(pid=stranger.pid))[4:])
        assert reply["ok"] is True, reply
    finally:
        stranger.kill()
        stranger.wait()
    code = (
        "import socket,struct,json,sys;from ckptd.daemon.protocol import Register,encode,read_frame;"
        f"s=socket.socket(socket.AF_UNIX);s.connect({daemon.socket!r});"
        f"s.sendall(encode(Register(pid={os.getpid()})));print(json.loads(read_frame(s))['ok'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "False", "a child may not register its parent"


def test_a_hook_whose_idle_connection_was_closed_reconnects(daemon):
    link = DaemonLink.connect(daemon.socket, job="idle")
    assert link is not None
    try:
        time.sleep(1.5)  # past the idle timeout: the daemon closed the connection
        reply = link.heartbeat(5, 0.1, force=True)
        assert reply is not None and reply.ok
        jobs = status_of(daemon.socket)["jobs"]
        assert [(j["pid"], j["step"]) for j in jobs] == [(os.getpid(), 5)], "the same job, registered again"
    finally:
        link.close()


def test_a_rank_that_cannot_use_an_existing_socket_says_so(tmp_path):
    path = str(tmp_path / "dead.sock")
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)  # a socket file nobody listens on: a daemon that died
    s.close()
    with pytest.warns(RuntimeWarning, match="running in embedded mode"):
        assert DaemonLink.connect(path) is None
