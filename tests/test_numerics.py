"""A planned step equals the single-device step (fp32, highest matmul precision)."""

import jax
import jax.numpy as jnp
import optax
import pytest
from util import (
    ADAM_ATOL,
    CPU,
    assert_close,
    assert_sharded,
    compiled_vs_predicted,
    run_both,
    spec_of,
)

from autoshard.cost_model import collectives as coll
from autoshard.cost_model.hardware import MeshDesc
from autoshard.models import gpt, mlp
from autoshard.passes.graph import Lit, build_graph
from autoshard.passes.trace import trace

MESHES = [(8,), (2, 4), (2, 2, 2), None]
MESH8 = MeshDesc((8,), ("x",))


@pytest.fixture(scope="module")
def mlp_setup():
    # a batch of 64 makes data parallelism pay off: the plans split (at 16 they do not)
    return mlp.setup(mlp.tiny(), batch_size=64)


@pytest.fixture(scope="module")
def gpt_setup():
    return gpt.setup(gpt.tiny(), batch_size=8)


@pytest.mark.parametrize("mesh", MESHES, ids=str)
def test_mlp_adamw_matches_single_device(mlp_setup, mesh):
    s = mlp_setup
    out, ref, step = run_both(s.train_step, s.state, s.batch, mesh=mesh)
    assert_close(out[1], ref[1], atol=1e-6)  # loss
    assert_close(out[0], ref[0], atol=ADAM_ATOL)
    assert_sharded(step.plan(s.state, s.batch))


@pytest.mark.parametrize("mesh", MESHES, ids=str)
def test_gpt_adamw_matches_single_device(gpt_setup, mesh):
    s = gpt_setup
    # the (2, 2, 2) ILP is large: a bounded solve still gives a plan (the incumbent, or
    # replicated if that is cheaper), and it must be correct
    limit = {"time_limit": 10.0} if mesh is not None and len(mesh) == 3 else {}
    out, ref, step = run_both(s.train_step, s.state, s.batch, mesh=mesh, **limit)
    assert_close(out[1], ref[1], atol=1e-5)
    assert_close(out[0], ref[0], atol=ADAM_ATOL)
    if mesh is not None and len(mesh) < 3:  # the bounded 3-D solve may stay replicated
        assert_sharded(step.plan(s.state, s.batch))


@pytest.mark.parametrize(
    "model,mesh",
    [(mlp, (8,)), (mlp, (2, 4)), (gpt, (8,)), (gpt, (2, 4))],
    ids=lambda x: getattr(x, "__name__", str(x)).split(".")[-1],
)
def test_sgd_step_matches_exactly(model, mesh):
    """With SGD the update is lr * gradient: checks every gradient tightly."""
    batch = 64 if model is mlp else 8  # sizes at which both plans split
    s = model.setup(model.tiny(), batch_size=batch, tx=optax.sgd(0.1))
    out, ref, step = run_both(s.train_step, s.state, s.batch, mesh=mesh)
    assert_close(out, ref, atol=2e-6)
    assert_sharded(step.plan(s.state, s.batch))


def test_wide_megatron_and_data_parallel_numerics():
    for cfg, batch in ((mlp.MLPConfig(64, 2048, 2), 8), (mlp.MLPConfig(32, 64, 2), 4096)):
        s = mlp.setup(cfg, batch_size=batch, tx=optax.sgd(0.1))
        out, ref, step = run_both(s.train_step, s.state, s.batch, mesh=(8,))
        assert_close(out, ref, atol=2e-6)
        assert_sharded(step.plan(s.state, s.batch))


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
    # the scan is planned through its body and the while loop stays whole; each carry
    # keeps one layout in and out
    graph = build_graph(trace(control_flow_step, (params, batch)))
    layout = step.plan(params, batch).layout
    assert any(n.name == "cond" for n in graph.nodes)
    assert {n.name for n in graph.nodes if n.region >= 0} >= {"dot_general", "tanh"}
    assert graph.loops and all(n.name != "scan" for n in graph.nodes)
    for loop in graph.loops:
        carry_in = [graph.nodes[i].outputs[0] for i in loop.enter]
        carry_in = carry_in[loop.num_consts : loop.num_consts + loop.num_carry]
        carry_out = [graph.nodes[i].inputs[0] for i in loop.exit[: loop.num_carry]]
        for vi, vo in zip(carry_in, carry_out, strict=True):
            if not isinstance(vo, Lit):
                assert layout.value_specs[vi] == layout.value_specs[vo]
    whiles = [n for n in graph.nodes if n.name == "while"]
    assert whiles
    for n in whiles:
        first = n.params["cond_nconsts"] + n.params["body_nconsts"]
        for pos, v in enumerate(n.outputs):
            if not isinstance(n.inputs[first + pos], Lit):  # a literal counter has no layout
                assert layout.operand_specs[n.id][first + pos] == layout.value_specs[v]


def scanned_mlp_step(params, batch):
    """Residual MLP layers stacked on a leading axis and run by lax.scan, trained by SGD."""

    def loss_fn(p):
        def layer(h, w):
            return h + jnp.tanh(h @ w["w1"]) @ w["w2"], None

        h, _ = jax.lax.scan(layer, batch["x"], p)
        return jnp.mean(h**2)

    loss, g = jax.value_and_grad(loss_fn)(params)
    return jax.tree.map(lambda p, g: p - 0.1 * g, params, g), loss


def test_scan_is_planned_through_its_body():
    """Wide stacked layers at a small batch: Megatron inside the loop body, the stacked
    weights split on their hidden dimension (never on the layer axis), one all-reduce
    per body (forward and backward) in the compiled program."""
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    params = {
        "w1": jax.random.normal(k1, (4, 64, 2048)) / 8,
        "w2": jax.random.normal(k2, (4, 2048, 64)) / 40,
    }
    batch = {"x": jax.random.normal(k3, (8, 64))}
    out, ref, step = run_both(scanned_mlp_step, params, batch, mesh=(8,), hardware=CPU)
    assert_close(out, ref, atol=1e-5)
    plan = step.plan(params, batch)
    assert spec_of(plan, "['w1']") == (None, None, "x")
    assert spec_of(plan, "['w2']") == (None, "x")
    compiled, predicted = compiled_vs_predicted(step, params, batch)
    assert compiled == predicted == {"all-reduce": (2, 2 * 8 * 64 * 4)}
    # each body all-reduce runs once per layer: the estimate counts all of them
    one = coll.total_time([coll.Collective(coll.ALL_REDUCE, (0,), 8 * 64 * 4)], MESH8, CPU)
    assert plan.cost.comm_time == pytest.approx(2 * 4 * one, rel=1e-6)
