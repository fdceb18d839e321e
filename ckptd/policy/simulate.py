"""A seeded discrete-event simulation of training under failures, for comparing policies.

Each run replays one failure timeline (exponential, Weibull, calm/degraded
bursts, or a trace) against every policy, so the comparison is paired.
Waste is split into snapshot stalls, rework (work lost to failures) and
restarts; a snapshot protects work only once it is durable (``persist``
seconds after its stall).
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import ConfigError
from .adaptive import RiskAwarePolicy
from .base import PolicyContext
from .interval import daly_interval, young_interval

_EVAL_EVERY = 300.0


@dataclass(frozen=True, kw_only=True)
class Scenario:
    """A job and the failures it meets; times in seconds unless named in hours."""

    gpus: int = 1024
    per_gpu_hour: float = 19.7e-6
    """Calm hardware failure rate per GPU-hour."""
    job_per_hour: float = 0.0
    """Calm job-level failure rate per hour, whatever the GPU count (software, operator, preemption)."""
    hours: float = 24 * 7
    stall: float = 20.0
    persist: float = 90.0
    restart: float = 120.0
    step_time: float = 1.0
    gpu_hour_usd: float = 2.0
    dollars_per_snapshot: float = 0.0
    kind: str = "exponential"
    """exponential, weibull, bursty or trace."""
    weibull_shape: float = 0.75
    burst_factor: float = 20.0
    burst_hours: float = 2.0
    bursts_per_day: float = 1.0
    trace_hours: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in ("exponential", "weibull", "bursty", "trace"):
            raise ConfigError(f"Scenario.kind={self.kind!r}: exponential, weibull, bursty or trace")
        if (
            self.gpus < 1
            or self.per_gpu_hour < 0
            or self.job_per_hour < 0
            or self.hours <= 0
            or self.stall < 0
            or self.persist < 0
            or not self.per_gpu_hour + self.job_per_hour > 0
        ):
            raise ConfigError(
                "Scenario: gpus >= 1, failure rates >= 0 and not both 0, hours > 0, stall and persist >= 0"
            )

    @property
    def mtbf(self) -> float:
        """Calm job MTBF in seconds."""
        return 3600.0 / (self.per_gpu_hour * self.gpus + self.job_per_hour)


@dataclass
class Timeline:
    """Failure times and degraded periods (start, end), in seconds."""

    failures: list[float]
    degraded: list[tuple[float, float]] = field(default_factory=list)

    def risk(self, t: float, factor: float) -> float:
        return factor if any(a <= t < b for a, b in self.degraded) else 1.0


def timeline(sc: Scenario, seed: int) -> Timeline:
    """The failures one seed gives; the same for every policy."""
    rng = random.Random(seed)
    horizon, m = sc.hours * 3600.0, sc.mtbf
    if sc.kind == "trace":
        return Timeline(sorted(h * 3600.0 for h in sc.trace_hours if 0 <= h * 3600.0 < horizon))
    if sc.kind == "weibull":
        scale = m / math.gamma(1.0 + 1.0 / sc.weibull_shape)
        out, t = [], 0.0
        while (t := t + rng.weibullvariate(scale, sc.weibull_shape)) < horizon:
            out.append(t)
        return Timeline(out)
    degraded = []
    if sc.kind == "bursty":
        t = 0.0
        while (t := t + rng.expovariate(sc.bursts_per_day / 86400.0)) < horizon:
            degraded.append((t, min(horizon, t + sc.burst_hours * 3600.0)))
    tl = Timeline([], degraded)
    top = sc.burst_factor if degraded else 1.0
    t = 0.0
    while (t := t + rng.expovariate(top / m)) < horizon:  # thinning of the time-varying hazard
        if rng.random() < tl.risk(t, sc.burst_factor) / top:
            tl.failures.append(t)
    return tl


@dataclass
class Result:
    """One policy on one timeline."""

    waste: float
    stall: float
    rework: float
    restart: float
    snapshots: int
    losses: list[float]
    dollars_per_useful_gpu_hour: float


Interval = Callable[[float, float, "Sim | None"], float]
"""(time, risk, sim) -> seconds of compute between snapshots."""


class Sim:
    """Runs one policy over one timeline. Not thread-safe."""

    def __init__(self, sc: Scenario, tl: Timeline, interval: Interval, on_failure: Callable[[], None] = lambda: None):
        self.sc, self.tl, self.interval, self.on_failure = sc, tl, interval, on_failure

    def run(self) -> Result:
        sc, horizon = self.sc, self.sc.hours * 3600.0
        t = progress = durable = since = 0.0
        pending: list[tuple[float, float]] = []
        stall = rework = restart = 0.0
        losses: list[float] = []
        snaps = 0
        failures = iter(self.tl.failures + [math.inf])
        nf = next(failures)
        while t < horizon:
            every = self.interval(t, self.tl.risk(t, sc.burst_factor), self)
            step = min(max(0.0, every - since), nf - t, _EVAL_EVERY, horizon - t)
            t, progress, since = t + step, progress + step, since + step
            durable = max([durable] + [p for d, p in pending if d <= t])
            pending = [(d, p) for d, p in pending if d > t]
            if t >= nf or (since >= every and t + sc.stall > nf):  # a failure, maybe during the stall
                if since >= every:
                    stall, t = stall + (nf - t), nf
                losses.append(progress - durable)
                rework += progress - durable
                progress, since, pending = durable, 0.0, []
                t += sc.restart
                restart += sc.restart
                self.on_failure()
                while nf <= t:
                    nf = next(failures)
                continue
            if since >= every and t < horizon:
                t += sc.stall
                stall += sc.stall
                snaps += 1
                pending.append((t + sc.persist, progress))
                since = 0.0
        useful_h = max(progress, 1e-9) / 3600.0
        dollars = horizon / 3600.0 * sc.gpus * sc.gpu_hour_usd + snaps * sc.dollars_per_snapshot
        return Result(
            1.0 - progress / horizon,
            stall / horizon,
            rework / horizon,
            restart / horizon,
            snaps,
            losses,
            dollars / (useful_h * sc.gpus),
        )


def fixed(seconds: float) -> Interval:
    return lambda t, risk, sim: seconds


def adaptive(
    sc: Scenario, budget: float | None = 0.02, max_interval: float | None = None
) -> tuple[Interval, Callable[[], None]]:
    """The real RiskAwarePolicy, told of degraded periods as the daemon would tell it."""
    policy = RiskAwarePolicy(
        fleet_rate=sc.per_gpu_hour,
        job_rate=sc.job_per_hour,
        restart=sc.restart,
        stall_budget=budget,
    )
    if max_interval is not None:
        policy.max_interval = max_interval
    last = [0.0]

    def interval(t: float, risk: float, sim: Sim | None) -> float:
        if risk > 1.0:
            policy.raise_risk(risk, reason="degraded GPU", now=t)
        policy.rate.observe(t - last[0], sc.gpus, t)
        last[0] = t
        ctx = PolicyContext(
            step=int(t / sc.step_time),
            now=t,
            steps_since=1,
            seconds_since=0.0,
            step_time=sc.step_time,
            stall=sc.stall,
            persist=sc.persist,
            in_flight=0,
            gpus=sc.gpus,
        )
        return policy.decide(ctx)["interval"]

    return interval, policy.record_failure


@dataclass
class Row:
    """A policy's results over all seeds: means and 95% confidence half-widths."""

    name: str
    interval: str
    waste: float
    waste_ci: float
    stall: float
    rework: float
    restart: float
    dollars: float
    loss_mean_s: float
    loss_p95_s: float


