"""The GPT written two more ways (Flax Linen; NNX with stacked layers under nnx.scan),
and a gradient-accumulation loop with a cond on the step count: each trains, traces,
has a rule for every primitive, and runs under autoshard exactly as on one device."""

import doctest
import functools

import jax
import jax.numpy as jnp
import pytest
from util import ADAM_ATOL, assert_close, missing_rules, primitives, run_both, train

from autoshard.models import gpt_linen, gpt_scan
from autoshard.passes import jax_core

VARIANTS = [gpt_linen, gpt_scan]
IDS = ["linen", "scan"]
BATCH = 8


@functools.cache
def _setup(module):
    return module.setup(module.tiny(), BATCH)


@pytest.fixture(scope="module", params=VARIANTS, ids=IDS)
def variant(request):
    return request.param, _setup(request.param)


def _avals(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), tree)


def test_loss_falls(variant):
    module, s = variant
    state, losses = train(s)
    assert int(state.step) == 20
    assert losses[-1] < 0.5 * losses[0], losses


def test_state_roundtrip_and_rules(variant):
    module, s = variant
    out_state, metrics = jax.eval_shape(s.train_step, s.state, s.batch)
    assert jax.tree.structure(out_state) == jax.tree.structure(s.state)
    assert _avals(out_state) == _avals(s.state)
    assert metrics["loss"].shape == ()
    assert s.state.model_state is None
    assert missing_rules(s.train_step, s.state, s.batch) == set()


@pytest.mark.parametrize("module", VARIANTS, ids=IDS)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


def test_linen_param_paths():
    cfg, params = gpt_linen.tiny(), _setup(gpt_linen).state.params
    assert isinstance(params, dict)
    assert params["block_1"]["attn"]["q"]["kernel"].shape == (cfg.d_model, cfg.d_model)
    assert params["block_0"]["mlp"]["w1"]["kernel"].shape == (cfg.d_model, cfg.d_ff)


@pytest.mark.parametrize("mesh", [(8,), (2, 4), None], ids=str)
def test_adamw_matches_single_device(variant, mesh):
    _, s = variant
    out, ref, _ = run_both(s.train_step, s.state, s.batch, mesh=mesh)
    assert_close(out[1], ref[1], atol=1e-5)
    assert_close(out[0], ref[0], atol=ADAM_ATOL)


def _scans(jaxpr) -> list:
    """Every scan equation, nested ones (under jit etc.) included."""
    found = []
    for eqn in jax_core.split_closed(jaxpr)[0].eqns:
        if eqn.primitive.name == "scan":
            found.append(eqn)
        for sub in jax_core.jaxprs_in_params(eqn.params):
            found += _scans(sub)
    return found


def _count(jaxpr, name: str, into_scans: bool = True) -> int:
    n = 0
    for eqn in jax_core.split_closed(jaxpr)[0].eqns:
        n += eqn.primitive.name == name
        if into_scans or eqn.primitive.name != "scan":
            n += sum(_count(sub, name, into_scans) for sub in jax_core.jaxprs_in_params(eqn.params))
    return n


def test_scanned_step_has_one_loop_per_direction():
    cfg, s = gpt_scan.tiny(), _setup(gpt_scan)
    stacked = s.state.params["blocks"]
    assert all(x.shape[0] == cfg.n_layers for x in jax.tree.leaves(stacked))
    assert stacked["attn"]["q"]["kernel"].shape == (cfg.n_layers, cfg.d_model, cfg.d_model)

    jaxpr = jax.make_jaxpr(s.train_step)(s.state, s.batch)
    scans = _scans(jaxpr)
    assert sorted(e.params["reverse"] for e in scans) == [False, True]
    assert all(e.params["length"] == cfg.n_layers for e in scans)
    fwd, bwd = sorted(scans, key=lambda e: e.params["reverse"])
    # one block: q, k, v, o, two attention einsums, w1, w2; the backward pass two per matmul
    assert _count(fwd.params["jaxpr"], "dot_general") == 8
    assert _count(bwd.params["jaxpr"], "dot_general") == 16
    # outside the loops only the head's matmul and its two transposes remain
    assert _count(jaxpr, "dot_general", into_scans=False) == 3
    # the forward loop scans the stacked parameters as xs
    first_x = fwd.params["num_consts"] + fwd.params["num_carry"]
    xs = {tuple(v.aval.shape) for v in fwd.invars[first_x:]}
    assert {x.shape for x in jax.tree.leaves(stacked)} <= xs


# --- a hand-written step: gradient accumulation in a loop, a cond on the step count ---

N_MICRO = 4


def _mlp_loss(params, x, y):
    return jnp.mean((jnp.tanh(x @ params["w1"]) @ params["w2"] - y) ** 2)


def accumulation_step(state, batch):
    """Mean gradient over the first ``state["n_micro"]`` (traced: a while loop) or all
    ``N_MICRO`` (static: a scan) microbatches, then SGD whose branch depends on the step."""
    params, step = state["params"], state["step"]
    size = batch["x"].shape[0] // N_MICRO
    n = N_MICRO if state["n_micro"] is None else state["n_micro"]

    def micro(i, acc):
        x = jax.lax.dynamic_slice_in_dim(batch["x"], i * size, size)
        y = jax.lax.dynamic_slice_in_dim(batch["y"], i * size, size)
        loss, g = jax.value_and_grad(_mlp_loss)(params, x, y)
        return acc[0] + loss, jax.tree.map(jnp.add, acc[1], g)

    zero = (jnp.zeros(()), jax.tree.map(jnp.zeros_like, params))
    loss, grads = jax.lax.fori_loop(0, n, micro, zero)
    grads = jax.tree.map(lambda g: g / n, grads)
    new = jax.lax.cond(
        step % 2 == 0,
        lambda p, g: jax.tree.map(lambda p, g: p - 0.1 * g, p, g),
        lambda p, g: jax.tree.map(lambda p, g: 0.99 * p - 0.05 * jnp.clip(g, -0.01, 0.01), p, g),
        params,
        grads,
    )
    return {**state, "params": new, "step": step + 1}, loss / n


@pytest.mark.parametrize("traced", [False, True], ids=["fori-scan", "fori-while"])
@pytest.mark.parametrize("mesh", [(8,), (2, 4)], ids=str)
def test_accumulation_loop_and_step_cond(mesh, traced):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(1), 4)
    params = {"w1": jax.random.normal(k1, (16, 32)) / 4, "w2": jax.random.normal(k2, (32, 8)) / 4}
    batch = {"x": jax.random.normal(k3, (32, 16)), "y": jax.random.normal(k4, (32, 8))}
    n_micro = jnp.int32(3) if traced else None
    state = {"params": params, "step": jnp.int32(0), "n_micro": n_micro}

    prims = primitives(accumulation_step, state, batch)
    assert {"while" if traced else "scan", "cond", "dot_general"} <= prims
    assert missing_rules(accumulation_step, state, batch) == set()
    out, ref, step = run_both(accumulation_step, state, batch, mesh=mesh)
    assert_close(out, ref, atol=2e-6)
    # the other branch, on the same plan
    odd = {**state, "step": jnp.int32(1)}
    assert_close(step(odd, batch), jax.jit(accumulation_step)(odd, batch), atol=2e-6)
