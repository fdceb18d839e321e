"""Policy maths and the adaptive policy: properties, the exact optimum, simulation, the hook."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

import ckptd
from ckptd.errors import ConfigError
from ckptd.policy import (
    EverySteps,
    PolicyContext,
    RiskAwarePolicy,
    daly_interval,
    expected_waste,
    optimal_interval,
    parse_policy,
    snapshot_cost,
    young_interval,
)
from ckptd.policy.simulate import Scenario, simulate

PROPS = settings(max_examples=150, deadline=None)


def exact_optimum(cost: float, mtbf: float) -> float:
    """Minimiser of Daly's exponential waste model, by golden-section search on a log scale."""
    f = lambda log_tau: math.expm1((math.exp(log_tau) + cost) / mtbf) / math.exp(log_tau)  # noqa: E731
    a, b = math.log(mtbf) - 30, math.log(mtbf) + 2
    g = (math.sqrt(5) - 1) / 2
    for _ in range(200):
        c, d = b - g * (b - a), a + g * (b - a)
        if f(c) < f(d):
            b = d
        else:
            a = c
    return math.exp((a + b) / 2)


def ctx(**kw) -> PolicyContext:
    base = dict(
        step=100,
        now=1000.0,
        steps_since=10,
        seconds_since=10.0,
        step_time=1.0,
        stall=20.0,
        persist=90.0,
        in_flight=0,
        gpus=1024,
        nbytes=10**10,
    )
    return PolicyContext(**{**base, **kw})


@PROPS
@given(st.floats(1e-6, 0.1))
def test_daly_interval_is_within_a_tenth_of_a_percent_of_the_exact_optimum(ratio):
    mtbf = 3600.0
    cost = ratio * mtbf
    assert daly_interval(cost, mtbf) == pytest.approx(exact_optimum(cost, mtbf), rel=1e-3)


@PROPS
@given(st.floats(1e-6, 1.5))
def test_daly_waste_is_within_a_tenth_of_a_percent_of_the_optimal_waste(ratio):
    mtbf, cost = 3600.0, ratio * 3600.0
    best = expected_waste(exact_optimum(cost, mtbf), cost, mtbf)
    assert expected_waste(daly_interval(cost, mtbf), cost, mtbf) <= best * 1.001 + 1e-12


def test_daly_branch_for_large_cost_and_young():
    assert daly_interval(10.0, 4.0) == 4.0
    assert young_interval(2.0, 100.0) == pytest.approx(20.0)
    with pytest.raises(ConfigError):
        daly_interval(-1.0, 10.0)


@PROPS
@given(st.floats(1e-6, 50.0))
def test_the_exact_optimum_is_the_least_waste_and_monotone_through_daly_s_jump(ratio):
    mtbf, cost = 3600.0, ratio * 3600.0
    best = optimal_interval(cost, mtbf)
    assert best == pytest.approx(exact_optimum(cost, mtbf), rel=1e-6)
    assert optimal_interval(cost * 1.01, mtbf) >= best
    assert optimal_interval(cost, mtbf / 1.01) <= best <= mtbf


def test_the_policy_interval_does_not_jump_where_daly_s_closed_form_does():
    before, after = optimal_interval(1.999, 1.0), optimal_interval(2.001, 1.0)
    assert daly_interval(2.001, 1.0) - daly_interval(1.999, 1.0) > 0.1  # the closed form's jump at C = 2M
    assert 0 < after - before < 1e-3


@PROPS
@given(st.floats(1.0, 100.0), st.floats(1.0, 50.0), st.integers(1, 16384), st.integers(1, 16))
@example(stall=1.0, risk=1.125, gpus=3, more=1)  # found by hypothesis: Daly's jump lengthened the interval
def test_interval_shrinks_with_risk_and_gpus_and_grows_with_cost(stall, risk, gpus, more):
    def interval(**kw):
        p = RiskAwarePolicy(stall_budget=None, max_interval=1e9)
        if kw.pop("risk", 1.0) > 1.0:
            p.raise_risk(risk, reason="test", now=1000.0)
        return p.decide(ctx(**{"persist": 0.0, "stall": stall, "gpus": gpus, **kw}))["interval"]

    base = interval()
    assert interval(risk=risk) <= base
    assert interval(gpus=gpus * more) <= base
    assert interval(stall=stall * 2) >= base


