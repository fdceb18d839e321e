"""The one hook ⇄ daemon protocol: versioned JSON messages, 4-byte big-endian length prefix.

Never pickle. Every message is a JSON object with ``v`` (the version) and
``type``; a reply is ``{"v", "type": "reply", "ok", "error", "commands",
"durable"}``. Frames larger than MAX_FRAME are refused.
"""

from __future__ import annotations

import json
import math
import socket
import struct
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import ProtocolError

VERSION = 1
MAX_FRAME = 1 << 20
MAX_DEVICES = 1024
MAX_TEXT = 4096
"""Longest string field (a store URI, a path, a job id or an error) a message may carry."""
_HEADER = struct.Struct(">I")


@dataclass(frozen=True)
class Register:
    """A trainer process introduces itself; ``devices`` are the CUDA devices it uses (empty: all)."""

    pid: int
    rank: int = 0
    devices: tuple[int, ...] = ()
    store: str = ""
    local: str = ""
    """The job's local tier, so committed snapshots are promoted even if the job dies first."""
    job: str = ""
    """The job id (every rank of a job names the same one)."""
    world_size: int = 1
    type: str = "register"


@dataclass(frozen=True)
class Heartbeat:
    """Progress: the step just finished and the median step time in seconds."""

    pid: int
    step: int
    step_time: float | None = None
    type: str = "heartbeat"


@dataclass(frozen=True)
class Committed:
    """A snapshot was committed in the local tier at ``path``; the daemon uploads it."""

    pid: int
    step: int
    path: str
    type: str = "committed"


@dataclass(frozen=True)
class Status:
    """Ask for the daemon's view (``ckptd status``)."""

    type: str = "status"


@dataclass(frozen=True)
class Command:
    """Something the daemon asks a hook to do at its next heartbeat: snapshot_now, raise_risk or failures.

    ``failures`` carries in ``factor`` how many faults the daemon has stopped this job for. A hung job
    reads no replies, so stack dumps and stops go by signal (SIGUSR1, SIGTERM), not by command.
    """

    kind: str
    reason: str = ""
    factor: float = 1.0


@dataclass(frozen=True)
class Failure:
    """A snapshot the daemon could not commit, and why."""

    step: int
    error: str


@dataclass(frozen=True)
class Reply:
    ok: bool = True
    error: str = ""
    commands: tuple[Command, ...] = ()
    durable: tuple[int, ...] = ()
    failed: tuple[Failure, ...] = ()
    status: dict[str, Any] = field(default_factory=dict)
    type: str = "reply"


_TYPES = {c.__dataclass_fields__["type"].default: c for c in (Register, Heartbeat, Committed, Status, Reply)}
_COMMANDS = ("snapshot_now", "raise_risk", "failures")


def encode(msg: Any) -> bytes:
    body = json.dumps({"v": VERSION, **asdict(msg)}, separators=(",", ":"), allow_nan=False).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes is over the {MAX_FRAME}-byte limit")
    return _HEADER.pack(len(body)) + body


def decode(body: bytes) -> Any:
    """A message from one frame's body; ProtocolError for anything else."""
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"not JSON: {e}") from None
    if not isinstance(raw, dict):
        raise ProtocolError("a message is a JSON object")
    if raw.get("v") != VERSION:
        raise ProtocolError(f"protocol version {raw.get('v')!r}; this daemon speaks {VERSION}")
    cls = _TYPES.get(raw.get("type"))
    if cls is None:
        raise ProtocolError(f"unknown message type {raw.get('type')!r}")
    names = {f.name for f in fields(cls)}
    args = {k: v for k, v in raw.items() if k in names}
    try:
        msg = cls(**args)
    except TypeError as e:
        raise ProtocolError(f"{cls.__name__}: {e}") from None
    _check(msg)
    return msg


def _check(msg: Any) -> None:
    for f in fields(msg):
        value = getattr(msg, f.name)
        if f.name in ("pid", "rank", "step", "world_size") and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise ProtocolError(f"{type(msg).__name__}.{f.name} must be an integer >= 0")
        if f.name in ("pid", "rank", "step", "world_size") and value >= 1 << 62:
            raise ProtocolError(f"{type(msg).__name__}.{f.name} {value} is out of range")
        if f.name in ("store", "path", "error", "local", "job") and (
            not isinstance(value, str) or len(value) > MAX_TEXT
        ):
            raise ProtocolError(f"{type(msg).__name__}.{f.name} must be a string of at most {MAX_TEXT} characters")
    if isinstance(msg, Register):
        if (
            not isinstance(msg.devices, (list, tuple))
            or len(msg.devices) > MAX_DEVICES
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < MAX_DEVICES for d in msg.devices)
        ):
            raise ProtocolError(f"Register.devices must be a list of at most {MAX_DEVICES} device numbers")
        object.__setattr__(msg, "devices", tuple(msg.devices))
    if (
        isinstance(msg, Heartbeat)
        and msg.step_time is not None
        and (
            isinstance(msg.step_time, bool)
            or not isinstance(msg.step_time, (int, float))
            or not math.isfinite(msg.step_time)
            or msg.step_time < 0
        )
    ):
        raise ProtocolError("Heartbeat.step_time must be a finite number of seconds >= 0")
    if isinstance(msg, Reply):
        try:
            _check_reply(msg)
        except TypeError as e:
            raise ProtocolError(f"Reply: {e}") from None


def _check_reply(msg: Reply) -> None:
    cmds = tuple(Command(**c) if isinstance(c, dict) else c for c in msg.commands)
    if not all(isinstance(c, Command) and c.kind in _COMMANDS for c in cmds):
        raise ProtocolError("Reply.commands holds an unknown command")
    object.__setattr__(msg, "commands", cmds)
    object.__setattr__(msg, "durable", tuple(msg.durable))
    failed = tuple(Failure(**f) if isinstance(f, dict) else f for f in msg.failed)
    if not all(isinstance(f, Failure) and isinstance(f.step, int) and isinstance(f.error, str) for f in failed):
        raise ProtocolError("Reply.failed holds something other than (step, error)")
    object.__setattr__(msg, "failed", failed)


def read_frame(sock: socket.socket) -> bytes | None:
    """One frame's body, None at a clean end of stream; ProtocolError for a bad length."""
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    (length,) = _HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError(f"frame of {length} bytes is over the {MAX_FRAME}-byte limit")
    body = _recv_exact(sock, length)
    if body is None:
        raise ProtocolError("connection closed inside a frame")
    return body


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            if buf:
                raise ProtocolError("connection closed inside a frame")
            return None
        buf += chunk
    return bytes(buf)
