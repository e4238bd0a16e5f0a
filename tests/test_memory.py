"""Memory-aware planning: the per-device memory model, the budget constraint, and
the error when no plan fits."""

import jax
import pytest
from util import ADAM_ATOL, assert_close

import autoshard
from autoshard.cost_model.memory import dfs_order, live_peak
from autoshard.models import gpt, mlp

CPU = autoshard.Hardware(
    flops=5e10, bandwidth=5e9, latency=2e-5, memory_bandwidth=2e10, reduce_scatter=False
)


def compiled_bytes(step, *args) -> int:
    """Per-device bytes of the compiled program: arguments, outputs that do not reuse
    a donated argument, temporaries."""
    m = step.lower(*args).compile().memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        - m.alias_size_in_bytes
        + m.temp_size_in_bytes
    )


def test_dfs_order_computes_each_result_just_before_it_is_read():
    # op0 -> v0 (big), op1 -> v1, op2: v0 -> v2, op3: v1 -> v3; outputs v2, v3
    produced, consumed = [[0], [1], [2], [3]], [[], [], [0], [1]]
    order = dfs_order(produced, consumed, [2, 3])
    assert order == [0, 2, 1, 3]
    sizes = [10.0, 10.0, 1.0, 1.0]
    program = live_peak(produced, consumed, sizes, {2, 3})
    scheduled = live_peak([produced[i] for i in order], [consumed[i] for i in order], sizes, {2, 3})
    assert (program, scheduled) == (21.0, 12.0)


@pytest.mark.parametrize(
    "name, setup",
    [
        ("mlp", lambda: mlp.setup(mlp.MLPConfig(64, 512, 2), 64)),
        ("gpt", lambda: gpt.setup(gpt.tiny(), 16)),
    ],
)
def test_predicted_memory_is_near_compiled(name, setup):
    s = setup()
    step = autoshard.parallelize(s.train_step, mesh=(8,), hardware=CPU, donate_argnums=0)
    predicted = step.plan(s.state, s.batch).cost.memory["total"]
    compiled = compiled_bytes(step, s.state, s.batch)
    assert predicted == pytest.approx(compiled, rel=0.15), (name, predicted, compiled)


@pytest.fixture(scope="module")
def gpt16():
    return gpt.setup(gpt.tiny(), 16)


def _plan(s, budget):
    step = autoshard.parallelize(
        s.train_step, mesh=(8,), hardware=CPU, donate_argnums=0, memory_budget=budget
    )
    return step, step.plan(s.state, s.batch)


def test_a_generous_budget_changes_nothing(gpt16):
    _, free = _plan(gpt16, None)
    _, generous = _plan(gpt16, 10 * free.cost.memory["total"])
    assert [e.spec for e in generous.inputs] == [e.spec for e in free.inputs]


def test_a_tight_budget_splits_state_and_runs_correctly(gpt16):
    s = gpt16
    _, free = _plan(s, None)
    budget = 0.6 * free.cost.memory["total"]
    step, tight = _plan(s, budget)
    assert tight.cost.memory["total"] <= budget
    split = lambda plan: {e.path for e in plan.inputs if any(e.spec)}  # noqa: E731
    assert len(split(tight)) > len(split(free))
    # parameters and their optimizer moments are split together
    assert any("opt_state" in p for p in split(tight) - split(free))
    assert any("opt_state" not in p for p in split(tight) - split(free))
    assert tight.cost.time >= free.cost.time  # memory is paid for in time
    ref = jax.jit(s.train_step)(s.state, s.batch)
    out = step(jax.tree.map(lambda x: x.copy(), s.state), s.batch)  # donated: copy
    assert_close(out, ref, atol=ADAM_ATOL)


def test_a_budget_no_plan_meets_names_the_least_reachable(gpt16):
    with pytest.raises(autoshard.MemoryBudgetError) as err:
        _plan(gpt16, 100_000)
    msg = str(err.value)
    assert "memory_budget=97.66 KiB" in msg
    assert "The least any plan reaches is" in msg and "Raise memory_budget" in msg


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="memory_budget"):
        autoshard.parallelize(lambda x: x, memory_budget=0)
