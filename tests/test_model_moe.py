"""The mixture-of-experts decoder: it trains, routes as GShard does, runs sharded with the
single-device numbers, and its large experts are planned expert-parallel."""

import doctest

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from util import (
    ADAM_ATOL,
    CPU,
    assert_close,
    assert_prediction_matches,
    missing_rules,
    primitives,
    run_both,
    spec_of,
    train,
)

import autoshard
from autoshard.models import moe


@pytest.fixture(scope="module")
def tiny_setup():
    return moe.setup(moe.tiny(), batch_size=8)


def _avals(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def test_loss_falls(tiny_setup):
    s = tiny_setup
    state, losses = train(s)
    assert int(state.step) == 20
    assert losses[-1] < 0.6 * losses[0], losses  # measured ~0.46


def test_jaxpr_and_state_roundtrip(tiny_setup):
    s = tiny_setup
    jaxpr = jax.make_jaxpr(s.train_step)(s.state, s.batch)
    assert "dot_general" in {eqn.primitive.name for eqn in jaxpr.eqns}
    out_state, metrics = jax.eval_shape(s.train_step, s.state, s.batch)
    assert jax.tree.structure(out_state) == jax.tree.structure(s.state)
    assert _avals(out_state) == _avals(s.state)
    assert metrics["loss"].shape == ()
    cfg = moe.tiny()
    moe_params = s.state.params["blocks"][0]["moe"]
    assert moe_params["w_in"].shape == (cfg.n_experts, cfg.d_model, cfg.d_ff)
    assert moe_params["w_out"].shape == (cfg.n_experts, cfg.d_ff, cfg.d_model)
    assert moe_params["router"]["kernel"].shape == (cfg.d_model, cfg.n_experts)


def test_docstring_examples():
    result = doctest.testmod(moe, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_every_primitive_has_a_rule(tiny_setup):
    s = tiny_setup
    prims = primitives(s.train_step, s.state, s.batch)
    assert {"argmax", "cumsum", "eq", "dot_general"} <= prims  # routing is in the step
    assert missing_rules(s.train_step, s.state, s.batch) == set()


@pytest.mark.parametrize(
    "change,match",
    [
        ({"n_experts": 1}, "n_experts >= 2"),
        ({"d_model": 33}, "not divisible by n_heads"),
        ({"capacity_factor": 0.0}, "capacity_factor"),
        ({"aux_loss_weight": -1.0}, "aux_loss_weight"),
        ({"d_ff": 0}, "d_ff must be a positive"),
    ],
    ids=lambda x: next(iter(x)) if isinstance(x, dict) else "",
)
def test_bad_configs_raise(change, match):
    with pytest.raises(ValueError, match=match):
        moe.MoEConfig(**{**moe.tiny().__dict__, **change})


route = jax.jit(moe.route, static_argnums=1)


def test_routing_is_top2_with_capacity():
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(1), (3, 16, 4)) * 3, axis=-1)
    # room for every token: each reaches exactly its two best experts, gates sum to 1
    dispatch, combine, _ = route(probs, capacity=16)
    top2 = jax.lax.top_k(probs, 2)[1]
    chosen = jnp.sum(dispatch, axis=-1)  # [G, S, E]
    np.testing.assert_array_equal(chosen.sum(-1), 2.0)
    np.testing.assert_array_equal(jnp.take_along_axis(chosen, top2, axis=-1), 1.0)
    np.testing.assert_allclose(combine.sum((2, 3)), 1.0, rtol=1e-6)
    # tight buffers: a slot holds at most one token, slots fill from the front, and
    # first choices are served before second choices
    dispatch, combine, _ = route(probs, capacity=3)
    per_slot = dispatch.sum(axis=1)  # [G, E, C]
    assert float(per_slot.max()) == 1.0
    assert bool(jnp.all(per_slot[..., 1:] <= per_slot[..., :-1]))
    first = jax.nn.one_hot(top2[..., 0], 4)
    firsts_kept = jnp.minimum(jnp.sum(first, axis=1), 3)  # [G, E]
    kept_first = jnp.sum(dispatch.sum(-1) * first, axis=1)
    np.testing.assert_array_equal(kept_first, firsts_kept)
    assert bool(jnp.all((combine > 0) == (dispatch > 0)))


def test_balance_loss_is_one_when_balanced_and_large_when_collapsed():
    e = 4
    uniform = jnp.full((2, 8, e), 1.0 / e)
    assert float(route(uniform, 4)[2]) == pytest.approx(1.0)
    collapsed = jnp.tile(jnp.array([0.97, 0.01, 0.01, 0.01]), (2, 8, 1))
    assert float(route(collapsed, 4)[2]) == pytest.approx(e * 0.97)


@pytest.mark.parametrize("mesh", [(8,), (2, 4), None], ids=str)
def test_adamw_matches_single_device(tiny_setup, mesh):
    s = tiny_setup
    out, ref, _ = run_both(s.train_step, s.state, s.batch, mesh=mesh)
    assert_close(out[1], ref[1], atol=1e-5)  # loss
    assert_close(out[0], ref[0], atol=ADAM_ATOL)


def test_large_experts_are_expert_parallel():
    """GShard's layout: experts split over the mesh on E, tokens on the group (batch)
    dimension, all-to-alls between the two; non-expert weights stay data parallel."""
    cfg = moe.MoEConfig(
        vocab=64, d_model=64, n_heads=4, n_layers=1, seq_len=16, n_experts=8, d_ff=1024,
        capacity_factor=2.0,
    )  # fmt: skip
    s = moe.setup(cfg, batch_size=16)
    step = autoshard.parallelize(s.train_step, mesh=(8,), hardware=CPU)
    plan = step.plan(s.state, s.batch)
    assert spec_of(plan, "['moe']['w_in']") == ("x",)
    assert spec_of(plan, "['moe']['w_out']") == ("x",)
    assert spec_of(plan, "['router']['kernel']") == ()
    # the int32 tokens are tiny: split, or read whole by every device and sliced there,
    # cost the same to within 1e-4 of the step; the activations carry the batch split,
    # which the all-to-alls below (batch layout <-> expert layout) show
    assert spec_of(plan, "batch['tokens']") in {("x",), ()}
    # Compiled once: the compiled collectives equal these predicted ones, kind by kind.
    assert_prediction_matches(step, s.state, s.batch)
    counts = {kind: n for kind, (n, _) in plan.cost.collectives.items()}
    # dispatch and combine, forward and backward: four all-to-alls; one fused gradient
    # all-reduce for the replicated weights (Alpa's MoE test expects the same)
    assert counts == {"all-to-all": 4, "all-reduce": 1}, counts
