"""A PNG of an account: each moment's cause on a timeline, and the seconds by cause stacked over time (matplotlib, lazily)."""

from __future__ import annotations

from ..errors import ConfigError
from .account import Account
from .causes import CAUSES

COLORS = {
    "productive": "#2ca02c",
    "stall": "#ff7f0e",
    "lost": "#d62728",
    "restart": "#9467bd",
    "hang": "#8c564b",
    "paused": "#c7c7c7",
    "startup": "#1f77b4",
}


def plot_goodput(acc: Account, path: str, *, title: str = "") -> None:
    try:
        import matplotlib
    except ImportError as e:
        raise ConfigError("plots need matplotlib: pip install matplotlib (or ckptd[plot])") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scale, unit = (60.0, "minutes") if acc.wall_s > 600 else (1.0, "seconds")
    x = lambda t: (t - acc.start) / scale  # noqa: E731
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(9, 4.8), dpi=100, sharex=True, gridspec_kw={"height_ratios": [1, 3]}
    )
    for cause in CAUSES:
        spans = [(x(s.t0), x(s.t1) - x(s.t0)) for s in acc.segments if s.cause == cause]
        if spans:
            top.broken_barh(spans, (0, 1), color=COLORS[cause])
    for f in acc.failures:
        for ax in (top, bottom):
            ax.axvline(x(f.at), color="k", linestyle=":", linewidth=1)
    top.set_yticks([])
    top.set_title(
        f"{title}: goodput {acc.goodput_ratio * 100:.1f}% of {acc.held_s / scale:.1f} {unit} held, "
        f"{len(acc.failures)} failure(s) (dotted)",
        fontsize=10,
    )
    times, stacks = _cumulative(acc, scale)
    present = [c for c in CAUSES if stacks[c][-1] > 0]
    bottom.stackplot(
        times,
        [stacks[c] for c in present],
        labels=[f"{c} {acc.seconds[c] / scale:.1f}" for c in present],
        colors=[COLORS[c] for c in present],
    )
    bottom.set_xlabel(f"{unit} since the job started")
    bottom.set_ylabel(f"cumulative {unit}")
    bottom.legend(fontsize=8, loc="upper left")
    bottom.set_xlim(0, acc.wall_s / scale)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _cumulative(acc: Account, scale: float) -> tuple[list[float], dict[str, list[float]]]:
    """Seconds by cause so far, at every segment boundary."""
    totals = {c: 0.0 for c in CAUSES}
    times = [0.0]
    stacks: dict[str, list[float]] = {c: [0.0] for c in CAUSES}
    for s in acc.segments:
        totals[s.cause] += (s.t1 - s.t0) / scale
        times.append((s.t1 - acc.start) / scale)
        for c in CAUSES:
            stacks[c].append(totals[c])
    return times, stacks