@PROPS
@given(st.floats(0.0, 500.0), st.floats(0.0, 3600.0), st.floats(1.0, 1000.0), st.integers(1, 100000))
def test_bounds_always_hold(stall, persist, risk, gpus):
    p = RiskAwarePolicy(max_interval=7200.0)
    if risk > 1:
        p.raise_risk(risk, reason="test", now=1000.0)
    d = p.decide(ctx(stall=stall, persist=persist, gpus=gpus))
    assert d["interval"] <= 7200.0
    assert d["interval"] >= min(persist, 7200.0)
    if stall:
        assert d["interval"] >= min(stall / 0.02 / d["risk"], 7200.0) - 1e-9


def test_risk_decays_and_a_failure_moves_the_rate():
    p = RiskAwarePolicy()
    p.raise_risk(16.0, reason="ecc", now=0.0)
    assert p.rate.multiplier(0.0) == pytest.approx(16.0)
    assert p.rate.multiplier(600.0) == pytest.approx(8.5)
    p.raise_risk(16.0, reason="ecc", now=600.0)  # the same source again refreshes, not compounds
    assert p.rate.multiplier(600.0) == pytest.approx(16.0)
    before = p.rate.posterior_per_hour(8)
    p.record_failure()
    assert p.rate.posterior_per_hour(8) == pytest.approx(before * 6 / 5)


def test_explain_names_the_bound_of_the_last_decision():
    p = RiskAwarePolicy()
    assert p.should_snapshot(ctx=ctx(steps_since=None))  # first snapshot measures the cost
    assert not p.should_snapshot(ctx=ctx(seconds_since=5.0))
    e = p.explain()
    assert e["bound"] in ("daly", "persist", "stall budget", "max interval") and e["interval"] > 5


def test_simulation_is_reproducible_for_a_seed():
    sc = Scenario(gpus=4096, hours=48, kind="weibull")
    a, b = simulate(sc, seeds=3), simulate(sc, seeds=3)
    assert [r.waste for r in a] == [r.waste for r in b]
    trace = Scenario(gpus=1, hours=10, kind="trace", trace_hours=(1.0, 2.5, 7.0))
    rows = simulate(trace, seeds=2)
    assert all(r.restart > 0 for r in rows)


def test_parse_policy_specs():
    assert parse_policy("every:50").n == 50
    assert parse_policy("every:10m").seconds == 600
    with pytest.raises(ConfigError):
        parse_policy("every:1.5")


