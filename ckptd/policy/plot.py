"""A PNG of simulated waste against a fixed interval, with each policy marked (matplotlib, lazily)."""

from __future__ import annotations

from collections.abc import Sequence

from .simulate import Row, Scenario, waste_curve


def plot_waste(sc: Scenario, rows: Sequence[Row], path: str, *, seeds: int = 10) -> None:
    try:
        import matplotlib
    except ImportError as e:
        from ..errors import ConfigError

        raise ConfigError("plots need matplotlib: pip install matplotlib (or ckptd[plot])") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .interval import daly_interval

    top = 8 * daly_interval(sc.stall, sc.mtbf)
    intervals = [x for x in (30.0 * 1.15**k for k in range(80)) if x <= top]
    curve = waste_curve(sc, intervals, seeds=seeds)
    styles = iter(["--", ":", "-."])
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    ax.plot([i / 60 for i in intervals], [w * 100 for w in curve], color="0.3", label="fixed interval")
    for r in rows:
        if r.interval.endswith(" s"):
            ax.scatter(float(r.interval[:-2]) / 60, r.waste * 100, zorder=3, s=30, label=r.name)
        else:
            ax.axhline(
                r.waste * 100,
                linestyle=next(styles, "--"),
                linewidth=1.2,
                color="C3",
                label=f"{r.name} (interval varies)",
            )
    ax.set_xscale("log")
    ax.set_ylim(0, min(100.0, 3 * min(curve) * 100))
    ax.set_xlabel("interval between snapshots (minutes, log scale)")
    ax.set_ylabel("wasted wall time (%)")
    ax.set_title(f"{sc.kind} failures, {sc.gpus} GPUs, job MTBF {sc.mtbf / 3600:.1f} h, stall {sc.stall:.0f} s")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper center")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
