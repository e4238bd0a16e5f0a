"""Training steps as people write them: randomness, Flax NNX objects, inputs in any
placement, no recompiles, jax.jit's calling conventions, user pins, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from util import ADAM_ATOL, CPU, assert_close, assert_sharded, compiles

import autoshard
from autoshard.passes.graph import build_graph
from autoshard.passes.trace import trace

# ---------------------------------------------------------------- randomness


def wide_params(seed=0, d=64, h=1024):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"w1": jax.random.normal(k1, (d, h)) / 8, "w2": jax.random.normal(k2, (h, d)) / 32}


def dropout_step(params, x, key, step):
    """lm1b's habit: a fresh dropout key per step, folded in from the step number."""
    rng = jax.random.fold_in(key, step)

    def loss_fn(p):
        h = jnp.tanh(x @ p["w1"])
        keep = jax.random.bernoulli(rng, 0.9, h.shape)
        h = jnp.where(keep, h / 0.9, 0.0)
        return jnp.mean((h @ p["w2"]) ** 2)

    loss, g = jax.value_and_grad(loss_fn)(params)
    new = jax.tree.map(lambda p, g: p - 0.1 * g, params, g)
    return new, loss, jax.random.split(rng)


def key_data(tree):
    """Typed keys as their uint32 data, to compare them like arrays."""
    is_key = lambda x: jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
    return jax.tree.map(lambda x: jax.random.key_data(x) if is_key(x) else x, tree)


@pytest.mark.parametrize(
    "raw,partitionable", [(False, True), (True, True), (False, False)], ids=str
)
def test_dropout_step_with_keys_matches_jit(raw, partitionable):
    """Typed and raw uint32[2] keys; with or without jax_threefry_partitionable (the
    bits are the same numbers either way, only how XLA computes them differs)."""
    params, x = wide_params(), jax.random.normal(jax.random.key(2), (8, 64))
    key = jax.random.PRNGKey(7) if raw else jax.random.key(7)
    with jax.threefry_partitionable(partitionable):
        step = autoshard.parallelize(dropout_step, mesh=(8,), hardware=CPU)
        ref = jax.jit(dropout_step)(params, x, key, 3)
        out = step(params, x, key, 3)
    assert_close(key_data(out), key_data(ref), atol=1e-6)  # keys out are the same keys
    plan = step.plan(params, x, key, 3)
    assert_sharded(plan, "['w1']")  # Megatron: the hidden dimension is split
    # the key stays whole; the mask bits split with the hidden activations they mask
    assert [e.spec for e in plan.inputs if e.path == "key"] == [P()]
    graph = build_graph(trace(dropout_step, (params, x, key, 3)))
    bits = [n.outputs[0] for n in graph.nodes if n.name == "random_bits"]
    assert bits and any(any(plan.layout.value_specs[v]) for v in bits)


def test_key_intermediates_split_and_seed():
    def step(x, seed):
        keys = jax.random.split(jax.random.key(seed), 4)  # random_seed, random_split
        noise = jax.vmap(lambda k: jax.random.normal(k, x.shape[1:]))(keys)
        return x + noise, jax.random.key_data(keys)  # random_unwrap

    x = jnp.ones((4, 32, 64))
    out = autoshard.parallelize(step, mesh=(8,))(x, 5)
    assert_close(out, jax.jit(step)(x, 5), atol=0)


# ---------------------------------------------------------------- Flax NNX


class Net(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(16, 256, use_bias=False, rngs=rngs)  # BatchNorm follows
        self.bn = nnx.BatchNorm(256, rngs=rngs)
        self.drop = nnx.Dropout(0.2, rngs=rngs)
        self.l2 = nnx.Linear(256, 4, rngs=rngs)

    def __call__(self, x):
        return self.l2(self.drop(nnx.relu(self.bn(self.l1(x)))))


def nnx_train_step(model, optimizer, x, y):
    def loss_fn(model):
        return jnp.mean((model(x) - y) ** 2)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def make_nnx():
    model = Net(nnx.Rngs(0, dropout=1))
    return model, nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)


