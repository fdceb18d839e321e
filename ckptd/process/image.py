"""A CRIU dump as a snapshot like any other: manifest of kind "process", committed last (no torch).

CRIU writes its images straight into an attempt directory of the local tier
(``.attempts/step-N-<attempt>/``); each file is then checksummed, the part
record and the manifest are written, and the directory is renamed into
``step-N/``, never over one. From there the persist path (uploader, commit
protocol, retention) treats it as it treats a tensor snapshot of one rank.
``ProcessMeta.of`` is the gate every reader of an image's manifest passes:
restore and ``ckptd verify`` alike.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import socket
import stat
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from ..errors import SnapshotCorrupt, SnapshotExists, StoreError
from ..restore.find import snapshot_steps
from ..snapshot.dirs import LocalCommit, attempt_dir
from ..snapshot.manifest import MANIFEST, FileEntry, Manifest, require_kind, step_dir, utc_now
from ..snapshot.parts import PartRecord, part_name
from ..store.base import Store
from ..store.checksum import DEFAULT_ALGO, file_checksum
from ..store.file import FileStore, fsync_dir, rename_noreplace

DONE_KEY = ".ckptd/transparent-done.json"
"""Written when a transparent job completes: a later run of the same command starts it anew."""
log = logging.getLogger("ckptd")
_MAX_ARGS = 4096
_MAX_TEXT = 1 << 16


@dataclass(frozen=True, kw_only=True)
class ProcessMeta:
    """What a process image needs besides its files, kept in the manifest's ``meta``."""

    command: tuple[str, ...]
    """The job's command line; a store's images belong to one command."""
    criu: str
    """CRIU's version that dumped it, e.g. 4.2."""
    kernel: str
    """``uname -r`` of the machine it was dumped on (CRIU restores on the same or a newer kernel)."""
    stdio: tuple[int, ...]
    """Inodes of the pipes that were the job's stdout and stderr (``pipe:[INODE]`` in the image)."""
    tcp_established: bool = False
    """Connections between the job's own processes were dumped (restore needs ``--tcp-established``)."""
    driver: str = ""
    """The NVIDIA driver for a GPU job (its restore needs cuda-checkpoint and CRIU's CUDA plugin); '' if none."""

    def to_meta(self) -> dict[str, Any]:
        return {"process": {**asdict(self), "command": list(self.command), "stdio": list(self.stdio)}}

    @classmethod
    def of(cls, manifest: Manifest, *, source: str) -> ProcessMeta:
        """The gate: a process image's manifest, checked; IncompatibleSnapshot for a tensor snapshot,
        SnapshotCorrupt naming ``source`` for anything malformed."""
        require_kind(manifest, "process", source=source)
        raw = manifest.meta.get("process")
        try:
            if not isinstance(raw, dict):
                raise ValueError("no process section")
            command = raw["command"]
            if not (
                isinstance(command, list)
                and 0 < len(command) <= _MAX_ARGS
                and all(isinstance(a, str) and len(a) <= _MAX_TEXT for a in command)
            ):
                raise ValueError("command is not a list of strings")
            stdio = raw["stdio"]
            if not (isinstance(stdio, list) and len(stdio) <= 8 and all(_inode(i) for i in stdio)):
                raise ValueError("stdio is not a list of pipe inodes")
            meta = cls(
                command=tuple(command),
                criu=_text(raw["criu"], "criu"),
                kernel=_text(raw["kernel"], "kernel"),
                stdio=tuple(stdio),
                tcp_established=_flag(raw.get("tcp_established", False), "tcp_established"),
                driver=_text(raw.get("driver", ""), "driver"),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise SnapshotCorrupt(f"{source} is not a valid process image: {e}") from e
        if not any(f.name == "inventory.img" for f in manifest.files):
            raise SnapshotCorrupt(f"{source} lists no inventory.img: not a CRIU image")
        return meta


def _inode(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 < v < 1 << 64


def _text(v: Any, name: str) -> str:
    if not isinstance(v, str) or len(v) > 256:
        raise ValueError(f"{name} is not a short string")
    return v


def _flag(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise ValueError(f"{name} is not true or false")
    return v


def kernel() -> str:
    return platform.release()


def next_step(*stores: Store) -> int:
    """The number of the next image: one past every step in ``stores``, committed or not."""
    return 1 + max((max(snapshot_steps(s), default=-1) for s in stores), default=-1)


def start_attempt(local: FileStore, step: int) -> tuple[str, str]:
    """A fresh attempt directory for image ``step`` in the local tier: (attempt id, its path)."""
    attempt = uuid.uuid4().hex[:16]
    directory = local.path_of(attempt_dir(step, attempt))
    os.makedirs(directory)
    return attempt, directory


def commit(
    local: FileStore,
    directory: str,
    *,
    step: int,
    attempt: str,
    job: str,
    meta: ProcessMeta,
    metrics: dict[str, float],
    fence: Callable[[], None] | None = None,
) -> LocalCommit:
    """Checksum every file CRIU wrote into ``directory``, write the part record and the manifest, and
    rename it to ``step-N/``; on any failure the attempt directory is removed."""
    try:
        files = []
        for name in sorted(os.listdir(directory)):
            path = os.path.join(directory, name)
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise SnapshotCorrupt(f"CRIU left {path}, which is not a regular file; ckptd keeps flat images")
            value, size = file_checksum(path, DEFAULT_ALGO)
            files.append(FileEntry(name, size, value, 0))
        manifest = Manifest(
            step=step,
            created=utc_now(),
            world_size=1,
            host=socket.gethostname(),
            checksum=DEFAULT_ALGO,
            files=tuple(files),
            items=(),
            metrics=metrics,
            meta=meta.to_meta(),
            attempt=attempt,
            job=job,
            kind="process",
        )
        data = manifest.to_json()
        manifest = Manifest.from_json(data, source=f"manifest of image {step}")
        ProcessMeta.of(manifest, source=f"manifest of image {step}")
        _write_synced(os.path.join(directory, part_name(0)), PartRecord.of(manifest, data, 0).to_json())
        _write_synced(os.path.join(directory, MANIFEST), data)
        fsync_dir(directory)
        if fence is not None:
            fence()  # a run that lost the store's lease commits nothing
        final = local.path_of(step_dir(step))
        try:
            rename_noreplace(directory, final)
        except FileExistsError as e:
            raise SnapshotExists(f"{local.uri}/{step_dir(step)} is already committed; this image was discarded") from e
        fsync_dir(os.path.dirname(final))
    except BaseException:
        shutil.rmtree(directory, ignore_errors=True)
        raise
    return LocalCommit(manifest, data, final, True)


def mark_done(store: Store, step: int, *, job: str, command: tuple[str, ...]) -> None:
    """Record in ``store`` that the job completed after image ``step``; a failure is only logged."""
    body = {"step": step, "job": job, "command": list(command)}
    try:
        store.put_bytes(DONE_KEY, json.dumps(body).encode())
    except (StoreError, OSError) as e:
        log.warning("ckptd run: could not record that job %s completed (%s)", job, e)


def done_step(store: Store) -> int | None:
    """The image after which the job in ``store`` completed, None if it has not (or the record is bad)."""
    try:
        if not store.exists(DONE_KEY):
            return None
        raw = json.loads(store.get_bytes(DONE_KEY)[:4096])
    except (StoreError, OSError, ValueError):
        return None
    step = raw.get("step") if isinstance(raw, dict) else None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def link_images(directory: str, names: list[str], scratch: str) -> None:
    """Hard links of an image's files in ``scratch``: CRIU restores from there, and anything it writes
    goes there, never into the committed directory."""
    os.makedirs(scratch)
    for name in names:
        os.link(os.path.join(directory, name), os.path.join(scratch, name))


def _write_synced(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
