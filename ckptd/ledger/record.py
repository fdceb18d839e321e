"""The goodput ledger's record format and its one gate (no torch, no I/O).

A ledger is a set of small objects ("pages") in the job's store, each written
once by one writer (the hook, ``ckptd run`` or the daemon) and never changed,
so it works on object stores where nothing can be appended to. A page is JSON::

    {"format": "ckptd-ledger/1", "job": "...", "source": "hook", "records": [{...}, ...]}

and each record one observation of its writer, with wall-clock times (Unix s)
``t0`` ≤ ``t1``:

======== ======= ============================================================
kind     source  what it says
======== ======= ============================================================
start    hook    its process was created at t0, a Checkpointer started at t1 (``gpus`` it uses)
restored hook    restore() returned ``step`` (-1: nothing to restore)
train    hook    steps ``step0``..``step1`` (``steps`` of them) completed in [t0, t1],
                 ``stall_s`` of it waiting for ``snapshots`` snapshots (``nbytes`` each)
close    hook    close(): from the last step until everything was durable
run      run     ``ckptd run`` started (its process's creation time)
launch   run     launch number ``attempt`` of the job
exit     run     the job ended with ``code``: last seen alive at t0, noticed at t1
run_end  run     ``ckptd run`` ended (``code``, ``note``: its outcome)
hang     daemon  no progress from t0 until the daemon declared a hang at t1
stop     daemon  the daemon stopped the job at t0 (``note``: why); it was gone at t1
energy   daemon  ``joules`` on ``gpus`` GPUs in [t0, t1]; ``estimate``: power limit × time
======== ======= ============================================================

Store bytes are hostile: :func:`parse_page` is the only way in, and it checks
sizes, types, finite numbers, bounds and that every field is known.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from typing import Any

from ..errors import LedgerCorrupt

FORMAT = "ckptd-ledger/1"
MAX_PAGE_BYTES = 256 << 10
"""Largest page a reader fetches or a writer writes."""
MAX_RECORDS = 1024
"""Records in one page at most."""
MAX_NOTE = 200
MAX_JOB = 128
_T_MIN, _T_MAX = 946_684_800.0, 4_102_444_800.0  # 2000-01-01 .. 2100-01-01
_MAX_SPAN = 366 * 24 * 3600.0
_MAX_INT = 2**53
_MAX_WATTS_PER_GPU = 1e5
"""A page claiming more than 100 kW per GPU is not a GPU's."""

SOURCES = ("hook", "run", "daemon")
KINDS: dict[str, tuple[str, frozenset[str]]] = {
    "start": ("hook", frozenset({"gpus"})),
    "restored": ("hook", frozenset({"step"})),
    "train": ("hook", frozenset({"step0", "step1", "steps", "stall_s", "snapshots", "nbytes"})),
    "close": ("hook", frozenset()),
    "run": ("run", frozenset()),
    "launch": ("run", frozenset({"attempt"})),
    "exit": ("run", frozenset({"attempt", "code", "note"})),
    "run_end": ("run", frozenset({"code", "note"})),
    "hang": ("daemon", frozenset({"note"})),
    "stop": ("daemon", frozenset({"note"})),
    "energy": ("daemon", frozenset({"joules", "gpus", "estimate"})),
}
"""Each kind's writer and the fields it may carry besides kind, pid, t0 and t1."""
_COMMON = frozenset({"kind", "pid", "t0", "t1"})
_JOB = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True, kw_only=True)
class Record:
    """One observation; fields a kind does not use keep their defaults."""

    kind: str
    pid: int
    t0: float
    t1: float
    step: int | None = None
    step0: int | None = None
    step1: int | None = None
    steps: int = 0
    snapshots: int = 0
    stall_s: float = 0.0
    nbytes: int = 0
    gpus: int = 0
    joules: float = 0.0
    estimate: bool = False
    attempt: int = 0
    code: int | None = None
    note: str = ""

    @property
    def seconds(self) -> float:
        return self.t1 - self.t0

    def to_dict(self) -> dict[str, Any]:
        """kind, pid, t0, t1 and the fields that differ from their defaults."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in _COMMON or value != f.default:
                out[f.name] = value
        return out


@dataclass(frozen=True)
class Page:
    """One ledger object: a writer's records of one job."""

    job: str
    source: str
    records: tuple[Record, ...]

    def to_json(self) -> bytes:
        data = json.dumps(
            {"format": FORMAT, "job": self.job, "source": self.source, "records": [r.to_dict() for r in self.records]},
            separators=(",", ":"),
            allow_nan=False,
        ).encode()
        if len(data) > MAX_PAGE_BYTES:
            raise LedgerCorrupt(f"a ledger page of {len(data)} bytes exceeds {MAX_PAGE_BYTES}; write fewer records")
        return data


def check_job(job: str) -> str:
    """A job id as it may appear in a ledger key: letters, digits, '.', '_', '-', at most 128."""
    if not isinstance(job, str) or not _JOB.match(job):
        raise LedgerCorrupt(f"job id {str(job)[:40]!r} is not a ledger job name (letters, digits, . _ -, <= 128)")
    return job


