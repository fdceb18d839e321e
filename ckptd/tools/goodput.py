"""``ckptd goodput`` and the goodput lines of ``ckptd status``: a store's ledger accounted, as rows (no torch)."""

from __future__ import annotations

from typing import Any

from ..errors import CkptdError, NoSnapshot
from ..ledger.account import Account, AccountConfig, account
from ..ledger.book import LedgerReader
from ..ledger.causes import CAUSES
from ..store.base import Store


def read_account(
    store: Store, job: str | None, config: AccountConfig, *, bundle: bool = False
) -> tuple[Account, list[str], list[str]]:
    """The account of ``job`` (default: every job of the store), the ledger pages skipped (with why), and notes.

    ``bundle``: then bundle each job's loose pages where there are many, so the next read is a few requests;
    the notes say what that did, or why it could not.
    """
    reader = LedgerReader(store)
    ledger = reader.read(job)
    records = ledger.records(job)
    if not records:
        where = f"job {job} in {store.uri}" if job else store.uri
        raise NoSnapshot(
            f"{where} has no goodput ledger (.ckptd/ledger/); jobs write one from this version on"
            + (f"; jobs in it: {', '.join(sorted(ledger.jobs))}" if ledger.jobs else "")
        )
    acc = account(records, config)
    notes: list[str] = []
    if bundle:
        try:
            for name, done in reader.bundle().items():
                notes.append(f"bundled {done.pages} ledger pages of job {name} into {done.bundles} object(s)")
        except (CkptdError, OSError) as e:
            notes.append(f"could not bundle the ledger's pages ({e}); --no-bundle skips it")
    return acc, ledger.problems, notes


def headline(f: dict[str, Any]) -> str:
    held = f["held_s"]
    return (
        f"goodput {f['goodput_ratio'] * 100:.1f}% of the {_dur(held)} the job held {f['gpus']} GPU(s); "
        f"wall {_dur(f['wall_s'])}, {f['launches']} launch(es), {len(f['failures'])} failure(s), "
        f"{f['snapshots']} snapshots"
    )


def cause_rows(f: dict[str, Any]) -> list[list[str]]:
    """cause, seconds, share of wall, GPU-hours, dollars, kWh; then the total."""
    wall = f["wall_s"] or 1.0
    rows = []
    for c in CAUSES:
        rows.append(
            [
                c,
                f"{f['seconds'][c]:.1f}",
                f"{f['seconds'][c] / wall * 100:.1f}%",
                f"{f['gpu_hours'][c]:.4f}",
                f"{f['dollars'][c]:.4f}",
                f"{f['energy_j'][c] / 3.6e6:.5f}",
            ]
        )
    rows.append(
        [
            "total",
            f"{sum(f['seconds'].values()):.1f}",
            "100.0%",
            f"{sum(f['gpu_hours'].values()):.4f}",
            f"{sum(f['dollars'].values()):.4f}",
            f"{sum(f['energy_j'].values()) / 3.6e6:.5f}",
        ]
    )
    return rows


def money_line(f: dict[str, Any]) -> str:
    badput = sum(f["dollars"][c] for c in f["badput_s"])
    return (
        f"money: ${sum(f['dollars'].values()):.4f} of GPU time at ${f['gpu_hour_usd']:g}/GPU-h, "
        f"${badput:.4f} of it badput; ${f['storage_usd']:.5f} of snapshot storage and requests"
    )


def energy_line(f: dict[str, Any]) -> str:
    total = f["energy_measured_j"] + f["energy_estimated_j"]
    how = "; ".join(f["energy_how"]) or "none"
    return (
        f"energy {total / 3.6e6:.4f} kWh ({f['energy_measured_j'] / 3.6e6:.4f} measured, "
        f"{f['energy_estimated_j'] / 3.6e6:.4f} estimated): {how}"
    )


def failure_rows(f: dict[str, Any]) -> list[list[str]]:
    """#, cause, lost s, steps lost (lost s over the median step time), restart s, hang s."""
    return [
        [
            str(i),
            x["cause"],
            f"{x['lost_s']:.1f}",
            "-" if x["steps_lost"] is None else f"{x['steps_lost']:.1f}",
            f"{x['restart_s']:.1f}",
            f"{x['hang_s']:.1f}",
        ]
        for i, x in enumerate(f["failures"], 1)
    ]


def _dur(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"