def test_checkpointer_default_policy_snapshots_sooner_after_a_risk_raise(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ck = ckptd.Checkpointer(str(tmp_path), model=model, optimizer=opt, gpus=8)
    assert isinstance(ck.policy, RiskAwarePolicy)

    done = [0]

    def run(steps: int, pause: float = 0.0) -> list[bool]:
        out = []
        for _ in range(steps):
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            opt.zero_grad()
            out.append(ck.step(done[0]))
            done[0] += 1
            ck.wait()
            time.sleep(pause)
        return out

    assert run(1) == [True]  # the first snapshot measures the cost
    assert not any(run(20, pause=0.01))  # calm: 8 GPUs, the interval is longer than these 20 steps
    calm = ck.policy.explain()["interval"]
    assert calm > 10  # tens of seconds for a millisecond stall: cheap snapshots are taken often, not every step
    ck.policy.raise_risk(1e6, reason="XID 63 on GPU 0")
    t0 = time.monotonic()
    took = run(200, pause=0.01)
    assert True in took, "a risk raise must bring the next snapshot within seconds"
    assert time.monotonic() - t0 < 10
    assert ck.policy.explain()["interval"] < calm / 100
    ck.close()


def test_policy_cli_prints_interval_and_sources():
    out = subprocess.run(
        [sys.executable, "-m", "ckptd.cli", "policy", "--gpus", "1024", "--stall", "20s", "--persist", "90s"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "snapshot every" in out and "Llama 3" in out and "expected" in out


def test_one_gpu_with_a_sub_second_stall_snapshots_every_few_minutes():
    p = RiskAwarePolicy()
    assert p.max_interval <= 1800
    d = p.decide(ctx(stall=0.4, persist=3.0, gpus=1, nbytes=1 << 30))
    assert 60 <= d["interval"] <= 600 and d["bound"] == "daly"
    assert d["job_per_hour"] > 100 * d["hardware_per_hour"]  # a small job dies of other things than its GPU
    slow = RiskAwarePolicy().decide(ctx(stall=30.0, persist=3.0, gpus=1, nbytes=1 << 30))
    assert slow["interval"] > 2 * d["interval"]  # an expensive snapshot is taken rarely
    late = RiskAwarePolicy().decide(ctx(stall=0.4, persist=900.0, gpus=1, nbytes=1 << 30))
    assert late["interval"] == 900.0 and late["bound"] == "persist"


def test_failures_and_hours_move_the_job_rate():
    calm, failing = RiskAwarePolicy(), RiskAwarePolicy()
    calm.record_hours(1000.0)
    failing.record_failure(10)
    args = dict(stall=0.4, persist=3.0, gpus=1, nbytes=1 << 30)
    base = RiskAwarePolicy().decide(ctx(**args))["interval"]
    assert calm.decide(ctx(**args))["interval"] > base > failing.decide(ctx(**args))["interval"]


def test_policy_cli_explains_rates_and_costs_in_one_table():
    out = subprocess.run(
        [sys.executable, "-m", "ckptd.cli", "policy"], capture_output=True, text=True, check=True
    ).stdout
    assert "min" in out.splitlines()[0] and "max interval" in out
    for word in ("hardware", "job-level", "failures seen", "stall", "money", "Daly", "persist", "max interval"):
        assert word in out
    d = json.loads(
        subprocess.run(
            [sys.executable, "-m", "ckptd.cli", "policy", "--failures", "5", "--json"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert d["failures"] == 5 and d["interval"] < 600


def test_simulator_compares_the_default_with_lightning_and_hf():
    from ckptd.policy import LLAMA3_JOB_PER_HOUR
    from ckptd.policy.simulate import against_frameworks

    sc = Scenario(
        gpus=1, job_per_hour=LLAMA3_JOB_PER_HOUR, stall=0.3, persist=5.0, restart=60.0, step_time=0.5, hours=24 * 14
    )
    rows = {r.name.split(" (")[0]: r for r in against_frameworks(sc, sync_stall=2.0, epoch_steps=10000, seeds=4)}
    assert set(rows) == {"Lightning per epoch", "HF Trainer every 500 steps", "ckptd before", "ckptd default policy"}
    assert rows["ckptd default policy"].waste < min(r.waste for n, r in rows.items() if n != "ckptd default policy")


def test_every_steps_snapshots_after_each_nth_finished_step_and_not_the_first():
    policy = EverySteps(3)
    taken = [s for s in range(9) if policy.should_snapshot(ctx=ctx(step=s, steps_since=None if s == 0 else 1))]
    assert taken == [2, 5, 8]


def test_snapshot_cost_counts_one_put_per_part_of_the_s3_store():
    from ckptd.store.s3 import S3Config

    nbytes = 640 << 20
    parts = nbytes // S3Config().part_size + 2
    default = snapshot_cost(stall=1.0, nbytes=nbytes, gpus=8, gpu_hour_usd=2.0, interval=600.0)
    counted = snapshot_cost(stall=1.0, nbytes=nbytes, gpus=8, gpu_hour_usd=2.0, interval=600.0, requests=parts)
    assert default.dollars == counted.dollars
