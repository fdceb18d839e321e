"""Checkpoint interval maths: Young (1974), Daly (2006), and the waste they minimise.

All functions take times in one unit of the caller's choosing (seconds,
hours...). ``interval`` means compute time between snapshots, not counting
the snapshot's own cost, as in Daly's paper.
"""

from __future__ import annotations

import math

from ..errors import ConfigError


def _check(cost: float, mtbf: float) -> None:
    if not (0 <= cost < math.inf) or not mtbf > 0:
        raise ConfigError(f"cost={cost!r} must be finite and >= 0, mtbf={mtbf!r} must be > 0")


def young_interval(cost: float, mtbf: float) -> float:
    """Young's first-order optimum, sqrt(2·C·M)."""
    _check(cost, mtbf)
    return math.sqrt(2.0 * cost * mtbf)


def daly_interval(cost: float, mtbf: float) -> float:
    """Daly's higher-order optimum; M itself once C >= 2M.

    sqrt(2CM)·[1 + ⅓·sqrt(C/2M) + (1/9)·(C/2M)] − C, for C < 2M.
    """
    _check(cost, mtbf)
    if cost >= 2.0 * mtbf:
        return mtbf
    r = cost / (2.0 * mtbf)
    return math.sqrt(2.0 * cost * mtbf) * (1.0 + math.sqrt(r) / 3.0 + r / 9.0) - cost


def optimal_interval(cost: float, mtbf: float) -> float:
    """The exact optimum of Daly's model (the interval ``expected_waste`` is least at): continuous and monotone.

    Daly's closed form is its expansion for small C/M and jumps at C = 2M
    (from 0.89·M to M), so a policy using it could lengthen the interval
    when the risk rises. With x = τ/M and c = C/M the optimum solves
    (1 − x)·eˣ = e⁻ᶜ on (0, 1); the left side falls monotonically there.
    """
    _check(cost, mtbf)
    if cost == 0:
        return 0.0
    c = cost / mtbf
    target = math.expm1(-c)  # (1 - x)e^x - 1 = e^-c - 1, both sides kept exact for small x and c
    lo, hi = 0.0, 1.0
    for _ in range(200):
        mid = (lo + hi) / 2
        if (1.0 - mid) * math.expm1(mid) - mid > target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-15 * hi:
            break
    return (lo + hi) / 2 * mtbf


def expected_waste(interval: float, cost: float, mtbf: float, restart: float = 0.0, persist: float = 0.0) -> float:
    """Expected fraction of wall time not spent on new work, under exponential failures.

    Daly's model: a segment of ``interval`` compute plus ``cost`` snapshot time
    is redone from its start when a failure hits it, and every failure also
    costs ``restart`` plus ``persist`` (the newest snapshot is not durable for
    that long, so a failure then falls back one snapshot further). Expected
    wall time per unit of work is M·e^((R+P)/M)·(e^((τ+C)/M) − 1)/τ.
    """
    _check(cost, mtbf)
    if not interval > 0:
        raise ConfigError(f"interval={interval!r} must be > 0")
    if restart < 0 or persist < 0:
        raise ConfigError("restart and persist must be >= 0")
    exponent = (interval + cost) / mtbf
    if exponent > 700 or (restart + persist) / mtbf > 700:  # the segment (or the restart) almost never completes
        return 1.0
    wall_per_work = mtbf * math.exp((restart + persist) / mtbf) * math.expm1(exponent) / interval
    return max(0.0, 1.0 - 1.0 / wall_per_work)
