"""Textbook plans: found by the ILP, visible in the compiled HLO, predicted exactly."""

from util import assert_prediction_matches, compiled_vs_predicted, spec_of

import autoshard
from autoshard.models import mlp

# CPU-like numbers; XLA's CPU backend does not form reduce-scatters.
CPU = autoshard.Hardware(
    flops=5e10, bandwidth=5e9, latency=2e-5, memory_bandwidth=2e10, reduce_scatter=False
)


def test_large_batch_small_mlp_is_data_parallel():
    s = mlp.setup(mlp.MLPConfig(32, 64, 2), batch_size=4096)
    step = autoshard.parallelize(s.train_step, mesh=(8,), hardware=CPU)
    plan = step.plan(s.state, s.batch)
    for i in range(2):
        assert spec_of(plan, f"[{i}]['w1']['kernel']") == ()
        assert spec_of(plan, f"[{i}]['w2']['kernel']") == ()
    assert spec_of(plan, "batch['x']") == ("x",)
    compiled, _ = compiled_vs_predicted(step, s.state, s.batch)
    assert compiled["all-reduce"][0] == 1  # one fused gradient all-reduce
    assert set(compiled) == {"all-reduce"}
    assert_prediction_matches(step, s.state, s.batch)


def test_small_batch_wide_mlp_is_megatron():
    s = mlp.setup(mlp.MLPConfig(64, 2048, 2), batch_size=8)
    step = autoshard.parallelize(s.train_step, mesh=(8,), hardware=CPU)
    plan = step.plan(s.state, s.batch)
    for i in range(2):
        assert spec_of(plan, f"[{i}]['w1']['kernel']") == (None, "x")  # column parallel
        assert spec_of(plan, f"[{i}]['w2']['kernel']") == ("x",)  # row parallel
    compiled, _ = compiled_vs_predicted(step, s.state, s.batch)
    # one activation all-reduce per block forward, one for the gradient flowing
    # back into block 0; no gradient all-reduce (weights are not replicated).
    assert compiled == {"all-reduce": (3, 3 * 8 * 64 * 4)}
    assert_prediction_matches(step, s.state, s.batch)


def test_fast_second_axis_gives_data_times_tensor_parallel():
    hw = autoshard.Hardware(
        flops=5e10, bandwidth=(5e8, 5e9), latency=2e-5, memory_bandwidth=2e10, reduce_scatter=False
    )
    s = mlp.setup(mlp.MLPConfig(32, 512, 2), batch_size=2048)
    step = autoshard.parallelize(s.train_step, mesh=(2, 4), hardware=hw)
    plan = step.plan(s.state, s.batch)
    for i in range(2):
        assert spec_of(plan, f"[{i}]['w1']['kernel']") == (None, "y")
        assert spec_of(plan, f"[{i}]['w2']['kernel']") == ("y",)
    assert spec_of(plan, "batch['x']") == ("x",)
    assert_prediction_matches(step, s.state, s.batch)
    compiled, _ = compiled_vs_predicted(step, s.state, s.batch)
    assert compiled["all-reduce"][0] == 4  # 3 activations over y + 1 fused gradient over x
