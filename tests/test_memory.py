"""Memory-aware planning: the per-device memory model against what XLA compiled, the
budget constraint (ZeRO/FSDP when memory demands it), and the error when no plan fits."""

import jax
import pytest
from util import ADAM_ATOL, CPU, assert_close, compiled_bytes, compiled_vs_predicted

import autoshard
from autoshard import remat
from autoshard.cost_model.memory import dfs_order, live_peak
from autoshard.models import gpt, mlp
from autoshard.passes.graph import build_graph
from autoshard.passes.trace import trace

# the same, with reduce-scatters in the strategy space (autoshard emits them itself)
CPU_RS = CPU.with_(reduce_scatter=True)


def _split(plan, kind):
    return {e.path for e in plan.inputs if any(e.spec) and kind in e.path}


def test_dfs_order_computes_each_result_just_before_it_is_read():
    # op0 -> v0 (big), op1 -> v1, op2: v0 -> v2, op3: v1 -> v3; outputs v2, v3
    produced, consumed = [[0], [1], [2], [3]], [[], [], [0], [1]]
    order = dfs_order(produced, consumed, [2, 3])
    assert order == [0, 2, 1, 3]
    sizes = [10.0, 10.0, 1.0, 1.0]
    program = live_peak(produced, consumed, sizes, {2, 3})
    scheduled = live_peak([produced[i] for i in order], [consumed[i] for i in order], sizes, {2, 3})
    assert (program, scheduled) == (21.0, 12.0)


def test_dfs_order_leaves_out_operations_no_output_needs():
    # op2 reads v0 but its result v2 reaches no output: XLA removes it, so it must
    # not keep v0 alive past op1
    produced, consumed = [[0], [1], [2]], [[], [0], [0]]
    assert dfs_order(produced, consumed, [1]) == [0, 1]


@pytest.mark.parametrize(
    "setup, hw",
    [
        (lambda: mlp.setup(mlp.MLPConfig(64, 512, 2), 64), CPU),
        (lambda: mlp.setup(mlp.MLPConfig(256, 256, 2), 1024), CPU_RS),
        (lambda: gpt.setup(gpt.tiny(), 16), CPU),
    ],
    ids=["mlp-data-parallel", "mlp-fsdp-like", "gpt"],
)
def test_predicted_memory_is_near_compiled(setup, hw):
    s = setup()
    step = autoshard.parallelize(s.train_step, mesh=(8,), hardware=hw, donate_argnums=0)
    predicted = step.plan(s.state, s.batch).cost.memory["total"]
    compiled = compiled_bytes(step, s.state, s.batch)
    assert predicted == pytest.approx(compiled, rel=0.15), (predicted, compiled)


@pytest.fixture(scope="module")
def gpt32():
    s = gpt.setup(gpt.tiny(), 32)
    free = autoshard.parallelize(s.train_step, mesh=(8,), hardware=CPU_RS, donate_argnums=0)
    return s, free.plan(s.state, s.batch)


def _step(s, budget, hw=CPU_RS):
    return autoshard.parallelize(
        s.train_step, mesh=(8,), hardware=hw, donate_argnums=0, memory_budget=budget
    )


def test_a_generous_budget_changes_nothing(gpt32):
    s, free = gpt32
    generous = _step(s, 10 * free.cost.memory["total"]).plan(s.state, s.batch)
    assert [e.spec for e in generous.inputs] == [e.spec for e in free.inputs]


def test_a_tight_budget_gives_fsdp_and_fits(gpt32):
    """Below the data-parallel footprint: parameters and their moments split over the
    data axis, gathered before use, gradients reduce-scattered (ZeRO-3/FSDP)."""
    s, free = gpt32
    assert not _split(free, "params")  # data parallel: everything replicated
    budget = 0.75 * free.cost.memory["total"]
    step = _step(s, budget)
    plan = step.plan(s.state, s.batch)
    assert plan.cost.memory["total"] <= budget
    assert _split(plan, "params") and _split(plan, "opt_state")
    assert plan.cost.time > free.cost.time  # memory is paid for in time
    compiled, predicted = compiled_vs_predicted(step, s.state, s.batch)
    assert compiled == predicted
    assert {"all-gather", "reduce-scatter"} <= set(compiled)
    measured = compiled_bytes(step, s.state, s.batch)
    assert measured <= budget
    assert plan.cost.memory["total"] == pytest.approx(measured, rel=0.15)
    ref = jax.jit(s.train_step)(s.state, s.batch)
    out = step(jax.tree.map(lambda x: x.copy(), s.state), s.batch)  # donated: copy
    assert_close(out, ref, atol=ADAM_ATOL)


