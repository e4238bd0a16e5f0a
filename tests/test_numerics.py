"""A planned step equals the single-device step (fp32, highest matmul precision)."""

import jax
import jax.numpy as jnp
import optax
import pytest
from util import ADAM_ATOL, assert_close, run_both

from autoshard.models import gpt, mlp
from autoshard.passes.graph import Lit, build_graph
from autoshard.passes.trace import trace

MESHES = [(8,), (2, 4), (2, 2, 2), None]


@pytest.fixture(scope="module")
def mlp_setup():
    return mlp.setup(mlp.tiny(), batch_size=16)


@pytest.fixture(scope="module")
def gpt_setup():
    return gpt.setup(gpt.tiny(), batch_size=8)


@pytest.mark.parametrize("mesh", MESHES, ids=str)
def test_mlp_adamw_matches_single_device(mlp_setup, mesh):
    s = mlp_setup
    out, ref, _ = run_both(s.train_step, s.state, s.batch, mesh=mesh)
    assert_close(out[1], ref[1], atol=1e-6)  # loss
    assert_close(out[0], ref[0], atol=ADAM_ATOL)


@pytest.mark.parametrize("mesh", MESHES, ids=str)
def test_gpt_adamw_matches_single_device(gpt_setup, mesh):
    s = gpt_setup
    out, ref, _ = run_both(s.train_step, s.state, s.batch, mesh=mesh)
    assert_close(out[1], ref[1], atol=1e-5)
    assert_close(out[0], ref[0], atol=ADAM_ATOL)


@pytest.mark.parametrize(
    "model,mesh",
    [(mlp, (8,)), (mlp, (2, 4)), (gpt, (8,)), (gpt, (2, 4))],
    ids=lambda x: getattr(x, "__name__", str(x)).split(".")[-1],
)
def test_sgd_step_matches_exactly(model, mesh):
    """With SGD the update is lr * gradient: checks every gradient tightly."""
    s = model.setup(model.tiny(), batch_size=8, tx=optax.sgd(0.1))
    out, ref, _ = run_both(s.train_step, s.state, s.batch, mesh=mesh)
    assert_close(out, ref, atol=2e-6)


def test_wide_megatron_and_data_parallel_numerics():
    for cfg, batch in ((mlp.MLPConfig(64, 2048, 2), 8), (mlp.MLPConfig(32, 64, 2), 4096)):
        s = mlp.setup(cfg, batch_size=batch, tx=optax.sgd(0.1))
        out, ref, _ = run_both(s.train_step, s.state, s.batch, mesh=(8,))
        assert_close(out, ref, atol=2e-6)


@jax.custom_vjp
def clipped_identity(x):
    return x


clipped_identity.defvjp(lambda x: (x, None), lambda _, g: (jnp.clip(g, -1.0, 1.0),))


def control_flow_step(params, batch):
    """scan over stacked layers, remat, cond, custom_vjp, and a while loop."""

    def loss_fn(p):
        def layer(h, w):
            return jax.checkpoint(lambda h: jnp.tanh(h @ w))(h), None

        h, _ = jax.lax.scan(layer, batch["x"], p["stack"])
        h = jax.lax.cond(jnp.sum(h) > 0, lambda h: h + 1.0, lambda h: h - 1.0, h)
        return jnp.mean(clipped_identity(h @ p["out"]) ** 2)

    loss, g = jax.value_and_grad(loss_fn)(params)
    new = jax.tree.map(lambda p, g: p - 0.1 * g, params, g)
    n = jnp.sum(batch["x"] > 0).astype(jnp.int32) % 3 + 1  # traced trip count: a while
    out = jax.lax.fori_loop(0, n, lambda i, w: w * 0.99, new["out"])
    return {"stack": new["stack"], "out": out}, loss


@pytest.mark.parametrize("mesh", [(8,), (2, 4)], ids=str)
def test_control_flow_and_calls_run_correctly(mesh):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = {
        "stack": jax.random.normal(k1, (3, 16, 16)) / 4,
        "out": jax.random.normal(k2, (16, 8)) / 4,
    }
    batch = {"x": jax.random.normal(k3, (32, 16))}
    out, ref, step = run_both(control_flow_step, params, batch, mesh=mesh)
    assert_close(out, ref, atol=2e-6)
    # the loops stay whole, and each carry keeps one layout in and out
    graph = build_graph(trace(control_flow_step, (params, batch)))
    layout = step.plan(params, batch).layout
    loops = [n for n in graph.nodes if n.name in ("scan", "while")]
    assert {n.name for n in loops} == {"scan", "while"}
    assert any(n.name == "cond" for n in graph.nodes)
    for n in loops:
        first = (
            n.params["num_consts"]
            if n.name == "scan"
            else (n.params["cond_nconsts"] + n.params["body_nconsts"])
        )
        carry = n.params["num_carry"] if n.name == "scan" else len(n.outputs)
        for pos, v in enumerate(n.outputs[:carry]):
            if not isinstance(n.inputs[first + pos], Lit):  # a literal counter has no layout
                assert layout.operand_specs[n.id][first + pos] == layout.value_specs[v]
