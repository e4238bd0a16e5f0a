"""The parallelism each transformer regime calls for, found by the ILP on one GPT:
heads split at small batch, vocabulary-parallel embedding and LM head when the
vocabulary dwarfs the hidden size, sequence split for long sequences of small width,
and correct runs when heads or widths do not divide the mesh axis."""

import math

import jax
import pytest
from util import (
    ADAM_ATOL,
    CPU,
    assert_close,
    assert_prediction_matches,
    assert_sharded,
    compiled_vs_predicted,
    run_both,
    spec_of,
)

from autoshard.models import gpt, gpt_scan
from autoshard.passes.graph import build_graph
from autoshard.passes.trace import trace


def _planned(config, batch_size, mesh=(8,)):
    s = gpt.setup(config, batch_size)
    devices = jax.devices()[: math.prod(mesh)]
    out, ref, step = run_both(
        s.train_step, s.state, s.batch, mesh=mesh, hardware=CPU, devices=devices
    )
    assert_close(out, ref, atol=ADAM_ATOL)
    return s, step, step.plan(s.state, s.batch)


def test_small_batch_splits_attention_by_heads():
    cfg = gpt.GPTConfig(vocab=64, d_model=512, n_heads=8, n_layers=1, seq_len=8, d_ff=1024)
    s, step, plan = _planned(cfg, batch_size=1)
    for proj in "qkv":  # column parallel: each device holds one head's projections
        assert spec_of(plan, f"['attn']['{proj}']['kernel']") == (None, "x")
    assert spec_of(plan, "['attn']['o']['kernel']") == ("x",)  # row parallel
    assert spec_of(plan, "['mlp']['w1']['kernel']") == (None, "x")
    assert spec_of(plan, "['mlp']['w2']['kernel']") == ("x",)
    assert_prediction_matches(step, s.state, s.batch)


def test_large_vocabulary_is_vocab_parallel():
    cfg = gpt.GPTConfig(vocab=16384, d_model=32, n_heads=2, n_layers=1, seq_len=8, d_ff=64)
    s, step, plan = _planned(cfg, batch_size=2)
    # each device looks up and scores its own slice of the vocabulary
    assert spec_of(plan, "['tok_embed']['embedding']") == ("x",)
    assert spec_of(plan, "['head']['kernel']") == (None, "x")
    assert_prediction_matches(step, s.state, s.batch)


def test_long_sequence_small_width_splits_the_sequence():
    cfg = gpt.GPTConfig(vocab=32, d_model=16, n_heads=2, n_layers=1, seq_len=512, d_ff=32)
    s, step, plan = _planned(cfg, batch_size=1)
    # weights are tiny: they stay whole, and the activations [1, 512, d] split on the
    # sequence (the batch of one cannot be split)
    assert spec_of(plan, "['mlp']['w1']['kernel']") == ()
    graph = build_graph(trace(s.train_step, (s.state, s.batch)))
    acts = [
        plan.layout.value_specs[o]
        for n in graph.nodes
        for o in n.outputs
        if graph.values[o].shape == (1, 512, cfg.d_model)
    ]
    on_sequence = sum(spec == ((), (0,), ()) for spec in acts)
    assert on_sequence > 0.8 * len(acts), (on_sequence, len(acts))
    # the same kinds and bytes; XLA's combiner may fuse the small all-reduces differently
    compiled, predicted = compiled_vs_predicted(step, s.state, s.batch)
    assert set(compiled) == set(predicted)
    for kind, (_, nbytes) in compiled.items():
        assert predicted[kind][1] == pytest.approx(nbytes, rel=0.1), (compiled, predicted)


@pytest.mark.parametrize("mesh", [(4,), (8,), (2, 4)], ids=str)
def test_dimensions_that_do_not_divide_the_axes_stay_whole(mesh):
    # 6 heads of 5, hidden 30, MLP 60, vocabulary 30, 6 positions: nothing but the
    # batch divides 8, and only the MLP width divides 4
    cfg = gpt.GPTConfig(vocab=30, d_model=30, n_heads=6, n_layers=1, seq_len=6, d_ff=60)
    s, step, plan = _planned(cfg, batch_size=8, mesh=mesh)
    # every value of the step, intermediates included: split dimensions divide their axes
    graph = build_graph(trace(s.train_step, (s.state, s.batch)))
    sizes = plan.mesh.devices.shape
    for info, spec in zip(graph.values, plan.layout.value_specs, strict=True):
        for dim, axes in zip(info.shape, spec or (), strict=True):
            assert dim % math.prod(sizes[a] for a in axes) == 0, (info.name, info.shape, spec)
    assert_sharded(plan)  # activations split (over the batch or the MLP width)


def test_scanned_layers_are_split_inside_the_loop():
    """The MaxText habit (layers stacked and run by nnx.scan): planned through the loop
    body, so the stacked weights split by heads and Megatron-style on their non-layer
    dimensions, exactly as the unrolled GPT's."""
    cfg = gpt.GPTConfig(vocab=64, d_model=512, n_heads=8, n_layers=2, seq_len=8, d_ff=1024)
    s = gpt_scan.setup(cfg, 1)
    out, ref, step = run_both(s.train_step, s.state, s.batch, mesh=(8,), hardware=CPU)
    assert_close(out, ref, atol=ADAM_ATOL)
    plan = step.plan(s.state, s.batch)
    for proj in "qkv":  # [layers, d_model, d_model]
        assert spec_of(plan, f"['attn']['{proj}']['kernel']") == (None, None, "x")
    assert spec_of(plan, "['attn']['o']['kernel']") == (None, "x")
    assert spec_of(plan, "['mlp']['w1']['kernel']") == (None, None, "x")
    assert spec_of(plan, "['mlp']['w2']['kernel']") == (None, "x")
    assert_prediction_matches(step, s.state, s.batch)