def test_a_mild_budget_splits_optimizer_state_first(gpt32):
    """ZeRO-1/2-like: the moments (twice the parameters) go first."""
    s, free = gpt32
    budget = 0.8 * free.cost.memory["total"]
    step = _step(s, budget)
    plan = step.plan(s.state, s.batch)
    assert plan.cost.memory["total"] <= budget
    assert len(_split(plan, "opt_state")) > 2 * len(_split(plan, "params"))
    assert compiled_bytes(step, s.state, s.batch) <= budget


def test_the_default_budget_is_the_device_memory_less_headroom(gpt32):
    s, free = gpt32
    memory = 0.8 * free.cost.memory["total"] / (1 - autoshard.api.MEMORY_HEADROOM)
    step = _step(s, None, hw=CPU_RS.with_(memory=memory))
    plan = step.plan(s.state, s.batch)
    assert plan.cost.memory["total"] <= memory * (1 - autoshard.api.MEMORY_HEADROOM)
    assert _split(plan, "opt_state")
    assert compiled_bytes(step, s.state, s.batch) <= memory


def test_a_budget_no_plan_meets_names_the_least_found_and_what_fills_it(gpt32):
    s, free = gpt32
    graph = build_graph(trace(s.train_step, (s.state, s.batch)))
    # above the floor of every mesh (all split 8 ways), which no plan reaches: searched
    donated = frozenset(range(len(jax.tree.leaves(s.state))))  # donate_argnums=0
    budget = 1.001 * remat.memory_floor(graph, donated, 8)
    with pytest.raises(autoshard.MemoryBudgetError) as err:
        _step(s, budget).plan(s.state, s.batch)
    msg = str(err.value)
    assert "no plan fits memory_budget=" in msg and "on 8 devices" in msg
    least = msg.split("The least memory found for any plan is ")[1].split(" per device")[0]
    number, unit = least.split()
    assert float(number) * {"KiB": 2**10, "MiB": 2**20}[unit] > budget
    assert "intermediates" in msg and "optimizer state" in msg and "largest:" in msg
    assert "Raise memory_budget" in msg


def test_budget_must_be_positive():
    with pytest.raises(ValueError, match="memory_budget"):
        autoshard.parallelize(lambda x: x, memory_budget=0)


def test_prefetch_overlap_discounts_parameter_gathers(gpt32):
    """FSDP's prefetched all-gathers hide behind compute: the same budget costs less
    time when the hardware overlaps them, and nothing else changes."""
    s, free = gpt32
    budget = 0.75 * free.cost.memory["total"]
    plain = _step(s, budget).plan(s.state, s.batch)
    hidden = _step(s, budget, hw=CPU_RS.with_(prefetch_overlap=0.9)).plan(s.state, s.batch)
    assert hidden.cost.time < plain.cost.time
    assert hidden.cost.memory["total"] <= budget


def test_mlp_under_a_budget_fits_and_is_predicted():
    s = mlp.setup(mlp.MLPConfig(512, 256, 4), 512)
    free = _step(s, None).plan(s.state, s.batch)
    budget = 0.8 * free.cost.memory["total"]
    step = _step(s, budget)
    plan = step.plan(s.state, s.batch)
    assert plan.cost.memory["total"] <= budget
    assert len(_split(plan, "opt_state")) > len(_split(plan, "params"))
    measured = compiled_bytes(step, s.state, s.batch)
    assert measured <= budget
    assert plan.cost.memory["total"] == pytest.approx(measured, rel=0.15)
    ref = jax.jit(s.train_step)(s.state, s.batch)
    out = step(jax.tree.map(lambda x: x.copy(), s.state), s.batch)
    assert_close(out, ref, atol=ADAM_ATOL)