def _row(name: str, interval: str, results: Sequence[Result]) -> Row:
    w = [r.waste for r in results]
    ci = 1.96 * statistics.stdev(w) / math.sqrt(len(w)) if len(w) > 1 else 0.0
    losses = sorted(x for r in results for x in r.losses)
    p95 = losses[min(len(losses) - 1, int(0.95 * len(losses)))] if losses else 0.0
    mean = statistics.fmean
    return Row(
        name,
        interval,
        mean(w),
        ci,
        mean(r.stall for r in results),
        mean(r.rework for r in results),
        mean(r.restart for r in results),
        mean(r.dollars_per_useful_gpu_hour for r in results),
        mean(losses) if losses else 0.0,
        p95,
    )


def simulate(
    sc: Scenario, *, seeds: int = 20, every_steps: int = 1000, budget: float = 0.02, grid: Sequence[float] | None = None
) -> list[Row]:
    """Compare fixed, Young, Daly, CheckFreq-style, adaptive and the best fixed interval in hindsight."""
    tls = [timeline(sc, seed) for seed in range(seeds)]
    c, m = sc.stall, sc.mtbf
    statics = {
        f"every {every_steps} steps": every_steps * sc.step_time,
        "Young (static)": young_interval(c, m),
        "Daly (static)": daly_interval(c, m),
        f"CheckFreq-style {budget:.0%} budget": c / budget,
    }
    rows = [_row(name, f"{sec:.0f} s", [Sim(sc, tl, fixed(sec)).run() for tl in tls]) for name, sec in statics.items()]
    for label, b in ((f"adaptive, {budget:.0%} stall budget", budget), ("adaptive, no stall budget", None)):
        runs = []
        for tl in tls:
            interval, on_failure = adaptive(sc, b)
            runs.append(Sim(sc, tl, interval, on_failure).run())
        rows.append(_row(label, "varies", runs))
    grid = grid or [60.0 * 1.15**k for k in range(60)]
    best = min(grid, key=lambda sec: statistics.fmean(Sim(sc, tl, fixed(sec)).run().waste for tl in tls))
    rows.append(_row("best fixed (hindsight)", f"{best:.0f} s", [Sim(sc, tl, fixed(best)).run() for tl in tls]))
    return rows