def test_nnx_step_trains_exactly_like_nnx_jit():
    x = jax.random.normal(jax.random.key(1), (64, 16))
    y = jax.random.normal(jax.random.key(2), (64, 4))
    ref_model, ref_opt = make_nnx()
    model, opt = make_nnx()
    ref = nnx.jit(nnx_train_step)
    # the batch is pinned to the data axis, so the plan splits activations
    step = autoshard.parallelize(
        nnx_train_step, mesh=(8,), in_shardings=(None, None, P("x"), P("x"))
    )
    for _ in range(3):
        np.testing.assert_allclose(step(model, opt, x, y), ref(ref_model, ref_opt, x, y), 1e-5)
    assert int(opt.step[...]) == 3 and model.drop.rngs.count[...] == 3  # merged back
    # Adam normalises near-zero gradients: compare with its tolerance (see util)
    mine, theirs = key_data(nnx.state((model, opt))), key_data(nnx.state((ref_model, ref_opt)))
    assert_close(mine, theirs, atol=ADAM_ATOL)
    plan = step.plan(model, opt, x, y)
    assert_sharded(plan, "x")
    before = compiles()
    step(model, opt, x, y)  # the merged-back state is already where the plan wants it
    assert compiles() == before and step.trace_count == 1


def test_nnx_changes_that_cannot_be_carried_out_are_errors():
    model, opt = make_nnx()
    x = jnp.ones((8, 16))

    def adds_a_variable(model, x):
        model.extra = nnx.Param(jnp.ones(3))
        return jnp.sum(model(x))

    with pytest.raises(ValueError, match="changed the structure of its NNX objects"):
        autoshard.parallelize(adds_a_variable, mesh=(8,))(model, x)

    with pytest.raises(TypeError, match=r"returns an NNX Net at out\[1\]"):
        autoshard.parallelize(lambda m, x: (jnp.sum(m(x)), m), mesh=(8,))(model, x)


# ---------------------------------------------------------------- placement, recompiles


def linen_like_step(state, x):
    def loss_fn(p):
        return jnp.mean(jnp.tanh(x @ p["w1"]) @ p["w2"] ** 2)

    loss, g = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=g), loss


def test_steady_state_never_compiles_and_python_step_plans_once():
    state = train_state.TrainState.create(apply_fn=None, params=wide_params(), tx=optax.sgd(0.1))
    assert isinstance(state.step, int)  # as TrainState.create makes it
    x = jax.random.normal(jax.random.key(3), (8, 64))
    step = autoshard.parallelize(linen_like_step, mesh=(8,), hardware=CPU)
    ref_state, ref_loss = jax.jit(linen_like_step)(state, x)
    state, loss = step(state, x)
    assert_close((state.params, loss), (ref_state.params, ref_loss), atol=1e-6)
    assert_sharded(step.plan(state, x), "['w1']")
    before = compiles()
    for _ in range(3):
        state, loss = step(state, x)
    assert compiles() == before
    assert (step.trace_count, step.solve_count) == (1, 1)
    assert int(state.step) == 4


def test_inputs_in_any_placement_are_resharded_on_entry():
    params, x = wide_params(), jax.random.normal(jax.random.key(4), (8, 64))

    def step(p, x):
        return jax.tree.map(lambda w, g: w - 0.1 * g, p, jax.grad(loss)(p, x))

    def loss(p, x):
        return jnp.mean((jnp.tanh(x @ p["w1"]) @ p["w2"]) ** 2)

    ref = jax.jit(step)(params, x)
    planned = autoshard.parallelize(step, mesh=(8,), hardware=CPU)
    other = jax.make_mesh((4, 2), ("a", "b"))
    placements = {
        "uncommitted": (params, x),
        "one device": jax.device_put((params, x), jax.devices()[3]),
        "another mesh": jax.device_put(
            (params, x), (NamedSharding(other, P("b", "a")), NamedSharding(other, P("a")))
        ),
        "numpy": jax.tree.map(np.asarray, (params, x)),
    }
    for name, args in placements.items():
        out = planned(*args)
        assert_close(out, ref, atol=1e-6), name
        before = compiles()
        planned(*args)  # the same placement again: nothing compiles
        planned(out, args[1])  # outputs feed the next call as they are
        assert compiles() == before, name
    assert planned.trace_count == 1
    assert_sharded(planned.plan(params, x))


# ---------------------------------------------------------------- calling conventions


def configurable_step(params, x, scale, *, lr, clip=False):
    g = jax.grad(lambda p: jnp.mean(jnp.tanh(x @ p["w1"]) @ p["w2"] ** 2))(params)
    if clip:
        g = jax.tree.map(lambda g: jnp.clip(g, -0.01, 0.01), g)
    return jax.tree.map(lambda p, g: p - lr * scale * g, params, g)


