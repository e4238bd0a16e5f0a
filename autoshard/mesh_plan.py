"""One mesh's solved plan, and the layouts it gives every value and operand."""

from __future__ import annotations

from dataclasses import dataclass

import jax

from autoshard.cost_model import collectives as coll
from autoshard.cost_model.ilp import SolverRequest, SolverResult
from autoshard.passes.annotate import Layout
from autoshard.passes.liveness import Liveness
from autoshard.passes.repeats import Collapse
from autoshard.passes.repeats import solve as _solve_collapsed
from autoshard.passes.simplify import Problem


@dataclass(frozen=True, eq=False)
class MeshPlan:
    """The solved problem on one mesh."""

    mesh: jax.sharding.Mesh
    problem: Problem
    result: SolverResult
    picks: tuple[int, ...]  # strategy index per unit
    liveness: Liveness | None  # None for a mesh the search skipped
    request: SolverRequest  # with the memory rows of a budget, if one applied
    collapse: Collapse | None = None  # ILP nodes that share variables (repeated layers)
    # a lower bound on the per-device memory of every plan, when one excluded the budget
    memory_floor: float | None = None
    # the least-memory plan (per ILP node) the memory cutting planes found, if they ran:
    # the fallback of a solve that times out before it finds a plan within the budget
    least: tuple[int, ...] | None = None
    # the steps of those cutting planes' last memory rows, and the least largest row
    # any plan has there: the budget's cutting planes start from them
    memory_points: tuple[int, ...] = ()
    rows_floor: float = 0.0

    def solve(self, request: SolverRequest) -> SolverResult:
        """Solve a request over this problem's ILP nodes, copies sharing variables."""
        return _solve_collapsed(request, self.collapse)

    def layout(self) -> Layout:
        p = self.problem
        scatters = []
        for n in p.graph.nodes:
            u = p.node_unit(n.id)
            st = p.units[u][self.picks[u]]
            rs = [c for c in st.collectives if c.kind == coll.REDUCE_SCATTER]
            dims = [d for d, ax in enumerate(st.out_specs[0]) if rs and set(rs[0].axes) <= set(ax)]
            scatters.append((dims[0], rs[0].axes) if rs else None)
        return Layout(
            tuple(value_specs(p, self.picks)), tuple(operand_specs(p, self.picks)), tuple(scatters)
        )

    def memory(self) -> dict[str, float]:
        """Predicted per-device bytes: arguments, outputs, activations_peak, total."""
        layout = self.layout()
        return self.liveness.report(layout.value_specs, layout.operand_specs)


def value_specs(problem: Problem, picks) -> list:
    """Every value's spec when each unit takes its strategy in picks."""
    specs: list = [None] * len(problem.graph.values)
    for v, (u, k) in problem.value_src.items():
        specs[v] = problem.units[u][picks[u]].out_specs[k]
    return specs


def operand_specs(problem: Problem, picks) -> list:
    """Every operation's operand specs when each unit takes its strategy in picks."""
    return [
        problem.units[problem.node_unit(n.id)][picks[problem.node_unit(n.id)]].in_specs
        for n in problem.graph.nodes
    ]
