"""RiskAwarePolicy: Daly's interval from measured cost and the live failure rate.

The cost is this job's measured stall (plus its storage money); the rate is
the hardware rate × GPUs plus a job-level rate (software, operator,
preemption), moved by the failures the job meets. A one-GPU job with a
sub-second stall therefore snapshots every few minutes.

Re-evaluated at every step, so a risk raise shortens the interval at once,
and when the work since the last snapshot already exceeds the new interval
the next step snapshots. Bounds: never below the persist time (one snapshot
waiting to persist at most) nor below the stall budget's interval (relaxed
by live risk), never above ``max_interval``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from .base import PolicyContext
from .cost import PriceTable, snapshot_cost
from .interval import expected_waste, optimal_interval
from .risk import LLAMA3_JOB_PER_HOUR, LLAMA3_PER_GPU_HOUR, FailureRate


@dataclass(kw_only=True, eq=False)
class RiskAwarePolicy:
    """The default policy. Not thread-safe: the hook calls it from the training thread."""

    fleet_rate: float = LLAMA3_PER_GPU_HOUR
    """Baseline hardware interruptions per GPU-hour (Llama 3: 19.7 per million)."""
    job_rate: float = LLAMA3_JOB_PER_HOUR
    """Baseline job-level interruptions per hour, whatever the GPU count: software, operator,
    preemption (Llama 3's software and dependency failures: about one a day). Add your spot
    market's preemption rate here."""
    prior_failures: float = 5.0
    """Weight of the baseline, in pseudo-failures, against the job's own failures."""
    risk_half_life: float = 600.0
    """Seconds for a health signal's extra risk to halve (sources re-raise while it lasts)."""
    stall_budget: float | None = 0.02
    """Largest fraction of training time spent stalled on snapshots at calm risk; None: no budget."""
    max_interval: float = 30 * 60.0
    """Longest time between snapshots, whatever the maths says (at most half an hour of work lost)."""
    restart: float = 120.0
    """Expected seconds to restart after a failure (for the waste estimate), until the ledger measured it."""
    gpu_hour_usd: float = 2.0
    """Price of one GPU-hour, to turn storage dollars into job seconds."""
    keep_last: int = 3
    """Snapshots retained, for the storage cost."""
    prices: PriceTable = field(default_factory=PriceTable)

    def __post_init__(self) -> None:
        if self.stall_budget is not None and not 0 < self.stall_budget < 1:
            raise ConfigError(f"stall_budget={self.stall_budget!r}: a fraction in (0, 1), or None")
        if not self.max_interval > 0:
            raise ConfigError(f"max_interval={self.max_interval!r}: must be > 0 seconds")
        if self.restart < 0 or self.gpu_hour_usd <= 0 or self.keep_last < 1:
            raise ConfigError("restart >= 0, gpu_hour_usd > 0 and keep_last >= 1 are required")
        self.rate = FailureRate(
            per_gpu_hour=self.fleet_rate,
            job_per_hour=self.job_rate,
            prior_failures=self.prior_failures,
            half_life=self.risk_half_life,
        )
        self._last_now: float | None = None
        self._last: dict[str, Any] = {}
        self._measured: dict[str, Any] = {}
        """Figures of earlier launches (the goodput ledger): used where this process has not measured yet."""

    # -- what the hook and the daemon call ---------------------------------

    def should_snapshot(self, *, ctx: PolicyContext) -> bool:
        if self._last_now is not None:
            self.rate.observe(ctx.now - self._last_now, ctx.gpus, ctx.now)
        self._last_now = ctx.now
        if ctx.steps_since is None:  # nothing measured yet: the first snapshot measures the cost
            self._last = {"reason": "first snapshot, to measure its cost"}
            return True
        decision = self.decide(ctx)
        return ctx.seconds_since is not None and ctx.seconds_since >= decision["interval"]

    def raise_risk(
        self, factor: float, *, reason: str, now: float | None = None, half_life: float | None = None
    ) -> None:
        """Multiply the failure rate by ``factor`` (decaying); the next step re-decides."""
        self.rate.raise_risk(factor, now=time.monotonic() if now is None else now, reason=reason, half_life=half_life)

    def record_failure(self, count: int = 1) -> None:
        """The job failed ``count`` more times (restarts, faults): the rate estimate moves up."""
        self.rate.record_failure(count)

    def record_hours(self, hours: float) -> None:
        """Hours the job ran before this process (earlier launches), calm, for the rate estimate."""
        self.rate.hours += max(0.0, hours)

    def use_measured(
        self, *, stall: float | None = None, restart: float | None = None, lost: float | None = None, source: str = ""
    ) -> None:
        """Figures the job measured before this process (its goodput ledger): the stall per snapshot,
        used until this process measures its own; restart and lost seconds per failure, which replace the
        ``restart`` default in the expected waste and are shown next to the model's."""
        for name, value in (("stall", stall), ("restart", restart), ("lost", lost)):
            if value is not None and not 0 <= value < float("inf"):
                raise ConfigError(f"measured {name}={value!r}: must be a finite number of seconds >= 0")
        self._measured = {"stall": stall, "restart": restart, "lost": lost, "source": source or "measured"}

    def explain(self) -> dict[str, Any]:
        """The inputs of the last decision and the interval they gave."""
        return dict(self._last)

    # -- the decision --------------------------------------------------------

    def decide(self, ctx: PolicyContext) -> dict[str, Any]:
        """The interval for ``ctx`` and everything it came from."""
        m = self._measured
        if ctx.stall is not None:
            stall, stall_from = ctx.stall, "this process"
        elif m.get("stall") is not None:
            stall, stall_from = m["stall"], m["source"]
        else:
            stall, stall_from = 0.0, "not measured yet"
        restart, restart_from = (
            (m["restart"], m["source"]) if m.get("restart") is not None else (self.restart, "default")
        )
        risk = self.rate.multiplier(ctx.now)
        rate = self.rate.rate(ctx.gpus, ctx.now)
        mtbf = 1.0 / rate
        guess = self._last.get("interval") or self.max_interval
        cost = snapshot_cost(
            stall=stall,
            nbytes=ctx.nbytes or 0,
            gpus=ctx.gpus,
            gpu_hour_usd=self.gpu_hour_usd,
            interval=guess,
            keep_last=self.keep_last,
            prices=self.prices,
        )
        daly = optimal_interval(cost.total, mtbf)  # Daly's model, solved exactly: monotone in cost and risk
        bounds = {
            "daly": daly,
            "persist": ctx.persist or 0.0,
            "stall budget": stall / self.stall_budget / risk if self.stall_budget and stall else 0.0,
        }
        binding = max(bounds, key=lambda name: bounds[name])
        interval = bounds[binding]
        if interval > self.max_interval:
            interval, binding = self.max_interval, "max interval"
        self._last = {
            "interval": interval,
            "bound": binding,
            "daly": daly,
            "cost_s": cost.total,
            "stall_s": stall,
            "stall_from": stall_from,
            "restart_s": restart,
            "restart_from": restart_from,
            "lost_s": m.get("lost"),
            "lost_from": m["source"] if m.get("lost") is not None else None,
            "money_s": cost.money_s,
            "dollars_per_snapshot": cost.dollars,
            "persist_s": ctx.persist,
            "mtbf_s": mtbf,
            "risk": risk,
            "failures": self.rate.failures,
            "gpus": ctx.gpus,
            "hardware_per_hour": self.rate.per_gpu_hour * ctx.gpus,
            "job_per_hour": self.rate.job_per_hour,
            "per_hour": self.rate.posterior_per_hour(ctx.gpus),
            "hours_seen": self.rate.hours,
            "signals": [s.reason for s in self.rate.signals],
            "expected_waste": expected_waste(max(interval, 1e-9), cost.total, mtbf, restart, ctx.persist or 0),
        }
        return self._last
