"""Rematerialisation of layer stacks: the jaxpr rewrite keeps numerics and saves less,
and the planner chooses it when (and only when) the memory budget binds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from util import ADAM_ATOL, CPU, assert_close, assert_sharded, compiled_bytes

import autoshard
from autoshard import remat
from autoshard.models import gpt, gpt_scan
from autoshard.models import residual_stack as rs
from autoshard.passes import remat as rewrite
from autoshard.passes.graph import build_graph
from autoshard.passes.trace import trace


def _run(closed):
    return jax.jit(lambda *a: jax.core.eval_jaxpr(closed.jaxpr, closed.consts, *a))


@pytest.fixture(scope="module")
def stack():
    return rs.setup(rs.StackConfig(64, 256, 8), 256)


def test_rewrite_saves_less_and_keeps_numerics():
    s = rs.setup(rs.StackConfig(32, 64, 4), 32)
    t = trace(s.train_step, (s.state, s.batch))
    args = jax.tree_util.tree_leaves((s.state, s.batch))
    orig = _run(t.jaxpr).lower(*args).compile()
    ref = orig(*args)
    for policy in rewrite.POLICIES:
        new, info = rewrite.rematerialize(t.jaxpr, policy)
        assert info.layers == (4,) and info.saved_after < info.saved_before
        # the forward scan saves [4, ...] stacks of what the policy keeps, nothing else
        fwd = next(e for e in new.jaxpr.eqns if e.primitive.name == "scan")
        assert sum(v.aval.size * 4 for v in fwd.outvars[1:]) == info.saved_after
        compiled = _run(new).lower(*args).compile()
        for a, b in zip(compiled(*args), ref, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
        temp = compiled.memory_analysis().temp_size_in_bytes
        assert temp < orig.memory_analysis().temp_size_in_bytes, policy


def _plain_step(w, x):
    return w - 0.1 * jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w) ** 2))(w)


def test_step_without_layer_stack_is_left_alone():
    args = (jnp.ones((16, 32)), jnp.ones((64, 16)))
    assert remat.variant(trace(_plain_step, args), remat.NOTHING) is None
    step = autoshard.parallelize(_plain_step, mesh=(8,), hardware=CPU, remat="layers")
    with pytest.warns(UserWarning, match="no lax.scan/nnx.scan layer stack"):
        assert step.plan(*args).remat is None


def test_bad_option_is_a_clear_error():
    with pytest.raises(ValueError, match="remat='always'"):
        autoshard.parallelize(lambda x: x, remat="always")


def test_tight_budget_chooses_remat_and_fits_compiled(stack):
    s = stack
    ref = jax.jit(s.train_step)(s.state, s.batch)
    # the state donated: outputs of a step that is not are held whole (their own
    # buffers), where XLA packs this tiny model's temporaries into them
    kw = dict(mesh=(8,), hardware=CPU, donate_argnums=0)
    free = autoshard.parallelize(s.train_step, remat=None, **kw)
    without = free.plan(s.state, s.batch)
    budget = 0.6 * without.cost.memory["total"]
    with pytest.raises(autoshard.MemoryBudgetError):
        autoshard.parallelize(s.train_step, remat=None, memory_budget=budget, **kw).plan(
            s.state, s.batch
        )
    step = autoshard.parallelize(s.train_step, memory_budget=budget, **kw)
    plan = step.plan(s.state, s.batch)
    assert plan.remat is not None and plan.remat.time_without is None
    assert plan.remat.layers == (8,) and "remat: " in plan.summary()
    assert_sharded(plan)
    predicted, compiled = plan.cost.memory["total"], compiled_bytes(step, s.state, s.batch)
    assert compiled <= budget < compiled_bytes(free, s.state, s.batch)
    assert predicted == pytest.approx(compiled, rel=0.15), (predicted, compiled)
    state = jax.tree.map(lambda x: x.copy(), s.state)  # donated: a copy
    assert_close(step(state, s.batch), ref, ADAM_ATOL)


def test_generous_budget_plans_without_remat(stack, tmp_path):
    s = stack
    step = autoshard.parallelize(s.train_step, mesh=(8,), hardware=CPU)
    plan = step.plan(s.state, s.batch)
    assert plan.remat is None and step.solve_count == 1
    forced = autoshard.parallelize(s.train_step, mesh=(8,), hardware=CPU, remat="layers")
    fp = forced.plan(s.state, s.batch)
    assert fp.remat.policy == remat.NOTHING
    assert fp.cost.compute_time > plan.cost.compute_time  # the recomputed forward pass
    fp.save(str(tmp_path / "plan.json"))
    assert autoshard.Plan.load(str(tmp_path / "plan.json")).remat == fp.remat


def test_scanned_gpt_nnx_scan_is_rematerialised():
    s = gpt_scan.setup(gpt_scan.tiny(), 16)
    step = autoshard.parallelize(s.train_step, mesh=(2, 4), hardware=CPU, remat="dots_saveable")
    plan = step.plan(s.state, s.batch)
    assert plan.remat.policy == remat.DOTS and plan.remat.layers == (2,)
    assert plan.remat.saved_after < plan.remat.saved_before


def test_memory_floor_is_below_every_plan_and_skips_forms_that_cannot_fit(stack, monkeypatch):
    s = stack
    kw = dict(mesh=(8,), hardware=CPU)
    traced = trace(s.train_step, (s.state, s.batch))
    forms = {None: traced}
    for policy in rewrite.POLICIES:
        forms[policy] = remat.variant(traced, policy)[0]
    floors = {k: remat.memory_floor(build_graph(t), frozenset(), 8) for k, t in forms.items()}
    totals = {}
    for k in forms:
        plan = autoshard.parallelize(s.train_step, remat=k, **kw).plan(s.state, s.batch)
        totals[k] = plan.cost.memory["total"]
        assert 0 < floors[k] <= totals[k], (k, floors[k], totals[k])
    assert floors[None] > floors[remat.DOTS] > floors[remat.NOTHING]
    # a budget the traced step cannot fit on any mesh of 8, whatever its plan, but the
    # dots_saveable form does: the traced step is not planned at all, the plan is the same
    budget = (floors[None] + totals[remat.DOTS]) / 2
    if not totals[remat.DOTS] < budget < floors[None]:
        pytest.skip("the stack's sizes leave no such budget")
    searched = []
    real = autoshard.search.search

    def counting(graph, *a, **k):
        searched.append(graph)
        return real(graph, *a, **k)

    monkeypatch.setattr(autoshard.search, "search", counting)
    plan = autoshard.parallelize(s.train_step, memory_budget=budget, **kw).plan(s.state, s.batch)
    assert plan.remat.policy == remat.DOTS and plan.remat.time_without is None
    assert plan.cost.memory["total"] <= budget
    n_screened = len(searched)
    searched.clear()
    monkeypatch.setattr(remat, "memory_floor", lambda *a: 0.0)  # no screen: as before
    step = autoshard.parallelize(s.train_step, memory_budget=budget, **kw)
    assert step.plan(s.state, s.batch).cost.time == plan.cost.time
    assert len(searched) == n_screened + 1  # the traced step, planned in vain


def test_a_step_below_its_memory_floor_is_refused_without_a_search(monkeypatch):
    """An unrolled step (nothing for remat to rewrite) whose memory floor on any mesh
    of 8 is above the budget gets MemoryBudgetError naming the floor and the fixes,
    and no mesh is searched."""
    s = gpt.setup(gpt.GPTConfig(vocab=64, d_model=32, n_heads=4, n_layers=2, seq_len=8), 8)
    floor = remat.memory_floor(build_graph(trace(s.train_step, (s.state, s.batch))), frozenset(), 8)

    def no_search(*a, **k):
        raise AssertionError("searched")

    monkeypatch.setattr(autoshard.search, "search", no_search)
    step = autoshard.parallelize(s.train_step, hardware=CPU, memory_budget=0.9 * floor)
    with pytest.raises(autoshard.MemoryBudgetError) as err:
        step.plan(s.state, s.batch)
    msg = str(err.value)
    assert f"needs at least {remat._size(floor)} per device" in msg
    assert "on 8 devices" in msg and "donate_argnums=0" in msg and "lax.scan" in msg