def against_frameworks(sc: Scenario, *, sync_stall: float, epoch_steps: int, seeds: int = 20) -> list[Row]:
    """ckptd's default policy against the frameworks' defaults on the same failures.

    Lightning's ModelCheckpoint saves at every epoch's end and the HF Trainer
    every 500 steps; both save synchronously, so each save stalls the job
    ``sync_stall`` seconds, where ckptd's overlapped snapshot stalls
    ``sc.stall``. "ckptd before" is the policy that counted hardware only
    (its interval ends at the old 6 h bound for a small job).
    """
    from dataclasses import replace

    tls = [timeline(sc, seed) for seed in range(seeds)]
    sync = replace(sc, stall=sync_stall)
    rows = []
    for name, seconds in (
        (f"Lightning per epoch ({epoch_steps} steps)", epoch_steps * sc.step_time),
        ("HF Trainer every 500 steps", 500 * sc.step_time),
    ):
        rows.append(_row(name, f"{seconds:.0f} s", [Sim(sync, tl, fixed(seconds)).run() for tl in tls]))
    hw_only = replace(sc, job_per_hour=0.0) if sc.per_gpu_hour > 0 else sc
    old, _ = adaptive(hw_only, 0.02, max_interval=6 * 3600.0)
    before = old(0.0, 1.0, None)
    rows.append(
        _row("ckptd before (hardware only)", f"{before:.0f} s", [Sim(sc, tl, fixed(before)).run() for tl in tls])
    )
    runs, first = [], None
    for tl in tls:
        interval, on_failure = adaptive(sc, 0.02)
        first = first or interval(0.0, 1.0, None)
        runs.append(Sim(sc, tl, interval, on_failure).run())
    rows.append(_row("ckptd default policy", f"{first:.0f} s at first", runs))
    return rows


def waste_curve(sc: Scenario, intervals: Sequence[float], *, seeds: int = 10) -> list[float]:
    """Mean simulated waste of each fixed interval (for the plot)."""
    tls = [timeline(sc, seed) for seed in range(seeds)]
    return [statistics.fmean(Sim(sc, tl, fixed(sec)).run().waste for tl in tls) for sec in intervals]