def test_keyword_static_and_donated_arguments_as_jit():
    params, x = wide_params(), jnp.ones((8, 64))
    kw = dict(static_argnames="clip", donate_argnames="params")
    ref = jax.jit(configurable_step, **kw)(
        jax.tree.map(jnp.copy, params), x, 2.0, lr=0.1, clip=True
    )
    step = autoshard.parallelize(configurable_step, mesh=(8,), hardware=CPU, **kw)
    mine = jax.tree.map(jnp.copy, params)  # donated: ours to lose
    out = step(params=mine, x=x, scale=2.0, lr=0.1, clip=True)
    assert_close(out, ref, atol=1e-6)
    assert_sharded(step.plan(params, x, 2.0, lr=0.1, clip=True))
    unclipped = step(params, x, 2.0, lr=0.1)
    assert_close(unclipped, jax.jit(configurable_step)(params, x, 2.0, lr=0.1), atol=1e-6)
    assert step.trace_count == 3  # keyword vs positional, clip=True vs default

    by_num = autoshard.parallelize(lambda p, n: p * n, static_argnums=1, mesh=(8,))
    assert float(by_num(jnp.ones(8), 3)[0]) == 3.0
    with pytest.raises(TypeError, match="static argument 'n' is a list"):
        autoshard.parallelize(lambda p, n: p, static_argnames="n")(jnp.ones(8), n=[1])


# ---------------------------------------------------------------- pins


def test_input_output_and_constraint_pins_are_kept():
    params, x = wide_params(), jnp.ones((16, 64))

    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))

    def step(p, x):
        h = jnp.tanh(x @ p["w1"])
        h = jax.lax.with_sharding_constraint(h, NamedSharding(mesh, P("x", None)))
        return jnp.mean((h @ p["w2"]) ** 2), h

    pinned = autoshard.parallelize(
        step,
        mesh=mesh,
        hardware=CPU,
        in_shardings=({"w1": P("x", None), "w2": None}, None),  # not what it would pick
        out_shardings=(None, P(None, "x")),
    )
    ref = jax.jit(step)(params, x)
    out = pinned(params, x)
    assert_close(out, ref, atol=1e-6)
    plan = pinned.plan(params, x)
    assert plan.in_specs[0]["w1"] == P("x")
    assert out[1].sharding.spec == P(None, "x") and plan.out_specs[1] == P(None, "x")
    graph = build_graph(trace(step, (params, x)))
    (c,) = [n for n in graph.nodes if n.name == "sharding_constraint"]
    assert plan.layout.value_specs[c.outputs[0]] == ((0,), ())


def test_pins_that_cannot_hold_name_tensor_dimension_and_axis():
    params, x = wide_params(), jnp.ones((6, 64))
    bad = autoshard.parallelize(lambda p, x: x @ p["w1"], mesh=(8,), in_shardings=(None, P("x")))
    with pytest.raises(ValueError, match=r"on x \[6, 64\] cannot hold: dimension 0 \(size 6\)"):
        bad.plan(params, x)
    # one pin for every argument, as jax.jit takes it: everything whole
    whole = autoshard.parallelize(lambda p, x: x @ p["w1"], mesh=(8,), in_shardings=P())
    assert [e.spec for e in whole.plan(params, x).inputs] == [P(), P(), P()]
    unknown = autoshard.parallelize(lambda p, x: x, mesh=(8,), in_shardings=(None, P("data")))
    with pytest.raises(ValueError, match="names mesh axis 'data'.*axes \\('x',\\)"):
        unknown.plan(params, x)


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("flops", 0, "flops=0 must be a positive number"),
        ("flops", "1e12", "flops='1e12' is not a number"),
        ("bandwidth", -1e9, "bandwidth=-1000000000.0 must be a positive number"),
        ("bandwidth", (1e9, -1.0), r"bandwidth=\(1000000000.0, -1.0\) must be"),
        ("latency", -1, "latency=-1 must be 0 or more"),
        ("memory", -5, "memory=-5 must be a positive number"),
        ("prefetch_overlap", 1.5, "prefetch_overlap=1.5 must be a fraction"),
    ],
)
def test_hardware_rejects_bad_figures(field, value, message):
    kw = dict(flops=1e12, bandwidth=1e9)
    with pytest.raises(ValueError, match=message):
        autoshard.Hardware(**{**kw, field: value})
    assert autoshard.Hardware(**kw, latency=0).latency == 0  # an idealised link is allowed


@pytest.mark.parametrize(
    "mesh,message",
    [
        ("2,4", "mesh='2,4' is not a mesh shape: give None"),
        ((2.0, 4), "non-integer axis size"),
        ((2, 3), "covers 6 devices but jax sees 8"),
    ],
)
def test_bad_mesh_says_what_is_expected(mesh, message):
    with pytest.raises(ValueError, match=message):
        autoshard.parallelize(lambda x: x, mesh=mesh)
