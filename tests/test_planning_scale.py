"""Planning at scale: repeated layers share ILP variables, plans persist on disk,
progress is logged, and a solver that runs out of time still returns a plan that fits."""

import logging

import jax
import numpy as np
import pytest
from util import ADAM_ATOL, CPU, assert_close, run_both

import autoshard
from autoshard import progress, search
from autoshard.cost_model.ilp import (
    Copy,
    Edge,
    MemoryRow,
    SharedCost,
    SolverRequest,
    Tie,
    evaluate,
    merge_copies,
    min_memory_bound,
    solve,
)
from autoshard.cost_model.memory import live_sets
from autoshard.mesh import candidate_meshes
from autoshard.mesh_plan import operand_specs, value_specs
from autoshard.models import gpt, mlp
from autoshard.passes import repeats
from autoshard.passes.classes import class_problem, on_mesh, skeleton
from autoshard.passes.graph import Lit, build_graph
from autoshard.passes.liveness import hold_loop_buffers, in_place_operands, materialized
from autoshard.passes.repeats import Collapse, collapse_roots, unit_colours
from autoshard.passes.simplify import decode
from autoshard.passes.trace import trace


@pytest.fixture(scope="module")
def gpt4_graph():
    """A 4-layer GPT's step graph: layers 1 and 2 are copies in the middle."""
    cfg = gpt.GPTConfig(vocab=64, d_model=32, n_heads=4, n_layers=4, seq_len=8, d_ff=64)
    s = gpt.setup(cfg, 8)
    return build_graph(trace(s.train_step, (s.state, s.batch)))


def test_copies_of_a_layer_share_a_colour_and_different_weights_do_not(gpt4_graph):
    g = gpt4_graph
    colours = unit_colours(g)
    by_path = {g.values[v].name: colours[i] for i, v in enumerate(g.inputs)}
    q = [c for p, c in by_path.items() if "attn']['q']['kernel" in p and "params" in p]
    k = [c for p, c in by_path.items() if "attn']['k']['kernel" in p and "params" in p]
    assert len(q) == 4 and len(set(q[1:3])) == 1  # the middle layers' copies match
    assert not set(q) & set(k)  # q and k projections never share


def _refined(g, rounds):
    """Colour refinement spelled out with tuples (what `unit_colours` computes with
    array hashes): an operation's colour, its operands' in order, its readers'."""
    consumers, own = g.consumers(), repeats._Own()
    sources = [*g.inputs, *(v for v, _ in g.consts)]
    val = dict.fromkeys(range(len(g.values)), 0)
    val.update(zip(sources, repeats._Wiring(g).src0, strict=True))
    node = [own(g, n) for n in g.nodes]
    reads = [sorted(consumers.get(v, ())) for v in range(len(g.values))]
    for _ in range(rounds):
        node = [
            hash(
                (
                    node[n.id],
                    tuple(("lit", r.shape) if isinstance(r, Lit) else val[r] for r in n.inputs),
                    tuple(sorted((node[c], p) for o in n.outputs for c, p in reads[o])),
                )
            )
            for n in g.nodes
        ]
        for v in sources:
            val[v] = hash((val[v], tuple(sorted((node[c], p) for c, p in reads[v]))))
        val.update({o: (node[n.id], k) for n in g.nodes for k, o in enumerate(n.outputs)})
    return [*(val[v] for v in sources), *node]


def _partition(colours):
    first: dict = {}
    return [first.setdefault(c, i) for i, c in enumerate(colours)]


@pytest.mark.parametrize("rounds", [1, 3, repeats.REFINE_ROUNDS])
def test_array_colour_refinement_finds_the_classes_of_the_tuple_one(gpt4_graph, rounds):
    g = gpt4_graph
    want = _partition(_refined(g, rounds))
    assert _partition(unit_colours(g, rounds)) == want
    assert len(set(want)) < len(want)  # copies exist, and not everything is one class
    assert len(set(want)) > len(set(_partition(_refined(g, 0))))


