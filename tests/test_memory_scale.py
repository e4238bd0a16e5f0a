"""Memory predictions that hold at size: scans' stacked residuals, results written in
place, against what XLA compiled (compile-only, from ShapeDtypeStructs)."""

import pytest
from util import CPU

import autoshard
from autoshard.cost_model.memory import live_sets
from autoshard.models import gpt, gpt_scan
from autoshard.models.common import abstract_setup


def test_an_in_place_result_takes_its_dying_operand_s_buffer():
    # op0 -> v0, op1: v0 -> v1 (elementwise, v0's last reader), op2: v1 -> v2
    produced, consumed = [[0], [1], [2]], [[], [0], [1]]
    plain = live_sets(produced, consumed, {2})
    in_place = live_sets(produced, consumed, {2}, reuse=[None, 0, None])
    assert plain[1] == [0, 1] and in_place[1] == [1]
    # an operand read again later keeps its own buffer
    produced, consumed = [[0], [1], [2]], [[], [0], [0, 1]]
    assert live_sets(produced, consumed, {2}, reuse=[None, 0, None])[1] == [0, 1]


def test_a_scanned_model_s_stacked_residuals_are_predicted():
    """Six layers under lax.scan: the forward loop saves each layer's activations,
    stacked [6, ...], for the backward loop; they fill most of the temporaries.
    Without them the prediction was about half the compiled figure."""
    config = gpt.GPTConfig(vocab=512, d_model=128, n_heads=2, n_layers=6, seq_len=128, d_ff=512)
    s = abstract_setup(gpt_scan.setup, config, 16)
    step = autoshard.parallelize(s.train_step, mesh=(2, 4), hardware=CPU, donate_argnums=0)
    plan = step.plan(s.state, s.batch)
    assert any(e.spec for e in plan.inputs)  # the plan splits something
    compiled = step.lower(s.state, s.batch).compile()
    measured = autoshard.compiled_memory(compiled)
    assert compiled.memory_analysis().temp_size_in_bytes > 2 * plan.cost.memory["arguments"]
    assert plan.cost.memory["total"] == pytest.approx(measured, rel=0.15)
