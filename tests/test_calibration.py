"""Calibration: the fit fits, held-out anchors never reach it, calibrated hardware prices a
plan as the re-pricing says, and the presets carry (and can drop) the fitted factors."""

import dataclasses
import doctest

import numpy as np
import pytest

import autoshard
from autoshard.cost_model import calibration as cal
from autoshard.cost_model.compute import compute_time
from autoshard.cost_model.hardware import Efficiency, Hardware
from autoshard.models import mlp

TRUE = {"chip-a": Efficiency(0.6, 0.3, 0.4), "chip-b": Efficiency(0.8, 0.3, 0.4)}


def _observations(seed=0, n=5):
    """Anchors on two chips whose published MFU is what TRUE factors give, within 2%:
    each a few matmul-like and memory-bound operations and some communication."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(2 * n):
        chip = "chip-a" if i % 2 else "chip-b"
        ops = tuple(
            (float(rng.uniform(1e12, 5e12)), float(rng.uniform(1e8, 1e9))) for _ in range(4)
        ) + tuple((float(rng.uniform(1e8, 1e9)), float(rng.uniform(1e10, 4e10))) for _ in range(3))
        priced = cal.Priced(ops, float(rng.uniform(0.005, 0.02)), 1e15, 1e12)
        model_flops = 0.8 * sum(f for f, _ in ops)
        role = cal.HELD_OUT if i >= 2 * n - 2 else cal.FIT
        truth = cal.Observation(cal.Anchor(f"m{i}", chip, 8, 1.0, role, ""), priced, model_flops)
        mfu = truth.predicted_mfu(TRUE[chip]) * float(rng.uniform(0.98, 1.02))
        out.append(dataclasses.replace(truth, anchor=dataclasses.replace(truth.anchor, mfu=mfu)))
    return out


def test_fit_shrinks_residuals_and_predicts_held_out():
    obs = _observations()
    eff = cal.fit(obs)
    assert set(eff) == {"chip-a", "chip-b"}
    fit = [o for o in obs if o.anchor.role == cal.FIT]
    before = np.abs(cal.relative_errors(fit, {}))
    after = np.abs(cal.relative_errors(fit, eff))
    assert before.min() > 0.3  # spec-sheet speeds are far off
    assert after.max() < 0.05 and after.max() < before.min() / 5
    held = [o for o in obs if o.anchor.role == cal.HELD_OUT]
    assert np.abs(cal.relative_errors(held, eff)).max() < 0.05


def test_held_out_anchors_do_not_change_the_fit():
    obs = _observations()
    eff = cal.fit(obs)
    moved = [
        dataclasses.replace(o, anchor=dataclasses.replace(o.anchor, mfu=o.anchor.mfu * 3))
        if o.anchor.role == cal.HELD_OUT
        else o
        for o in obs
    ]
    assert cal.fit(moved) == eff
    # ...while moving a fitted anchor does change it
    first = next(i for i, o in enumerate(obs) if o.anchor.role == cal.FIT)
    o = obs[first]
    shifted = [*obs[:first], dataclasses.replace(o, anchor=dataclasses.replace(o.anchor, mfu=0.9))]
    assert cal.fit(shifted + obs[first + 1 :]) != eff


def test_fit_needs_a_fitted_anchor():
    held = [o for o in _observations() if o.anchor.role == cal.HELD_OUT]
    with pytest.raises(ValueError, match="FIT"):
        cal.fit(held)


def test_published_anchors_mark_the_8b_run_held_out():
    roles = {(a.name, a.preset): a.role for a in cal.ANCHORS}
    assert roles[("Llama 3.1 8B, seq 8192", "tpu-v6e")] == cal.HELD_OUT
    assert {cal.FIT, cal.HELD_OUT} == set(roles.values())


def test_calibrated_hardware_prices_a_plan_as_repricing_does(tmp_path):
    # every operation flops-bound and collectives nearly free: halving the achieved
    # flops doubles every strategy's cost, so the first plan stays optimal (ties aside),
    # and the calibrated Hardware's prediction is the re-priced one
    s = mlp.setup(mlp.tiny(), batch_size=64)
    base = Hardware(1e9, 1e15, 0.0, memory=2**30, memory_bandwidth=1e15, name="t")
    eff = Efficiency(flops=0.5)
    plans = [
        autoshard.parallelize(s.train_step, mesh=(8,), hardware=hw).plan(s.state, s.batch)
        for hw in (base, base.with_(efficiency=eff))
    ]
    assert any(tuple(e.spec) for e in plans[0].inputs)  # something is split
    priced = cal.Priced.from_cost(plans[0].cost, base)
    assert cal.step_time(priced, Efficiency()) == pytest.approx(plans[0].cost.time)
    plans[0].save(str(tmp_path / "plan.json"))  # a saved plan can be re-priced too
    loaded = autoshard.Plan.load(str(tmp_path / "plan.json"))
    assert cal.Priced.from_cost(loaded.cost, base) == priced
    # within 0.1%: the ILP objective also holds small tie-breaking terms
    assert cal.step_time(priced, eff) == pytest.approx(plans[1].cost.time, rel=1e-3)
    assert plans[1].cost.time > 1.9 * plans[0].cost.time


def test_efficiency_reaches_compute_and_collective_prices():
    hw = Hardware(1e12, (1e9, 2e9), (1e-5, 2e-5), memory_bandwidth=1e11)
    e = hw.with_(efficiency=Efficiency(0.5, 0.25, 0.5))
    assert compute_time(1e12, 0.0, e) == pytest.approx(2 * compute_time(1e12, 0.0, hw))
    assert compute_time(0.0, 1e11, e) == pytest.approx(0.25 * compute_time(0.0, 1e11, hw))
    assert e.axis_bandwidth(1) == pytest.approx(4e9) and e.axis_latency(1) == pytest.approx(1e-5)


def test_presets_carry_fitted_factors_and_can_drop_them():
    hw = autoshard.PRESETS["tpu-v6e"]
    assert not hw.efficiency.neutral
    assert hw.achieved_flops < hw.flops == 918e12
    assert hw.uncalibrated().efficiency.neutral
    assert autoshard.PRESETS["h100"].efficiency.neutral  # no published anchor fitted it
    with pytest.raises(ValueError, match="comm"):
        Efficiency(comm=0.0)
    with pytest.raises(ValueError, match="efficiency"):
        hw.with_(efficiency=0.5)


def test_maxtext_flops_match_the_published_tokens_per_second():
    # 45.46% of 918 TFLOP/s at 7,207 tokens/s/device (MaxText's Llama 3.1 8B on v6e)
    per_token = cal.maxtext_flops_per_token(32, 4096, 32, 8, 128, 14336, 128256, 8192)
    assert per_token * 7207 / 918e12 == pytest.approx(0.4546, rel=0.005)


def test_docstring_examples_run():
    assert doctest.testmod(cal).failed == 0