def test_collapsed_plan_matches_the_full_ilp_and_is_smaller(gpt4_graph):
    g = gpt4_graph
    meshes = candidate_meshes((8,), jax.devices(), CPU)
    full, _ = search.search(g, meshes, CPU, 60.0, None, collapse=False)
    shared, _ = search.search(g, meshes, CPU, 60.0, None, collapse=True)
    assert full.result.status == shared.result.status == "optimal"
    assert shared.collapse.classes < len(shared.problem.roots)
    assert shared.result.num_variables < full.result.num_variables
    assert shared.result.objective <= full.result.objective * 1.02
    # the collapsed choice is a plan of the full problem, priced the same
    obj, bad = evaluate(full.request, shared.result.choice)
    assert not bad and obj == pytest.approx(shared.result.objective)


def test_collapsed_request_prices_every_choice_like_the_full_one():
    rng = np.random.default_rng(0)
    costs = tuple(rng.random(3) for _ in range(4))
    cls = np.arange(3)
    edges = (
        Edge(0, 1, cls, cls, rng.random((3, 3))),
        Edge(2, 3, cls, cls, rng.random((3, 3))),
        Edge(1, 2, cls, cls, rng.random((3, 3))),
    )
    req = SolverRequest(
        costs,
        edges,
        (Tie(0, 3, cls, cls),),
        shared=(SharedCost(0.5, ((1, (1,)), (3, (2,)))),),
        memory=(MemoryRow(((0, rng.random(3)), (2, rng.random(3))), 1.0),),
        memory_budget=10.0,
    )
    col = Collapse(np.array([0, 1, 0, 1]))  # nodes 0, 2 and nodes 1, 3 are copies
    small = col.request(req)
    for a in range(3):
        for b in range(3):
            full_obj, full_bad = evaluate(req, col.expand((a, b)))
            obj, bad = evaluate(small, (a, b))
            assert obj == pytest.approx(full_obj) and bool(bad) == bool(full_bad)


def test_plans_persist_on_disk(tmp_path):
    s = mlp.setup(mlp.MLPConfig(32, 64, 2), 1024)  # data parallel
    first = autoshard.parallelize(s.train_step, mesh=(2, 4), hardware=CPU, cache_dir=tmp_path)
    plan = first.plan(s.state, s.batch)
    assert first.solve_count == 1 and list(tmp_path.glob("*.plan"))
    again = autoshard.parallelize(s.train_step, mesh=(2, 4), hardware=CPU, cache_dir=tmp_path)
    loaded = again.plan(s.state, s.batch)
    assert again.solve_count == 0
    assert loaded.in_specs == plan.in_specs and loaded.cost == plan.cost
    assert any(any(e.spec) for e in loaded.inputs)  # a plan that splits something
    out, ref = again(s.state, s.batch), jax.jit(s.train_step)(s.state, s.batch)
    assert_close(out, ref, atol=ADAM_ATOL)
    # other options are another plan
    other = autoshard.parallelize(s.train_step, mesh=(8,), hardware=CPU, cache_dir=tmp_path)
    other.plan(s.state, s.batch)
    assert other.solve_count == 1
    off = autoshard.parallelize(s.train_step, mesh=(2, 4), hardware=CPU, cache=False)
    assert off.cache_dir is None


def test_progress_and_replan_are_logged(caplog, monkeypatch):
    monkeypatch.setattr(progress, "PROGRESS_AFTER", 0.0)
    s = mlp.setup(mlp.tiny(), batch_size=8)
    caplog.set_level(logging.INFO, logger="autoshard")
    step = autoshard.parallelize(s.train_step, mesh=None, hardware=CPU)
    step.plan(s.state, s.batch)
    text = caplog.text
    assert "mesh (8,): solving" in text and "best so far" in text
    caplog.clear()
    small = jax.tree.map(lambda x: x[:4], s.batch)
    step.plan(s.state, small)
    lines = [r.getMessage() for r in caplog.records if "re-planned" in r.getMessage()]
    assert len(lines) == 1 and "[8, " in lines[0] and "[4, " in lines[0]
    caplog.clear()
    quiet = autoshard.parallelize(s.train_step, mesh=(8,), hardware=CPU, verbose=False)
    quiet.plan(s.state, s.batch)
    assert not caplog.records