def job_name(job: str) -> str:
    """Any job id made into a ledger job name (other characters become '_')."""
    name = re.sub(r"[^A-Za-z0-9._-]", "_", job or "job")[:MAX_JOB]
    return name if name[0].isalnum() else "j" + name[: MAX_JOB - 1]


def parse_page(data: bytes, *, source: str) -> Page:
    """The only way store bytes become records: any defect raises LedgerCorrupt naming ``source``."""
    if len(data) > MAX_PAGE_BYTES:
        raise LedgerCorrupt(
            f"ledger object {source} is {len(data)} bytes, over {MAX_PAGE_BYTES}: not a page; remove it"
        )
    try:
        raw = json.loads(data, parse_constant=_no_constant)
        if not isinstance(raw, dict) or set(raw) != {"format", "job", "source", "records"}:
            raise ValueError("not a ledger page (format, job, source, records)")
        if raw["format"] != FORMAT:
            raise ValueError(f"format {str(raw['format'])[:40]!r} is not {FORMAT} (written by another ckptd version)")
        job = check_job(raw["job"])
        writer = raw["source"]
        if writer not in SOURCES:
            raise ValueError(f"source {str(writer)[:20]!r} is none of {SOURCES}")
        items = raw["records"]
        if not isinstance(items, list) or len(items) > MAX_RECORDS:
            raise ValueError(f"records must be a list of at most {MAX_RECORDS}")
        records = tuple(_record(item, writer) for item in items)
    except (ValueError, TypeError, LedgerCorrupt, RecursionError) as e:
        raise LedgerCorrupt(f"ledger object {source} is not valid: {e}; remove it (readers skip it)") from e
    return Page(job, writer, records)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number a ledger holds")


def _record(item: Any, writer: str) -> Record:
    if not isinstance(item, dict):
        raise ValueError("a record is an object")
    kind = item.get("kind")
    if kind not in KINDS:
        raise ValueError(f"unknown record kind {str(kind)[:20]!r}")
    source, allowed = KINDS[kind]
    if source != writer:
        raise ValueError(f"a {kind} record is the {source}'s, not the {writer}'s")
    unknown = set(item) - _COMMON - allowed
    if unknown or not _COMMON <= set(item):
        raise ValueError(f"{kind} record: unknown fields {sorted(unknown)[:5]} or missing kind/pid/t0/t1")
    t0, t1 = _time(item["t0"]), _time(item["t1"])
    if not t0 <= t1 <= t0 + _MAX_SPAN:
        raise ValueError(f"{kind} record: t1 {t1} before t0 {t0}, or spanning more than a year")
    values: dict[str, Any] = {"kind": kind, "pid": _int(item["pid"], "pid", 0, 2**31), "t0": t0, "t1": t1}
    for name in allowed & set(item):
        values[name] = _field(name, item[name])
    rec = Record(**values)
    _consistent(rec)
    return rec


def _field(name: str, v: Any) -> Any:
    if name in ("step", "step0", "step1"):
        return _int(v, name, -1, _MAX_INT)
    if name == "code":
        return _int(v, name, -255, 255)
    if name in ("steps", "snapshots", "nbytes", "gpus", "attempt"):
        return _int(v, name, 0, _MAX_INT)
    if name in ("stall_s", "joules"):
        return _float(v, name)
    if name == "estimate":
        if not isinstance(v, bool):
            raise ValueError("estimate must be true or false")
        return v
    if not isinstance(v, str) or len(v) > MAX_NOTE:  # note
        raise ValueError(f"note must be text of at most {MAX_NOTE} characters")
    return v


def _consistent(r: Record) -> None:
    """What one record must say of itself, whatever the others say."""
    if r.kind == "train":
        if r.step0 is None or r.step1 is None or not 0 <= r.step0 <= r.step1 or not 1 <= r.steps:
            raise ValueError(f"train record: steps {r.step0}..{r.step1} ({r.steps}) are not a range of >= 1 steps")
        if r.stall_s > r.seconds + 3600.0:
            raise ValueError(f"train record: {r.stall_s} s of stall in {r.seconds:.1f} s")
    if r.kind == "energy":
        if not 1 <= r.gpus <= 1 << 16 or r.joules > _MAX_WATTS_PER_GPU * r.gpus * max(r.seconds, 1.0):
            raise ValueError(f"energy record: {r.joules} J on {r.gpus} GPUs in {r.seconds:.1f} s")


def _time(v: Any) -> float:
    t = _float(v, "time")
    if not _T_MIN <= t <= _T_MAX:
        raise ValueError(f"time {t} is not between 2000 and 2100")
    return t


def _float(v: Any, name: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or v > 1e18:
        raise ValueError(f"{name} {str(v)[:30]} is not a finite number >= 0")
    return float(v)


def _int(v: Any, name: str, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"{name} {str(v)[:30]} is not an integer in [{lo}, {hi}]")
    return v


__all__ = ["FORMAT", "KINDS", "MAX_PAGE_BYTES", "MAX_RECORDS", "Page", "Record", "check_job", "job_name", "parse_page"]
