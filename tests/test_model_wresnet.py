"""Wide-ResNet: it trains, round-trips its state (batch-norm statistics included), has
a rule for every primitive, plans data parallel or channel parallel where it should,
and runs sharded exactly like one device."""

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
    compiled_vs_predicted,
    missing_rules,
    primitives,
    run_both,
    spec_of,
    train,
)

import autoshard
from autoshard.models import wresnet

# Large enough that the CPU plan on (8,) splits the batch, so batch norm reduces its
# statistics over a split batch.
BATCH = 256
CONVS = ["['stem']", "[0]['conv1']", "[0]['conv2']", "[0]['shortcut']"]
CONVS += ["[1]['conv1']", "[1]['conv2']", "[1]['shortcut']"]


@pytest.fixture(scope="module")
def tiny():
    return wresnet.setup(wresnet.tiny(), BATCH)


@pytest.fixture(scope="module")
def data_parallel(tiny):
    """The tiny model planned on (8,) with the CPU numbers: (step, its output, reference)."""
    s = tiny
    out, ref, step = run_both(s.train_step, s.state, s.batch, mesh=(8,), hardware=CPU)
    return step, out, ref


def abstract_setup(config, batch_size, **kw):
    """(train_step, state, batch) with shapes only: planning and compiling need no values."""
    box = {}

    def build():
        s = wresnet.setup(config, batch_size, **kw)
        box["step"] = s.train_step
        return s.state, s.batch

    state, batch = jax.eval_shape(build)
    return box["step"], state, batch


def _leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_loss_falls_and_running_stats_move(tiny):
    s = tiny
    state, losses = train(s)
    assert int(state.step) == 20
    assert losses[-1] < 0.8 * losses[0], losses  # measured ~0.55
    before, after = _leaves(s.state.model_state), _leaves(state.model_state)
    assert len(before) == 2 * 6  # mean and var of 6 batch norms
    for b, a in zip(before, after, strict=True):
        assert not np.allclose(a, b)


def test_state_roundtrip(tiny):
    s = tiny
    out_state, metrics = jax.eval_shape(s.train_step, s.state, s.batch)
    avals = lambda t: jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), t)
    assert jax.tree.structure(out_state) == jax.tree.structure(s.state)
    assert avals(out_state) == avals(s.state)
    assert metrics["loss"].shape == ()
    assert s.state.model_state["blocks"][1]["bn2"]["var"].shape == (16,)
    assert s.state.params["blocks"][1]["shortcut"]["kernel"].shape == (1, 1, 8, 16)


def test_docstring_examples():
    assert doctest.testmod(wresnet, optionflags=doctest.ELLIPSIS).failed == 0


def test_every_primitive_has_a_rule():
    step, state, batch = abstract_setup(wresnet.tiny(), 8)
    prims = primitives(step, state, batch)
    assert {"conv_general_dilated", "reduce_window_max", "select_and_scatter_add"} <= prims
    assert missing_rules(step, state, batch) == set()


# ---------------------------------------------------------------- numerics


def test_data_parallel_step_matches_single_device(tiny, data_parallel):
    step, out, ref = data_parallel
    assert spec_of(step.plan(tiny.state, tiny.batch), "batch['image']") == ("x",)
    assert_close(out[1], ref[1], atol=1e-5)  # loss
    # batch statistics reduced over the split batch: running stats equal one device's
    assert_close(out[0].model_state, ref[0].model_state, atol=1e-6)
    assert_close(out[0], ref[0], atol=ADAM_ATOL)


@pytest.mark.parametrize("mesh", [(2, 4), None], ids=str)
def test_step_matches_single_device(tiny, mesh):
    s = tiny  # the same step as the reference above: its compiled reference is reused
    out, ref, _ = run_both(s.train_step, s.state, s.batch, mesh=mesh, hardware=CPU)
    assert_close(out[1], ref[1], atol=1e-5)
    assert_close(out[0].model_state, ref[0].model_state, atol=1e-6)
    assert_close(out[0], ref[0], atol=ADAM_ATOL)


# ---------------------------------------------------------------- plans


def test_large_batch_is_data_parallel(tiny, data_parallel):
    s, (step, _, _) = tiny, data_parallel
    plan = step.plan(s.state, s.batch)
    assert spec_of(plan, "batch['image']") == ("x",)
    for conv in CONVS:
        assert spec_of(plan, f"{conv}['kernel']") == (), conv
    compiled, _ = compiled_vs_predicted(step, s.state, s.batch)
    assert compiled["all-reduce"][0] >= 1  # gradients and batch-norm statistics
    assert_prediction_matches(step, s.state, s.batch)


def test_large_batch_data_parallel_gathers_no_activations(tiny, data_parallel):
    # batch norm's backward multiplies activations by broadcast [C] vectors: the
    # product keeps the activations' batch split instead of the broadcast's layout
    s, (step, _, _) = tiny, data_parallel
    compiled, _ = compiled_vs_predicted(step, s.state, s.batch)
    assert "all-gather" not in compiled, compiled


def test_small_batch_wide_layers_split_channels():
    # one stage of one 256-wide block on 8x8 images, batch 8
    cfg = wresnet.WResNetConfig(
        blocks=(1,), base_width=256, width_factor=1, num_classes=4, image_size=8,
        channels=3, stem_kernel=3, stem_stride=1,
    )  # fmt: skip
    step_fn, state, batch = abstract_setup(cfg, 8)
    step = autoshard.parallelize(step_fn, mesh=(8,), hardware=CPU)
    plan = step.plan(state, batch)
    assert spec_of(plan, "['stem']['kernel']") == (None, None, None, "x")  # output channels
    assert spec_of(plan, "[0]['conv1']['kernel']") == (None, None, "x")  # input channels
    assert spec_of(plan, "[0]['conv2']['kernel']") == (None, None, None, "x")
    assert spec_of(plan, "batch['image']") == ()
    compiled, _ = compiled_vs_predicted(step, state, batch)
    assert set(compiled) == {"all-reduce"}, compiled
    assert_prediction_matches(step, state, batch)