def test_timed_out_solver_still_returns_a_plan_within_budget():
    s = mlp.setup(mlp.MLPConfig(64, 2048, 2), 8)
    g = build_graph(trace(s.train_step, (s.state, s.batch)))
    mesh = candidate_meshes((8,), jax.devices(), CPU)[0]
    budget = 1.05 * _least_plan_peak(g, mesh)  # a plan fits; the solver gets no time
    opts = dict(mesh=(8,), hardware=CPU, memory_budget=budget, time_limit=1e-9)
    plan = autoshard.parallelize(s.train_step, **opts).plan(s.state, s.batch)
    assert plan.cost.memory["total"] <= budget * 1.000001
    assert any(any(e.spec) for e in plan.inputs)  # a plan that splits something
    out, ref, _ = run_both(s.train_step, s.state, s.batch, **opts)
    assert_close(out, ref, atol=ADAM_ATOL)


def test_compute_floor_bounds_every_plan_from_below(gpt4_graph):
    g = gpt4_graph
    infos = search.op_infos(g)
    for shape in ((8,), (2, 4)):
        mesh = candidate_meshes(shape, jax.devices(), CPU)[0]
        mp, _ = search.search(g, [mesh], CPU, 60.0, None)
        desc = search.MeshDesc(shape, tuple(mesh.axis_names))
        floor = search.compute_floor(g, infos, desc, CPU)
        assert 0 < floor <= mp.result.objective * (1 + 1e-9)


class _Shape:
    def __init__(self, *sizes):
        self.axis_sizes = sizes


def test_many_devices_build_a_bounded_number_of_meshes(monkeypatch):
    shapes = search.candidate_shapes(1024)
    meshes = [_Shape(*s) for s in shapes]
    floors = [float(i % 7) for i in range(len(meshes))]
    order = search.mesh_order(meshes, floors)
    ranks = [len(meshes[i].axis_sizes) for i in order]
    assert len(shapes) == 46 and ranks == [1] + [2] * 6 + [3] * 3
    # per number of axes, the lowest floors, lowest first
    three = [i for i in order if len(meshes[i].axis_sizes) == 3]
    rest = [i for i in range(len(meshes)) if len(shapes[i]) == 3 and i not in three]
    assert [floors[i] for i in three] == sorted(floors[i] for i in three)
    assert max(floors[i] for i in three) <= min(floors[i] for i in rest)
    # equal floors (large models: every operation's cheapest strategy is its fully split
    # compute): the most even shapes first, and those are the ones built
    shapes64 = search.candidate_shapes(64)
    equal = search.mesh_order([_Shape(*s) for s in shapes64], [1.0] * len(shapes64))
    two = [shapes64[i] for i in equal if len(shapes64[i]) == 2]
    assert two == [(8, 8), (4, 16), (16, 4), (2, 32), (32, 2)]
    assert [shapes64[i] for i in equal if len(shapes64[i]) == 3][0] == (4, 4, 4)
    monkeypatch.setattr(search, "MESHES_PER_RANK", (1, 2, 0))
    assert [len(meshes[i].axis_sizes) for i in search.mesh_order(meshes, floors)] == [1, 2, 2]


def test_a_mesh_no_plan_fits_on_is_ruled_out_by_its_memory_floor(gpt4_graph):
    g = gpt4_graph
    mesh = candidate_meshes((8,), jax.devices(), CPU)[0]
    free, _ = search.search(g, [mesh], CPU, 60.0, None)
    peak = free.memory()["total"]
    mp = search.solve_on_mesh(g, mesh, CPU, 60.0, peak / 50, colours=unit_colours(g))
    assert mp.result.status == "infeasible" and mp.memory_floor > peak / 50
    least, _ = search.least_memory(mp)
    assert mp.memory_floor <= least * (1 + 1e-4)  # a lower bound on what plans reach
    # the least-memory plan the cutting planes kept (for the error message) is a plan
    assert search._peak(mp.liveness, mp.problem, mp.picks) >= least * (1 - 1e-9)
    # just below the floor no plan fits either, and the floor alone says so
    below = search.solve_on_mesh(g, mesh, CPU, 60.0, mp.memory_floor * 0.999)
    assert below.result.status == "infeasible" and below.memory_floor is not None


