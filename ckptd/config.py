"""Configuration of a Checkpointer: one keyword-only dataclass, validated."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields

from .errors import ConfigError


@dataclass(frozen=True, kw_only=True)
class CheckpointerConfig:
    """Options of :class:`ckptd.Checkpointer`; each may also be passed as a keyword."""

    keep_last: int = 3
    """Committed snapshots kept in the store; older ones are deleted after each commit."""
    keep_every: int | None = None
    """Also keep every snapshot whose step is divisible by this (milestones)."""
    overlap: bool = True
    """Copy parameters and optimizer state during the next forward/backward; turn off
    when the loop changes parameters outside ``optimizer.step()`` (EMA, manual edits)."""
    staging_budget: int | None = None
    """Most bytes of host staging memory; None bounds it by available host memory only."""
    memory_reserve: int = 1 << 30
    """Bytes of host memory staging always leaves free for the job."""
    on_error: str = "warn"
    """A failed snapshot at ``step()``: 'warn' (training goes on) or 'raise'."""
    incomplete_grace: float = 3600.0
    """Seconds before a snapshot without manifest counts as garbage (its writer is gone)."""
    gpus: int | None = None
    """GPUs the job uses, for the failure rate; None: the world size."""
    handle_sigterm: bool = True
    """On SIGTERM (a preemption notice), snapshot at the next step, wait for it to be
    durable within ``grace``, and exit 75; skipped if SIGTERM already has a handler."""
    grace: float = field(default_factory=lambda: float(os.environ.get("CKPTD_GRACE", "30")))
    """Seconds from SIGTERM to exit (default $CKPTD_GRACE or 30)."""
    local: str | None = None
    """Local tier of an object store (e.g. /dev/shm/ckptd or an NVMe path); None picks
    $CKPTD_LOCAL or a directory under the temp dir, one per job."""
    take_over: bool = field(default_factory=lambda: os.environ.get("CKPTD_TAKE_OVER") == "1")
    """Take the store's lease from the job holding it, once that job is gone (default: $CKPTD_TAKE_OVER=1,
    which ``ckptd run --take-over`` sets)."""
    lease_ttl: float = 60.0
    """Seconds without renewal after which another job may take the store's lease."""
    close_timeout: float = 600.0
    """Most seconds ``wait()``/``close()`` wait for snapshots to become durable before they say
    what is missing."""
    ranks_timeout: float = 600.0
    """Most seconds a snapshot waits in the object store for the other ranks' parts."""
    on_bad_snapshots: str = "raise"
    """``restore()`` when snapshots exist and none verifies: 'raise' NoGoodSnapshot, or
    'start_over' from step 0 (logged)."""

    def __post_init__(self) -> None:
        if not isinstance(self.keep_last, int) or self.keep_last < 1:
            raise ConfigError(f"keep_last={self.keep_last!r}: keep at least 1 snapshot")
        if self.on_error not in ("warn", "raise"):
            raise ConfigError(f"on_error={self.on_error!r}: use 'warn' or 'raise'")
        if self.staging_budget is not None and self.staging_budget <= 0:
            raise ConfigError(f"staging_budget={self.staging_budget!r}: give bytes > 0, or None")
        if self.incomplete_grace < 0:
            raise ConfigError(f"incomplete_grace={self.incomplete_grace!r}: must be >= 0 seconds")
        if not self.grace > 0:
            raise ConfigError(f"grace={self.grace!r}: must be > 0 seconds (check CKPTD_GRACE)")
        for name in ("lease_ttl", "close_timeout", "ranks_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name}={getattr(self, name)!r}: must be > 0 seconds")
        if self.on_bad_snapshots not in ("raise", "start_over"):
            raise ConfigError(f"on_bad_snapshots={self.on_bad_snapshots!r}: use 'raise' or 'start_over'")
        if self.gpus is not None and self.gpus < 1:
            raise ConfigError(f"gpus={self.gpus!r}: must be >= 1, or None for the world size")

    @classmethod
    def from_options(cls, options: dict) -> CheckpointerConfig:
        """Build from keywords; an unknown name is an error that lists the valid ones."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; Checkpointer accepts {sorted(names)}")
        return cls(**options)
