"""The job's failure rate: fleet baseline × GPUs, learned from its own failures, × live risk.

The baseline is a Gamma prior on the per-GPU rate (worth ``prior_failures``
pseudo-failures); each observed failure and each GPU-hour without one
update it (Gamma–Poisson), so a few failures move it and none move it
slowly. Health signals multiply it by factors that decay back to 1 with a
half-life; a source that still sees the condition raises it again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import ConfigError

LLAMA3_PER_GPU_HOUR = 19.7e-6
"""Unexpected interruptions per GPU-hour: Llama 3 405B, 419 in 21.2M GPU-hours (arXiv 2407.21783)."""


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
    prior_failures: float = 5.0
    half_life: float = 600.0
    failures: int = 0
    gpu_hours: float = 0.0
    signals: list[RiskSignal] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.per_gpu_hour > 0:
            raise ConfigError(f"per_gpu_hour={self.per_gpu_hour!r}: the fleet failure rate must be > 0")
        if not self.prior_failures > 0:
            raise ConfigError(f"prior_failures={self.prior_failures!r}: the prior's weight must be > 0")
        if not self.half_life > 0:
            raise ConfigError(f"half_life={self.half_life!r}: must be > 0 seconds")

    def observe(self, seconds: float, gpus: int, now: float) -> None:
        """Account ``seconds`` of running on ``gpus`` GPUs, weighted by the live risk.

        Weighting by risk means failures during a signalled degraded period
        are explained by the signal and do not inflate the baseline estimate.
        """
        self.gpu_hours += max(0.0, seconds) * gpus / 3600.0 * self.multiplier(now)

    def record_failure(self) -> None:
        self.failures += 1

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

    def per_gpu_posterior(self) -> float:
        """Posterior mean of the per-GPU-hour rate (Gamma prior, Poisson counts)."""
        alpha = self.prior_failures + self.failures
        beta = self.prior_failures / self.per_gpu_hour + self.gpu_hours
        return alpha / beta

    def rate(self, gpus: int, now: float) -> float:
        """Failures per second of a job on ``gpus`` GPUs, now."""
        return self.per_gpu_posterior() * gpus / 3600.0 * self.multiplier(now)