def _least_plan_peak(g, mesh, colours=None) -> float:
    """Predicted memory of the least-memory plan the memory cutting planes find."""
    mp = search.solve_on_mesh(g, mesh, CPU, 60.0, 1.0, colours=colours)  # 1 byte: none fits
    assert mp.result.status == "infeasible"
    return search._peak(mp.liveness, mp.problem, mp.picks)


def test_a_solve_that_times_out_falls_back_to_a_plan_within_the_budget(gpt4_graph):
    g = gpt4_graph
    mesh = candidate_meshes((2, 4), jax.devices(), CPU)[0]
    colours = unit_colours(g)
    budget = 1.05 * _least_plan_peak(g, mesh, colours)
    mp = search.solve_on_mesh(g, mesh, CPU, 1e-9, budget, colours=colours)  # no time to solve
    assert mp.least is not None and mp.result.status == "fallback"
    assert mp.memory()["total"] <= budget * (1 + 1e-6)
    assert any(any(ax for ax in s) for s in mp.layout().value_specs if s)  # it splits


@pytest.mark.parametrize("shape", [(8,), (2, 4)])
def test_class_level_request_equals_the_per_operation_one_collapsed(gpt4_graph, shape):
    """The mesh's work done once per class of copies gives the request that walking
    every operation and summing the copies gives: same classes, costs, edges, ties and
    fused latencies, and the same optimum."""
    g = gpt4_graph
    infos, colours = search.op_infos(g), unit_colours(g)
    desc = search.MeshDesc(shape, ("a", "b")[: len(shape)])
    hw = CPU.for_mesh(shape)
    sk = skeleton(g, infos, colours)
    problem, small, col = class_problem(sk, g, on_mesh(sk, desc, hw), 60.0)
    full_problem, full, _ = search._per_operation(g, desc, hw, 60.0, None, infos)
    groups = collapse_roots(colours, full_problem.roots, full_problem.units)
    ref = groups.request(full)
    assert col.classes < len(problem.roots)  # copies were found
    assert np.array_equal(col.node_class, groups.node_class)
    assert problem.roots == full_problem.roots
    follows = zip(problem.follow, full_problem.follow, strict=True)
    assert all(np.array_equal(a, b) for a, b in follows)
    for a, b in zip(small.node_costs, ref.node_costs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12)
    assert len(small.edges) == len(ref.edges) and len(small.ties) == len(ref.ties)
    for a, b in zip(small.edges, ref.edges, strict=True):
        assert (a.u, a.v) == (b.u, b.v) and np.array_equal(a.u_class, b.u_class)
        np.testing.assert_allclose(a.cost, b.cost, rtol=1e-12)
    assert [s.members for s in small.shared] == [s.members for s in ref.shared]
    mine, theirs = solve(small), solve(ref)
    assert mine.objective == pytest.approx(theirs.objective, rel=1e-9)
    obj, bad = evaluate(full, col.expand(mine.choice))  # a plan of the full problem
    assert not bad and obj == pytest.approx(mine.objective, rel=1e-9)


def test_live_intervals_give_the_live_sets_bytes(gpt4_graph):
    """Liveness keeps one (first, last) step per value; the bytes alive after every
    step are those of the per-step live sets."""
    g = gpt4_graph
    mp, _ = search.search(g, candidate_meshes((2, 4), jax.devices(), CPU), CPU, 60.0, None)
    live = mp.liveness
    made = [list(g.nodes[i].outputs) for i in live.order]
    read = [[r for r in g.nodes[i].inputs if not isinstance(r, Lit)] for i in live.order]
    hold_loop_buffers(g, live.order, made, read)
    keep = materialized(g)
    reuse = in_place_operands(g, keep)
    sets = live_sets(made, read, live.outputs, keep, [reuse[i] for i in live.order], live.outputs)
    b = live.value_bytes(value_specs(mp.problem, mp.picks))
    assert np.any(b != live.value_bytes([None] * len(g.values)))  # the plan splits
    assert np.array_equal(live.live_bytes(b), [b[s].sum() for s in sets])
    peak = int(np.argmax(live.live_bytes(b)))
    assert live.live_at(peak).tolist() == sets[peak]


