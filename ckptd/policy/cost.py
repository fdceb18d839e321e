"""What a snapshot costs, in seconds of the job's time: its stall plus its money.

Money (requests, transfer, retained storage) is converted into GPU-seconds
at the job's $/GPU-hour, so it adds to the stall in one unit.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError

_GB = 1e9
_MONTH_S = 30 * 24 * 3600.0


@dataclass(frozen=True, kw_only=True)
class PriceTable:
    """Object-store prices; defaults are AWS S3 Standard list prices (us-east-1, 2024)."""

    storage_gb_month: float = 0.023
    """Dollars per GB-month stored."""
    put_per_1000: float = 0.005
    """Dollars per 1,000 PUT/COPY/POST/LIST requests."""
    get_per_1000: float = 0.0004
    """Dollars per 1,000 GET requests."""
    transfer_in_gb: float = 0.0
    """Dollars per GB uploaded (free into S3)."""

    def __post_init__(self) -> None:
        for name in ("storage_gb_month", "put_per_1000", "get_per_1000", "transfer_in_gb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"PriceTable.{name} must be >= 0")


@dataclass(frozen=True, kw_only=True)
class SnapshotCost:
    """The cost of one snapshot to the job, in seconds of job time."""

    stall: float
    """Seconds training waited."""
    money_s: float
    """Dollars of the snapshot, converted to seconds of the whole job's GPU time."""
    dollars: float
    """The same money in dollars."""

    @property
    def total(self) -> float:
        return self.stall + self.money_s


def snapshot_cost(
    *,
    stall: float,
    nbytes: float,
    gpus: int,
    gpu_hour_usd: float,
    interval: float,
    keep_last: int = 3,
    requests: int | None = None,
    prices: PriceTable = PriceTable(),
    part_bytes: int = 8 << 20,
) -> SnapshotCost:
    """Stall plus money of one snapshot of ``nbytes`` taken every ``interval`` seconds.

    Retention holds ``keep_last`` snapshots, so each one is stored for about
    ``keep_last × interval``; requests default to one PUT per ``part_bytes`` (the S3 store's part size,
    ``S3Config.part_size``) plus two (the part record and the manifest).
    """
    if stall < 0 or nbytes < 0 or gpus < 1 or gpu_hour_usd <= 0 or interval <= 0 or keep_last < 1:
        raise ConfigError("snapshot_cost: stall, nbytes >= 0; gpus, keep_last >= 1; price and interval > 0")
    parts = requests if requests is not None else max(1, int(nbytes // part_bytes) + 2)
    gb = nbytes / _GB
    dollars = (
        parts * prices.put_per_1000 / 1000.0
        + gb * prices.transfer_in_gb
        + gb * prices.storage_gb_month * keep_last * interval / _MONTH_S
    )
    job_dollars_per_s = gpus * gpu_hour_usd / 3600.0
    return SnapshotCost(stall=stall, money_s=dollars / job_dollars_per_s, dollars=dollars)
