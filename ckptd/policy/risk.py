"""The job's failure rate: hardware (per GPU) plus job-level, learned from its own failures, × live risk.

The baseline is the hardware rate × GPUs plus a job-level rate that does
not grow with GPUs (software bugs, dependencies, a killed shell, a
preempted node): a small job dies mostly of the second. It is a Gamma
prior (worth ``prior_failures`` pseudo-failures); each failure the job
meets (a restart under ``ckptd run``, a fault the daemon sees) and each
hour without one update it (Gamma–Poisson), so a few failures move it and
none move it slowly. Health signals multiply it by factors that decay back
to 1 with a half-life; a source that still sees the condition raises it again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigError

LLAMA3_PER_GPU_HOUR = 19.7e-6
"""Unexpected interruptions per GPU-hour: Llama 3 405B, 419 in 21.2M GPU-hours (arXiv 2407.21783)."""

LLAMA3_JOB_PER_HOUR = 56 / (54 * 24.0)
"""Job-level interruptions per hour of the job, whatever its size: Llama 3 405B's software bugs and
dependency failures, 56 in its 54 days (about one a day; ``shared/data/llama3_interruptions.csv``)."""


@dataclass(frozen=True)
class RiskSignal:
    """A multiplier on the failure rate from a health signal, decaying to 1."""

    factor: float
    since: float
    half_life: float
    reason: str

    def value(self, now: float) -> float:
        age = max(0.0, now - self.since)
        return 1.0 + (self.factor - 1.0) * 0.5 ** (age / self.half_life)


@dataclass
class FailureRate:
    """Failures per second of the whole job. Not thread-safe; owned by one policy."""

    per_gpu_hour: float = LLAMA3_PER_GPU_HOUR
    job_per_hour: float = LLAMA3_JOB_PER_HOUR
    prior_failures: float = 5.0
    half_life: float = 600.0
    failures: int = 0
    hours: float = 0.0
    """Hours the job has run, weighted by the live risk."""
    signals: list[RiskSignal] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.per_gpu_hour >= 0 or not self.job_per_hour >= 0 or not self.per_gpu_hour + self.job_per_hour > 0:
            raise ConfigError(
                f"per_gpu_hour={self.per_gpu_hour!r}, job_per_hour={self.job_per_hour!r}: rates are >= 0 and not both 0"
            )
        if not self.prior_failures > 0:
            raise ConfigError(f"prior_failures={self.prior_failures!r}: the prior's weight must be > 0")
        if not self.half_life > 0:
            raise ConfigError(f"half_life={self.half_life!r}: must be > 0 seconds")

    def observe(self, seconds: float, gpus: int, now: float) -> None:
        """Account ``seconds`` of running, weighted by the live risk (``gpus`` is in the prior's rate).

        Weighting by risk means failures during a signalled degraded period
        are explained by the signal and do not inflate the baseline estimate.
        """
        self.hours += max(0.0, seconds) / 3600.0 * self.multiplier(now)

    def record_failure(self, count: int = 1) -> None:
        """The job met ``count`` more failures (restarts, faults)."""
        self.failures += count

    def raise_risk(self, factor: float, *, now: float, reason: str, half_life: float | None = None) -> None:
        """Add a signal; the same reason again refreshes it instead of compounding."""
        if not factor >= 1.0 or math.isinf(factor):
            raise ConfigError(f"risk factor {factor!r}: must be a finite number >= 1")
        same = [s for s in self.signals if s.reason == reason]
        if same and same[0].value(now) >= factor:
            return
        self.signals = [s for s in self.signals if s.reason != reason]
        self.signals.append(RiskSignal(factor, now, half_life or self.half_life, reason))

    def multiplier(self, now: float) -> float:
        """The live risk: the product of every signal's decayed factor."""
        self.signals = [s for s in self.signals if s.value(now) > 1.001]
        return math.prod(s.value(now) for s in self.signals) if self.signals else 1.0

    def prior_per_hour(self, gpus: int) -> float:
        """The baseline: hardware × GPUs plus the job-level rate, failures per hour."""
        return self.per_gpu_hour * gpus + self.job_per_hour

    def posterior_per_hour(self, gpus: int) -> float:
        """Posterior mean of the job's calm rate per hour (Gamma prior, Poisson counts)."""
        prior = self.prior_per_hour(gpus)
        return prior * (self.prior_failures + self.failures) / (self.prior_failures + prior * self.hours)

    def rate(self, gpus: int, now: float) -> float:
        """Failures per second of a job on ``gpus`` GPUs, now."""
        return self.posterior_per_hour(gpus) / 3600.0 * self.multiplier(now)
