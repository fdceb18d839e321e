"""Part records: one rank's share of a snapshot, the first phase of the commit (no torch).

A part record lists the files one rank wrote (names, sizes, checksums) and
names the attempt and the manifest they belong to. In an object store a
snapshot may be committed only when the part record of every rank is there
and every object it lists has the listed size; the records are therefore
parsed as hostile input, through :meth:`PartRecord.from_json` only.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

from ..errors import SnapshotCorrupt
from .manifest import FileEntry, Manifest, attempt_prefix, check_attempt

PART_FORMAT = "ckptd-part/1"
MAX_PART_BYTES = 4 << 20


def part_name(rank: int) -> str:
    """The file name of rank ``rank``'s part record inside an attempt."""
    return f"part-{rank:05d}.json"


def part_key(step: int, attempt: str, rank: int) -> str:
    """The object-store key of rank ``rank``'s part record of one attempt."""
    return f"{attempt_prefix(step, attempt)}/{part_name(rank)}"


def manifest_digest(data: bytes) -> str:
    """SHA-256 of the manifest bytes a part record belongs to."""
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True)
class PartRecord:
    """What one rank wrote of one attempt of one snapshot."""

    step: int
    attempt: str
    rank: int
    world_size: int
    job: str
    manifest: str
    """SHA-256 of the manifest bytes, so parts of another manifest never complete this one."""
    files: tuple[FileEntry, ...]
    format: str = PART_FORMAT

    @classmethod
    def of(cls, manifest: Manifest, data: bytes, rank: int) -> PartRecord:
        """Rank ``rank``'s record of ``manifest`` (deterministic: any uploader builds the same bytes)."""
        return cls(
            manifest.step,
            manifest.attempt,
            rank,
            manifest.world_size,
            manifest.job,
            manifest_digest(data),
            manifest.files_of(rank),
        )

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()

    @staticmethod
    def from_json(data: bytes, *, source: str) -> PartRecord:
        """Parse and validate one record; any defect raises SnapshotCorrupt naming ``source``."""
        if len(data) > MAX_PART_BYTES:
            raise SnapshotCorrupt(f"{source} is {len(data)} bytes, larger than any real part record")
        try:
            raw = json.loads(data)
            if not isinstance(raw, dict) or raw.get("format") != PART_FORMAT:
                raise ValueError(f"not a {PART_FORMAT} record")
            files = tuple(_entry(f) for f in raw["files"])
            rec = PartRecord(
                step=_nonneg(raw["step"], "step"),
                attempt=check_attempt(raw["attempt"]),
                rank=_nonneg(raw["rank"], "rank"),
                world_size=_nonneg(raw["world_size"], "world_size"),
                job=str(raw["job"])[:256],
                manifest=str(raw["manifest"]),
                files=files,
            )
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise SnapshotCorrupt(f"{source} is not a valid part record: {e}") from e
        if not rec.rank < rec.world_size or any(f.rank != rec.rank for f in files):
            raise SnapshotCorrupt(f"{source}: rank {rec.rank} of world size {rec.world_size} lists other ranks' files")
        return rec

    def mismatch(self, manifest: Manifest, data: bytes) -> str | None:
        """Why this record does not belong to ``manifest``, or None when it does."""
        if (self.step, self.attempt, self.world_size) != (manifest.step, manifest.attempt, manifest.world_size):
            return (
                f"belongs to step {self.step}, attempt {self.attempt}, world size {self.world_size}; "
                f"the snapshot is step {manifest.step}, attempt {manifest.attempt}, "
                f"world size {manifest.world_size}"
            )
        if self.manifest != manifest_digest(data):
            return "belongs to another manifest"
        if set(self.files) != set(manifest.files_of(self.rank)):
            return "lists other files than the manifest"
        return None


def _entry(f: dict) -> FileEntry:
    name = f["name"]
    if not isinstance(name, str) or "/" in name or name in ("", ".", ".."):
        raise ValueError(f"file name {name!r}")
    return FileEntry(name, _nonneg(f["size"], "size"), str(f["checksum"]), _nonneg(f["rank"], "rank"))


def _nonneg(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"{name} {v!r} is not an integer >= 0")
    return v