def test_memory_rows_count_resharded_copies_exactly(gpt4_graph):
    """A memory row at a step, resharded copies included, equals the bytes the plan's
    liveness profile has there (a gathered parameter kept for the backward pass, say),
    for the cost-optimal plan and for arbitrary choices."""
    g = gpt4_graph
    mesh = candidate_meshes((2, 4), jax.devices(), CPU)[0]
    mp = search.solve_on_mesh(g, mesh, CPU, 60.0)
    problem, live = mp.problem, mp.liveness
    rng = np.random.default_rng(0)
    choices = [mp.result.choice] + [
        tuple(int(rng.integers(len(problem.units[r]))) for r in problem.roots) for _ in range(4)
    ]
    with_copies = 0
    for choice in choices:
        picks = decode(problem, choice)
        args, full = live.profile(value_specs(problem, picks), operand_specs(problem, picks))
        _, bare = live.profile(value_specs(problem, picks))
        steps = {int(np.argmax(full)), *rng.integers(live.steps, size=6).tolist()}
        for t in sorted(steps):
            row = live.row(t, mp.node_of_root)
            assert row.value(choice) == pytest.approx(args + full[t], rel=1e-9)
            with_copies += bool(full[t] > bare[t])
    assert with_copies >= 3  # copies were alive at some of these steps


def test_a_resharded_copy_in_a_memory_row_binds_the_solver():
    """Producer node 0 makes a value sharded (0) or replicated (1); nodes 1 and 2 read
    it before and after the row's step, wanting it replicated (0) or sharded (1). A
    replicated copy of 10 bytes is alive when both readers want it replicated and the
    producer shards it: the cheapest plan without the row's copy does exactly that."""
    want = np.array([1.0, 0.0])  # reader strategy 0 wants the replicated layout
    made = np.array([0.0, 1.0])  # producer strategy 1 makes it
    copy = Copy(10.0, ((((0, -made), (1, want), (2, want)), -1.0),))
    row = MemoryRow(((0, np.array([2.0, 8.0])),), copies=(copy,))
    costs = (np.array([0.0, 5.0]), np.array([0.0, 1.0]), np.array([0.0, 1.0]))
    assert row.value((0, 0, 0)) == 12.0 and row.value((0, 1, 0)) == 2.0
    assert row.value((1, 0, 0)) == 8.0
    free = solve(SolverRequest(costs))
    assert free.choice == (0, 0, 0)
    held = solve(SolverRequest(costs, memory=(row,), memory_budget=9.0))
    assert held.choice in ((0, 1, 0), (0, 0, 1)) and held.objective == 1.0
    assert min_memory_bound(SolverRequest(costs, memory=(row,)))[1:] == (2.0, 2.0)
    # copies of repeated layers with equal witnesses are one variable, bytes summed
    assert merge_copies([copy, copy])[0].nbytes == 20.0


def test_a_mesh_too_large_to_solve_is_not_tried_once_another_was_ruled_out(
    gpt4_graph, monkeypatch
):
    """With no plan found yet, the first mesh is solved whatever its size; once it is
    ruled out by the budget, a mesh above LP_MAX_STRATEGIES is not built, and the
    error says which mesh was not tried and how to plan on it."""
    g = gpt4_graph
    meshes = candidate_meshes(None, jax.devices(), CPU)
    shapes = [tuple(m.axis_sizes) for m in meshes]
    i8, i24 = shapes.index((8,)), shapes.index((2, 4))
    monkeypatch.setattr(search, "MESHES_PER_RANK", (1, 1, 0))
    desc = search.MeshDesc((2, 4), ("a", "b"))
    n = search.strategy_variables(g, search.op_infos(g), desc, CPU, unit_colours(g))
    monkeypatch.setattr(search, "LP_MAX_STRATEGIES", n - 1)  # (2, 4) is too large
    with pytest.raises(autoshard.MemoryBudgetError) as err:
        search.search(g, [meshes[i8], meshes[i24]], CPU, 60.0, 1.0)  # 1 byte: none fits
    msg = str(err.value)
    assert "Mesh (2, 4) was not tried" in msg and "pass mesh=" in msg
    assert "least memory found for any plan" in msg and "mesh (8,)" in msg
