"""The public surface: decorator forms, caching, plan/lower, meshes, bad input."""

import doctest
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from util import assert_close, assert_sharded, run_both

import autoshard
from autoshard.models import mlp


def sgd_step(w, x):
    loss, g = jax.value_and_grad(lambda w: jnp.mean(jnp.tanh(x @ w) ** 2))(w)
    return w - 0.1 * g, loss


def test_bare_decorator_and_options_form():
    bare = autoshard.parallelize(sgd_step)
    configured = autoshard.parallelize(mesh=(2, 4))(sgd_step)
    w, x = jnp.ones((16, 8)) * 0.1, jnp.arange(64.0).reshape(8, 8)[:, :].repeat(2, 1)
    ref = jax.jit(sgd_step)(w, x)
    for step in (bare, configured):
        assert_close(step(w, x), ref, atol=1e-6)


def test_plans_once_per_signature():
    step = autoshard.parallelize(sgd_step, mesh=(8,))
    w, x = jnp.ones((16, 8)), jnp.ones((32, 16))
    for _ in range(3):
        w, _ = step(w, x)
    assert (step.trace_count, step.solve_count) == (1, 1)
    step.plan(w, x)
    step.lower(w, x)
    assert step.trace_count == 1
    step(w, jnp.ones((64, 16)))  # new shape: plans again
    assert (step.trace_count, step.solve_count) == (2, 2)


def test_plan_and_lower_accept_shape_dtype_structs():
    s = mlp.setup(mlp.tiny(), batch_size=16)
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (s.state, s.batch))
    step = autoshard.parallelize(s.train_step, mesh=(2, 4))
    plan = step.plan(*abstract)
    assert isinstance(plan.mesh, jax.sharding.Mesh)
    assert dict(plan.mesh.shape) == {"x": 2, "y": 4}
    # in_specs / out_specs are shaped like the arguments / outputs
    assert jax.tree.structure(plan.in_specs, is_leaf=lambda p: isinstance(p, P)) == (
        jax.tree.structure((s.state, s.batch))
    )
    out_shape = jax.eval_shape(s.train_step, s.state, s.batch)
    assert jax.tree.structure(plan.out_specs, is_leaf=lambda p: isinstance(p, P)) == (
        jax.tree.structure(out_shape)
    )
    text = step.lower(*abstract).compile().as_text()
    assert "HloModule" in text
    # state leaves keep one layout in and out (donation-friendly)
    in_state = jax.tree.leaves(plan.in_specs[0], is_leaf=lambda p: isinstance(p, P))
    out_state = jax.tree.leaves(plan.out_specs[0], is_leaf=lambda p: isinstance(p, P))
    assert in_state == out_state


def test_summary_and_json_round_trip(tmp_path):
    s = mlp.setup(mlp.MLPConfig(64, 2048, 2), batch_size=8)
    plan = autoshard.parallelize(s.train_step, mesh=(8,)).plan(s.state, s.batch)
    text = plan.summary()
    assert "blocks.{0,1}.w1.kernel" in text and "P(None, 'x')" in text
    assert "mesh: (x=8)" in text and "ILP:" in text and "all-reduce" in text
    path = tmp_path / "plan.json"
    plan.save(str(path))
    loaded = autoshard.Plan.load(str(path))
    assert [e.spec for e in loaded.inputs] == [e.spec for e in plan.inputs]
    assert loaded.cost.collectives == plan.cost.collectives
    assert dict(loaded.mesh.shape) == dict(plan.mesh.shape)
    assert json.loads(path.read_text())["solver"]["status"] == "optimal"


def test_user_meshes_keep_their_axis_names():
    w, x = jnp.ones((16, 8)) * 0.1, jnp.ones((32, 16))
    ref = jax.jit(sgd_step)(w, x)
    explicit = jax.make_mesh((2, 4), ("data", "model"))  # Explicit axes by default
    auto = jax.sharding.Mesh(np.array(jax.devices()).reshape(4, 2), ("a", "b"))
    for mesh, names in ((explicit, ("data", "model")), (auto, ("a", "b"))):
        step = autoshard.parallelize(sgd_step, mesh=mesh)
        assert step.plan(w, x).mesh.axis_names == names
        assert_close(step(w, x), ref, atol=1e-6)


def test_mesh_that_does_not_match_devices_is_a_clear_error():
    with pytest.raises(ValueError, match=r"covers 6 devices but jax sees 8.*product is 8"):
        autoshard.parallelize(sgd_step, mesh=(2, 3)).plan(jnp.ones((4, 4)), jnp.ones((4, 4)))
    hw = autoshard.Hardware(flops=1e12, bandwidth=(1e9, 1e10))
    with pytest.raises(ValueError, match="per-axis numbers for 2 mesh axes"):
        autoshard.parallelize(sgd_step, mesh=(8,), hardware=hw).plan(
            jnp.ones((4, 4)), jnp.ones((4, 4))
        )


def test_non_array_leaf_is_a_clear_error():
    def step(w, batch):
        return w * 2

    with pytest.raises(TypeError, match=r"batch\['name'\] is a str"):
        autoshard.parallelize(step)(jnp.ones(4), {"name": "cats"})


@pytest.mark.parametrize("batch", [12, 1, 3])
def test_non_divisible_batches_run_correctly(batch):
    # a wide hidden layer: the plan splits it (Megatron) while the batch stays whole
    s = mlp.setup(mlp.MLPConfig(64, 1024, 1), batch_size=batch, tx=optax.sgd(0.1))
    out, ref, step = run_both(s.train_step, s.state, s.batch, mesh=(8,))
    assert_close(out, ref, atol=2e-6)
    plan = step.plan(s.state, s.batch)
    assert_sharded(plan, "['w1']['kernel']")
    assert "x" not in jax.tree.leaves(tuple(plan.in_specs[1]["x"]))


def test_python_scalar_arguments():
    # replication on purpose: an 8x8 weight is not worth splitting; this checks scalars
    def step(w, lr):
        return w - lr * jax.grad(lambda w: jnp.sum(w**2))(w)

    out = autoshard.parallelize(step, mesh=(8,))(jnp.ones((8, 8)), 0.25)
    np.testing.assert_allclose(out, 0.5 * np.ones((8, 8)))


def test_donation_keeps_results_right():
    s = mlp.setup(mlp.tiny(), batch_size=16, tx=optax.sgd(0.1))
    ref = jax.jit(s.train_step)(s.state, s.batch)
    state = jax.tree.map(jnp.copy, s.state)  # the donated copy is ours to lose
    step = autoshard.parallelize(s.train_step, mesh=(8,), donate_argnums=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # donation on CPU may be declined
        out = step(state, s.batch)
    assert_close(out, ref, atol=2e-6)


def test_unknown_primitive_is_replicated_with_a_warning():
    def step(a, x):
        c = jnp.linalg.cholesky(a @ a.T + 8 * jnp.eye(8))  # no rule for 'cholesky'
        return x @ c

    a, x = jnp.arange(64.0).reshape(8, 8) / 64, jnp.ones((16, 8))
    with pytest.warns(UserWarning, match="no sharding rule for primitive 'cholesky'"):
        out = autoshard.parallelize(step, mesh=(8,))(a, x)
    np.testing.assert_allclose(out, jax.jit(step)(a, x), rtol=1e-5)


def test_docstring_examples():
    import autoshard.api
    import autoshard.boundary
    import autoshard.cost_model.hardware

    for mod in (autoshard.api, autoshard.boundary, autoshard.cost_model.hardware):
        result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
        assert result.failed == 0 and result.attempted > 0
