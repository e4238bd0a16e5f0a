"""Textbook plans: found by the ILP, visible in the compiled HLO, predicted exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from util import CPU, assert_prediction_matches, compiled_vs_predicted, spec_of

import autoshard
from autoshard.cost_model.hardware import MeshDesc
from autoshard.cost_model.resharding import reshard
from autoshard.models import gpt, mlp


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


@pytest.mark.parametrize("mesh", [(8,), (2, 4)], ids=str)
def test_gpt_prediction_matches_compiled(mesh):
    s = gpt.setup(gpt.tiny(), batch_size=8)
    step = autoshard.parallelize(s.train_step, mesh=mesh, hardware=autoshard.PRESETS["cpu"])
    assert_prediction_matches(step, s.state, s.batch)


@pytest.mark.parametrize(
    "src,dst",
    [
        (P("x", "y"), P("y", "x")),  # swap: all-to-all + permute
        (P("x", "y"), P()),  # two gathers, minor dimension first
        (P("x", "y", None), P(None, None, ("x", "y"))),  # merge across dims: gathers
        (P(("x", "y"), None, None), P(None, None, ("x", "y"))),  # one all-to-all
        (P(None, "y"), P("x", "y")),  # a local slice: nothing
    ],
    ids=str,
)
def test_resharding_cost_names_what_xla_compiles(src, dst):
    mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("x", "y"), axis_types=(AxisType.Auto,) * 2)

    def f(a):
        a = jax.lax.with_sharding_constraint(a * 2, NamedSharding(mesh, src))
        return jax.lax.with_sharding_constraint(a + 1, NamedSharding(mesh, dst))

    a = jnp.ones((16, 16, 16))
    compiled = autoshard.collectives(jax.jit(f).lower(a).compile())
    to_spec = lambda p: tuple(
        tuple(mesh.axis_names.index(n) for n in ((d,) if isinstance(d, str) else d or ()))
        for d in (*p, *(None,) * (3 - len(p)))
    )
    desc = MeshDesc((2, 4), ("x", "y"))
    predicted: dict = {}
    for c in reshard(to_spec(src), to_spec(dst), a.nbytes, desc):
        n, b = predicted.get(c.kind, (0, 0))
        predicted[c.kind] = (n + 1, b + c.nbytes)
    assert compiled == predicted
