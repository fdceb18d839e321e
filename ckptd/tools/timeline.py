"""A PNG timeline of a store's snapshots: stall and write time, interval against risk, restarts."""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError, NoSnapshot, SnapshotCorrupt
from ..restore.find import read_manifest, snapshot_steps
from ..store.base import Store


def points(store: Store) -> list[dict[str, Any]]:
    """One row per committed snapshot, oldest first, from the manifests alone."""
    rows = []
    for step in sorted(snapshot_steps(store)):
        try:
            m = read_manifest(store, step)
        except (NoSnapshot, SnapshotCorrupt):
            continue
        policy = m.meta.get("policy") or {}
        rows.append(
            {
                "step": step,
                "created": m.created_at,
                "stall_s": m.meta.get("stall_s"),
                "write_s": m.meta.get("write_s"),
                "interval_s": policy.get("interval"),
                "risk": policy.get("risk"),
                "pid": m.meta.get("pid"),
                "nbytes": m.nbytes,
                "io": m.meta.get("io"),
            }
        )
    return rows


_IO_MARKERS = {"o_direct": ("s", "with O_DIRECT"), "buffered": ("^", "buffered"), "dcp": ("D", "by dcp.save")}
"""The write path a manifest records (``meta["io"]``): its marker and words in the timeline."""


def plot(store: Store, out: str) -> int:
    """Write the timeline to ``out``; returns the number of snapshots drawn."""
    rows = points(store)
    if not rows:
        raise NoSnapshot(f"{store.uri} holds no committed snapshot to plot")
    try:
        import matplotlib
    except ImportError as e:
        raise ConfigError("plots need matplotlib: pip install matplotlib (or ckptd[plot])") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r["created"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), dpi=120, sharex=True)
    top.plot(t, [r["stall_s"] or 0 for r in rows], "o-", ms=3, label="training stall (s)")
    top.plot(t, [r["write_s"] or 0 for r in rows], "-", color="C1", lw=1, label="write to local tier (s)")
    for (io, (marker, words)), color in zip(_IO_MARKERS.items(), ("C1", "C3", "C4")):
        at = [(r["created"], r["write_s"]) for r in rows if r["io"] == io and r["write_s"] is not None]
        if at:
            top.plot(*zip(*at), marker, color=color, ms=4, label=f"  written {words}")
    top.set_ylabel("seconds per snapshot")
    top.legend(fontsize=8)
    gaps = [None] + [(b["created"] - a["created"]).total_seconds() for a, b in zip(rows, rows[1:])]
    bottom.plot(t, gaps, "o-", ms=3, label="time since previous snapshot (s)")
    if any(r["interval_s"] is not None for r in rows):
        bottom.plot(t, [r["interval_s"] for r in rows], "--", label="policy interval (s)")
    bottom.set_ylabel("seconds")
    if any(r["risk"] is not None for r in rows):
        risk_ax = bottom.twinx()
        risk_ax.plot(t, [r["risk"] for r in rows], color="C3", alpha=0.6, label="risk (x baseline)")
        risk_ax.set_ylabel("risk", color="C3")
    restarts = [b["created"] for a, b in zip(rows, rows[1:]) if a["pid"] and b["pid"] and a["pid"] != b["pid"]]
    for i, when in enumerate(restarts):
        for ax in (top, bottom):
            ax.axvline(when, color="k", linestyle=":", label="restart (new process)" if i == 0 and ax is top else None)
    if restarts:
        top.legend(fontsize=8)
    bottom.legend(fontsize=8, loc="upper left")
    fig.suptitle(f"{store.uri}: {len(rows)} snapshots, steps {rows[0]['step']}–{rows[-1]['step']}")
    import matplotlib.dates as mdates

    locator = mdates.AutoDateLocator()
    bottom.xaxis.set_major_locator(locator)
    bottom.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return len(rows)
