"""A plan found on one mesh is a cutoff for the next: HiGHS prunes what cannot beat
it, a mesh with no cheaper plan is skipped, and one with a cheaper plan keeps it."""

import jax
import numpy as np
import pytest
from util import CPU

from autoshard import search
from autoshard.cost_model.ilp import Edge, MemoryRow, SolverRequest, solve
from autoshard.mesh import candidate_meshes
from autoshard.models import gpt
from autoshard.passes.graph import build_graph
from autoshard.passes.repeats import unit_colours
from autoshard.passes.trace import trace


def test_cutoff_prunes_plans_that_do_not_beat_it():
    edge = Edge(0, 1, np.array([0, 1]), np.array([0, 1]), np.array([[0.0, 5.0], [5.0, 0.0]]))
    row = MemoryRow(((0, np.array([4.0, 1.0])), (1, np.array([4.0, 1.0]))))
    # optimum within 5 bytes: (1, 1) at 2 + 3 = 5 (both cheap ones cost 2 but need 8 bytes)
    req = SolverRequest(
        (np.array([1.0, 2.0]), np.array([1.0, 3.0])), (edge,), memory=(row,), memory_budget=5.0
    )
    free = solve(req)
    assert free.status == "optimal" and free.choice == (1, 1) and free.objective == 5.0
    better = solve(SolverRequest(req.node_costs, req.edges, memory=req.memory, memory_budget=5.0,
                                 cutoff=6.0))  # fmt: skip
    assert better.status == "optimal" and better.choice == (1, 1)
    worse = solve(SolverRequest(req.node_costs, req.edges, memory=req.memory, memory_budget=5.0,
                                cutoff=4.5))  # fmt: skip
    assert worse.status == "cutoff" and worse.objective == 4.5


def test_a_mesh_that_cannot_beat_the_best_is_skipped_and_one_that_can_keeps_its_plan():
    cfg = gpt.GPTConfig(vocab=64, d_model=32, n_heads=4, n_layers=4, seq_len=8, d_ff=64)
    s = gpt.setup(cfg, 8)
    g = build_graph(trace(s.train_step, (s.state, s.batch)))
    colours = unit_colours(g)
    mesh = candidate_meshes((2, 4), jax.devices(), CPU)[0]
    plain = search.solve_on_mesh(g, mesh, CPU, 60.0, colours=colours)
    cost = plain.result.objective
    gap = 1e-6  # HiGHS's default absolute gap (seconds): both solves are within it
    above = search.solve_on_mesh(g, mesh, CPU, 60.0, colours=colours, beat=cost * 1.01)
    assert above.result.status == "optimal" and above.request.cutoff is None
    assert above.result.objective == pytest.approx(cost, abs=gap)
    # skipped by its LP bound or by HiGHS's cutoff, whichever comes first; either way
    # its objective is a lower bound on the mesh's plans, not above the best plan's
    below = search.solve_on_mesh(g, mesh, CPU, 60.0, colours=colours, beat=cost - 2 * gap)
    assert below.result.status == "skipped" and below.result.objective <= cost


def test_strategy_variables_are_known_before_the_problem_is_built(monkeypatch):
    cfg = gpt.GPTConfig(vocab=64, d_model=32, n_heads=4, n_layers=2, seq_len=8, d_ff=64)
    s = gpt.setup(cfg, 8)
    g = build_graph(trace(s.train_step, (s.state, s.batch)))
    infos = search.op_infos(g)
    meshes = [candidate_meshes(m, jax.devices(), CPU)[0] for m in ((8,), (2, 4), (2, 2, 2))]
    counts = []
    for mesh in meshes:
        desc = search.MeshDesc(tuple(mesh.axis_sizes), tuple(mesh.axis_names))
        n = search.strategy_variables(g, infos, desc, CPU)
        req = search.solve_on_mesh(g, mesh, CPU, 60.0, beat=0.0, infos=infos).request
        assert n == sum(len(c) for c in req.node_costs)
        counts.append(n)
        # copies of the layers share variables: counted once, as the ILP has them
        colours = unit_colours(g)
        shared = search.solve_on_mesh(g, mesh, CPU, 60.0, colours=colours, infos=infos)
        n_shared = search.strategy_variables(g, infos, desc, CPU, colours)
        assert n_shared == sum(len(c) for c in shared.request.node_costs) < n
    assert counts[0] < counts[1] < counts[2]
    # once a plan exists, a mesh above the limit is not built
    monkeypatch.setattr(search, "LP_MAX_STRATEGIES", counts[1])
    built = []
    real = search.solve_on_mesh
    monkeypatch.setattr(search, "solve_on_mesh", lambda g, m, *a: built.append(m) or real(g, m, *a))
    search.search(g, meshes, CPU, 60.0)
    assert [tuple(m.axis_sizes) for m in built] == [(8,), (2, 4)]
