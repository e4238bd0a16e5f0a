"""Pipeline parallelism: forced GPipe equals jax.jit, the automatic choice on slow and
fast meshes, and clear errors for what a pipeline cannot split."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from util import ADAM_ATOL, CPU, assert_close, assert_prediction_matches

import autoshard
from autoshard.models import gpt_scan
from autoshard.models import residual_stack as rs
from autoshard.passes.graph import build_graph
from autoshard.passes.head import analyse
from autoshard.passes.stages import BATCH, SUM, stack_loops
from autoshard.passes.trace import trace
from autoshard.pipeline import micro_args
from autoshard.pipeline_1f1b import BWD, FWD, buffers, schedule


def _setup(d=32, batch=16, layers=8):
    return rs.setup(rs.StackConfig(d, d, layers), batch)


def _max_err(a, b):
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def test_stack_loops_found_forward_and_backward():
    s = _setup()
    args = (s.state, s.batch)
    full = build_graph(trace(s.train_step, args))
    micro = build_graph(trace(s.train_step, micro_args(args, 4)))
    fwd, bwd = stack_loops(full, micro)
    assert (fwd.reverse, bwd.reverse) == (False, True)
    assert fwd.length == bwd.length == 8
    # the residual stream carries the batch on dim 0; forward results are residuals
    # split by microbatch, backward results are weight gradients summed over them
    assert fwd.in_dims[0] == 0 and set(fwd.out_kinds) == {BATCH}
    assert bwd.out_kinds[0] == BATCH and set(bwd.out_kinds[1:]) == {SUM}



def _assert_two_steps_equal_jit(step, s):
    """Two pipelined steps equal two jax.jit steps of the same train step (fp32)."""
    ref = jax.jit(s.train_step)
    a = b = s.state
    for _ in range(2):
        a, ma = step(a, s.batch)
        b, mb = ref(b, s.batch)
    assert _max_err(a, b) <= 1e-5
    np.testing.assert_allclose(float(ma["loss"]), float(mb["loss"]), rtol=1e-6)


def test_forced_gpipe_equals_jit(tmp_path):
    s = _setup()
    pipe = autoshard.Pipeline(stages=4, microbatches=8, schedule="gpipe")
    step = autoshard.parallelize(s.train_step, mesh=(4, 2), hardware=CPU, pipeline=pipe)
    _assert_two_steps_equal_jit(step, s)
    plan = step.plan(s.state, s.batch)
    pl = plan.pipeline
    assert (pl.stages, pl.microbatches, pl.schedule, pl.axis) == (4, 8, "gpipe", "x")
    assert pl.bubble == pytest.approx(3 / 11)
    assert pl.stage_memory["total"] > 0
    # each stage holds its own layers: stacked weights split over 'x' on the layer dim
    w1 = next(e for e in plan.inputs if e.path == "state[0]['w1']")
    assert tuple(w1.spec)[0] in ("x", ("x", "y"))
    compiled = autoshard.collectives(step.lower(s.state, s.batch).compile())
    assert compiled["collective-permute"][0] >= 2  # forward and backward stage hand-offs
    # stage hand-offs and the gather of the last stage's output, as predicted
    assert_prediction_matches(step, s.state, s.batch)
    plan.save(str(tmp_path / "plan.json"))
    assert autoshard.Plan.load(str(tmp_path / "plan.json")).pipeline == pl


def test_pipeline_none_and_auto_on_fast_mesh_choose_none():
    s = rs.setup(rs.StackConfig(256, 256, 8), 64)
    off = autoshard.parallelize(s.train_step, mesh=(4, 2), hardware=CPU, pipeline=None)
    assert off.plan(s.state, s.batch).pipeline is None
    # both axes fast (hierarchical numbers, so the search prices a pipeline)
    fast = CPU.with_(flops=2e11, bandwidth=(50e9, 100e9), latency=1e-5)
    auto = autoshard.parallelize(s.train_step, mesh=(4, 2), hardware=fast)
    assert auto.plan(s.state, s.batch).pipeline is None


def test_auto_pipelines_over_the_slow_axis():
    s = rs.setup(rs.StackConfig(256, 256, 8), 64)
    slow = CPU.with_(flops=2e11, bandwidth=(1e9, 100e9), latency=1e-5)
    step = autoshard.parallelize(s.train_step, mesh=(4, 2), hardware=slow)
    plan = step.plan(s.state, s.batch)
    assert plan.pipeline is not None and plan.pipeline.axis == "x", plan.summary()
    intra = autoshard.parallelize(s.train_step, mesh=(4, 2), hardware=slow, pipeline=None)
    assert plan.cost.time < intra.plan(s.state, s.batch).cost.time
    assert "pipeline: 4 stages on axis 'x'" in plan.summary()


def test_batch_not_dividing_into_microbatches_is_named():
    s = _setup(batch=12)
    pipe = autoshard.Pipeline(stages=4, microbatches=8)
    step = autoshard.parallelize(s.train_step, mesh=(4, 2), hardware=CPU, pipeline=pipe)
    with pytest.raises(autoshard.PipelineError, match="batch 12 does not divide into 8"):
        step.plan(s.state, s.batch)


def test_more_stages_than_layers_is_named_and_never_chosen():
    s = _setup(layers=2)
    pipe = autoshard.Pipeline(stages=4, microbatches=4)
    step = autoshard.parallelize(s.train_step, mesh=(4, 2), hardware=CPU, pipeline=pipe)
    with pytest.raises(autoshard.PipelineError, match="4 stages but the layer stack has 2 layers"):
        step.plan(s.state, s.batch)
    slow = CPU.with_(flops=2e11, bandwidth=(1e9, 100e9), latency=1e-5)
    auto = autoshard.parallelize(s.train_step, mesh=(4, 2), hardware=slow)
    plan = auto.plan(s.state, s.batch)
    assert plan.pipeline is None or plan.pipeline.stages <= 2


def test_no_axis_of_the_stage_count_is_named():
    s = _setup()
    pipe = autoshard.Pipeline(stages=3, microbatches=4)
    step = autoshard.parallelize(s.train_step, mesh=(4, 2), hardware=CPU, pipeline=pipe)
    with pytest.raises(autoshard.PipelineError, match="axis of size 3"):
        step.plan(s.state, s.batch)


def test_forced_1f1b_equals_jit_with_fewer_live_residuals():
    s = _setup()
    steps = {
        sched: autoshard.parallelize(
            s.train_step,
            mesh=(4, 2),
            hardware=CPU,
            pipeline=autoshard.Pipeline(stages=4, microbatches=8, schedule=sched),
        )
        for sched in ("gpipe", "1f1b")
    }
    step = steps["1f1b"]
    _assert_two_steps_equal_jit(step, s)
    pl = step.plan(s.state, s.batch).pipeline
    assert (pl.stages, pl.microbatches, pl.schedule) == (4, 8, "1f1b")
    compiled = {k: f.lower(s.state, s.batch).compile() for k, f in steps.items()}
    hlo = compiled["1f1b"].as_text()
    # one loop: forward and backward hand-offs, each stage choosing its work per tick
    assert autoshard.collectives(compiled["1f1b"])["collective-permute"][0] >= 2
    assert "conditional" in hlo
    assert_prediction_matches(step, s.state, s.batch)
    # at most p = 4 of the 8 microbatches' residuals live per stage: less temp memory
    temp = {k: c.memory_analysis().temp_size_in_bytes for k, c in compiled.items()}
    assert temp["1f1b"] < temp["gpipe"], temp
    acts = {
        k: f.plan(s.state, s.batch).pipeline.stage_memory["activations_peak"]
        for k, f in steps.items()
    }
    assert acts["1f1b"] < acts["gpipe"], acts


def test_1f1b_schedule_runs_every_microbatch_once_in_order():
    for p, m in [(2, 2), (4, 8), (4, 2), (3, 5)]:
        ops, mbs = schedule(p, m)
        at = {}
        for t in range(len(ops)):
            for st in range(p):
                if ops[t, st]:
                    assert (ops[t, st], mbs[t, st], st) not in at
                    at[ops[t, st], mbs[t, st], st] = t
        assert len(at) == 2 * m * p
        for i in range(m):
            for st in range(p):
                if st:
                    assert at[FWD, i, st] > at[FWD, i, st - 1]
                if st < p - 1:
                    assert at[BWD, i, st] > at[BWD, i, st + 1]
                assert at[BWD, i, st] > at[FWD, i, st]
        # a stage never holds more than p microbatches' residuals (GPipe: all m)
        assert buffers(p, m)[0] <= min(p, m)


def test_1f1b_refuses_a_loss_that_mixes_the_batch():
    """A loss over batch statistics: each microbatch's gradient would need every
    row, so the head cannot run per microbatch."""
    s = _setup(layers=4)

    def step(params, batch):
        def loss(p):
            h = rs.forward(p, batch["x"])
            return jnp.mean((h - h.mean(0)) ** 2)

        g = jax.grad(loss)(params)
        return jax.tree.map(lambda w, d: w - 0.1 * d, params, g)

    pipe = autoshard.Pipeline(stages=2, microbatches=4, schedule="1f1b")
    forced = autoshard.parallelize(step, mesh=(2, 4), hardware=CPU, pipeline=pipe)
    with pytest.raises(autoshard.PipelineError, match="mixes the examples of a batch"):
        forced.plan(s.state[0], s.batch)
    gpipe = autoshard.Pipeline(stages=2, microbatches=4)
    ok = autoshard.parallelize(step, mesh=(2, 4), hardware=CPU, pipeline=gpipe)
    assert ok.plan(s.state[0], s.batch).pipeline.schedule == "gpipe"


def test_auto_chooses_1f1b_when_memory_binds():
    s = rs.setup(rs.StackConfig(256, 256, 8), 64)
    slow = CPU.with_(flops=2e11, bandwidth=(1e9, 100e9), latency=1e-5)
    free = autoshard.parallelize(s.train_step, mesh=(4, 2), hardware=slow)
    plan = free.plan(s.state, s.batch)
    assert plan.pipeline.schedule == "gpipe"
    gp = plan.pipeline.stage_memory["total"]
    # a budget GPipe's residuals exceed but 1F1B's (at most p microbatches) fit
    tight = autoshard.parallelize(
        s.train_step, mesh=(4, 2), hardware=slow, memory_budget=gp * 0.99
    )
    pl = tight.plan(s.state, s.batch).pipeline
    assert pl is not None and pl.schedule == "1f1b", tight.plan(s.state, s.batch).summary()
    assert pl.stage_memory["total"] <= gp * 0.99


def test_gpt_under_nnx_scan_pipelines():
    """Layer bodies with shapes baked in (attention reshapes) and constants: each
    stage runs the body traced at the microbatch size."""
    s = gpt_scan.setup(gpt_scan.tiny(), 8)
    pipe = autoshard.Pipeline(stages=2, microbatches=4)
    step = autoshard.parallelize(s.train_step, mesh=(2, 4), hardware=CPU, pipeline=pipe)
    out = step(s.state, s.batch)
    ref = jax.jit(s.train_step)(s.state, s.batch)
    assert_close(out[1], ref[1], atol=1e-5)
    assert_close(out[0], ref[0], atol=ADAM_ATOL)
    assert step.plan(s.state, s.batch).pipeline.layers == 2


def test_layers_that_mix_the_batch_are_not_pipelined():
    """Batch statistics inside a layer would differ per microbatch: such a stack is
    not split (forced: an error; the analysis finds no stack)."""
    w = _setup(d=16, layers=4).state[0]["w1"]

    def step(w, batch):
        def loss(w):
            def layer(h, wl):
                return (h - h.mean(0)) @ wl, None

            return jnp.mean(jax.lax.scan(layer, batch["x"], w)[0] ** 2)

        return w - 0.1 * jax.grad(loss)(w)

    args = (w, {"x": jnp.ones((8, 16))})
    full = build_graph(trace(step, args))
    assert stack_loops(full, build_graph(trace(step, micro_args(args, 2)))) == ()
    pipe = autoshard.Pipeline(stages=4, microbatches=2)
    forced = autoshard.parallelize(step, mesh=(4, 2), hardware=CPU, pipeline=pipe)
    with pytest.raises(autoshard.PipelineError, match="no batch statistics"):
        forced.plan(*args)


def test_gpt_loss_head_runs_per_microbatch():
    """The GPT's cross-entropy head (label gathers, per-token reductions, a mean over
    batch and tokens) keeps rows apart: 1F1B can run it one microbatch at a time.
    Batch statistics in the head (above) cannot."""
    s = gpt_scan.setup(gpt_scan.tiny(), 8)
    args = (s.state, s.batch)
    full = build_graph(trace(s.train_step, args))
    micro = build_graph(trace(s.train_step, micro_args(args, 4)))
    fwd, bwd = stack_loops(full, micro)
    head = analyse(full, micro, fwd, bwd)
    assert not isinstance(head, str), head
    names = {full.nodes[i].name for i in head.nodes}
    assert {"scatter-add", "reduce_max"} <= names
    # the head's batch input (the token ids) is sliced per microbatch on dim 0
    assert 0 in head.input_dims
