"""What a job's process tree holds that decides whether CRIU can snapshot it, read from /proc (no torch).

A TCP connection whose peer is outside the tree (another host, or a server on this one) cannot be
restored: CRIU would need the peer's cooperation, which a multi-node torch.distributed or NCCL job's
peers never give. Connections between two processes of the tree are restored with
``--tcp-established``. A process holding ``/dev/nvidia*`` makes it a GPU job.
"""

from __future__ import annotations

import ipaddress
import os
import sys
from dataclasses import dataclass

_LISTEN, _CLOSE = 0x0A, 0x07
_STATES = {
    0x01: "ESTABLISHED",
    0x02: "SYN_SENT",
    0x03: "SYN_RECV",
    0x04: "FIN_WAIT1",
    0x05: "FIN_WAIT2",
    0x06: "TIME_WAIT",
    0x08: "CLOSE_WAIT",
    0x09: "LAST_ACK",
    0x0B: "CLOSING",
}


@dataclass(frozen=True)
class Connection:
    """One connected TCP socket of the tree."""

    pid: int
    local: tuple[str, int]
    remote: tuple[str, int]
    state: str

    def describe(self) -> str:
        return f"pid {self.pid} has a TCP connection ({self.state}) to {_endpoint(self.remote)}"


@dataclass(frozen=True)
class TreeView:
    """The job's processes and what in them matters to CRIU."""

    pids: tuple[int, ...]
    outside: tuple[Connection, ...]
    """Connections whose peer is not a process of the tree: such a job cannot be restored."""
    inside: bool
    """Connections between processes of the tree: dumped and restored with ``--tcp-established``."""
    gpu: bool
    """A process holds an NVIDIA device open: a CUDA job."""


def tree(root: int, proc: str = "/proc") -> list[int]:
    """``root`` and every descendant, parents first; [] if ``root`` is gone."""
    if not os.path.exists(f"{proc}/{root}"):
        return []
    children: dict[int, list[int]] = {}
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        try:
            with open(f"{proc}/{name}/stat", "rb") as f:
                stat = f.read()
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop(0)
        out.append(pid)
        todo.extend(sorted(children.get(pid, [])))
    return out


def look(root: int, proc: str = "/proc") -> TreeView:
    """The tree under ``root`` now (the job keeps running: a later look may differ)."""
    pids = tree(root, proc)
    owner: dict[int, int] = {}
    gpu = False
    for pid in pids:
        for target in _fd_targets(pid, proc):
            if target.startswith("socket:["):
                owner.setdefault(int(target[8:-1]), pid)
            elif target.startswith("/dev/nvidia"):
                gpu = True
    sockets = _tcp_sockets(pids[0], proc) if pids else {}
    mine = {ino: sockets[ino] for ino in owner if ino in sockets}
    ends = {(loc, rem) for loc, rem, _ in mine.values()}
    outside, inside = [], False
    for ino, (loc, rem, state) in sorted(mine.items()):
        if state in (_LISTEN, _CLOSE):
            continue
        if (rem, loc) in ends:
            inside = True
        else:
            outside.append(Connection(owner[ino], loc, rem, _STATES.get(state, hex(state))))
    return TreeView(tuple(pids), tuple(outside), inside, gpu)


def _fd_targets(pid: int, proc: str) -> list[str]:
    out: list[str] = []
    try:
        names = os.listdir(f"{proc}/{pid}/fd")
    except OSError:
        return out
    for name in names:
        try:
            out.append(os.readlink(f"{proc}/{pid}/fd/{name}"))
        except OSError:
            continue
    return out


def _tcp_sockets(pid: int, proc: str) -> dict[int, tuple[tuple[str, int], tuple[str, int], int]]:
    """inode → (local, remote, state) of every TCP socket in ``pid``'s network namespace."""
    out = {}
    for table, v6 in (("tcp", False), ("tcp6", True)):
        try:
            with open(f"{proc}/{pid}/net/{table}") as f:
                lines = f.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            cols = line.split()
            if len(cols) < 10:
                continue
            try:
                out[int(cols[9])] = (_address(cols[1], v6), _address(cols[2], v6), int(cols[3], 16))
            except ValueError:
                continue
    return out


def _address(text: str, v6: bool) -> tuple[str, int]:
    """('10.0.0.5', 29500) from /proc/net/tcp's '0500000A:733C' (each 32-bit word in host order)."""
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    if sys.byteorder == "little":
        raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    addr = ipaddress.IPv6Address(raw) if v6 else ipaddress.IPv4Address(raw)
    return str(addr), int(port, 16)


def _endpoint(addr: tuple[str, int]) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
