"""Mesh search: plan on every candidate mesh, keep the cheapest.

The pieces live in their own modules: `mesh_shapes` (candidate shapes, jax meshes),
`mesh_plan` (one mesh's solved plan), `memory_planes` (plans within a memory budget)
and `accounting` (the collectives a plan implies); their public names are re-exported
here.
"""

from __future__ import annotations

from dataclasses import replace

import jax

from autoshard.accounting import (  # noqa: F401  (re-exported)
    COMBINED_KINDS,
    combine,
    comm_time_by_kind,
    predicted_collectives,
    roofline,
    times,
)
from autoshard.cost_model.hardware import Hardware, MeshDesc
from autoshard.cost_model.ilp import SolverResult, lower_bound
from autoshard.memory_planes import (  # noqa: F401  (re-exported)
    FIT_TOLERANCE,
    _peak,
    _within,
    excluded_by_memory,
    least_memory,
    over_budget_message,
)
from autoshard.mesh_plan import MeshPlan, operand_specs, value_specs  # noqa: F401
from autoshard.mesh_shapes import candidate_shapes, make_mesh  # noqa: F401
from autoshard.passes.annotate import Layout, partition_spec
from autoshard.passes.classes import class_problem, on_mesh, skeleton
from autoshard.passes.graph import Lit, OpGraph, feeds_contraction, per_graph
from autoshard.passes.liveness import Liveness
from autoshard.passes.repeats import unit_colours
from autoshard.passes.simplify import (
    build_request,
    decode,
    followed_operands,
    merge_followers,
)
from autoshard.passes.strategies import enumerate_strategies, op_info, source_strategies
from autoshard.pins import restrict

# A larger mesh must be cheaper by this fraction to win over a smaller one that ties.
MESH_TIE_BREAK = 1e-6
# Seconds the mesh search may spend on a mesh's LP relaxation, the lower bound that
# skips a mesh when no plan on it can beat the best plan found.
LP_BOUND_TIME = 10.0
# Above this many variables (strategies and edge entries) an LP relaxation does not
# finish in LP_BOUND_TIME on 2 cores (a 12-layer GPT on (2, 2, 2): 950k variables,
# over 60 s), so a mesh this large is not bounded and, once a plan exists, skipped.
LP_MAX_VARIABLES = 400_000
# Many devices have many factorisations (64: 16 shapes, 1024: 46). Per number of mesh
# axes (1, 2, 3), at most this many meshes are built and solved: those with the lowest
# compute floor (`compute_floor`). 3-D problems are the large ones.
MESHES_PER_RANK = (1, 6, 3)
# Once a plan exists, a mesh whose ILP has more strategy variables than this (counted
# before its problem is built, `strategy_variables`) is not built: its edge variables
# put it above LP_MAX_VARIABLES, and building it (follower maps, resharding edges)
# takes longer than solving a 2-D mesh. The Llama-3.1-8B step on 256 devices:
# 3.1-3.4k on 2-D meshes (36-42k variables in all), 18.4-18.8k on 3-D ones (over 400k).
LP_MAX_STRATEGIES = 10_000
# Compute floors that agree to this many significant digits order meshes as equals.
FLOOR_DIGITS = 4


def solve_on_mesh(
    graph: OpGraph,
    mesh: jax.sharding.Mesh,
    hw: Hardware,
    time_limit: float,
    budget: float | None = None,
    donated: frozenset[int] = frozenset(),
    pinned: dict | None = None,
    colours: list[int] | None = None,
    progress=None,
    beat: float | None = None,
    infos=None,
    skel=None,
) -> MeshPlan:
    """The cheapest plan on one mesh; with a budget, the cheapest whose per-device
    memory stays within it (result status "infeasible" if none does). pinned: value
    id -> spec the user fixed (autoshard.pins). With colours
    (`passes.repeats.unit_colours`), copies of repeated layers share ILP variables.
    With beat (the best cost found on another mesh), a mesh whose LP lower bound is
    not below it, or whose LP relaxation does not finish within LP_BOUND_TIME, is not
    solved: the result has status "skipped" and the bound (inf when unknown); beat is
    also HiGHS's cutoff (`SolverRequest.cutoff`), so a mesh with no plan cheaper than
    it is "skipped" with it as bound (nan when the budget's cutting planes found no
    plan that beats it in their time). Without beat, under a budget, a mesh whose memory floor
    exceeds it is "infeasible". infos and skel (`op_infos`,
    `passes.classes.skeleton`) may be passed in when known. The plan's request is over
    its ILP nodes: one per class of copies."""
    desc = MeshDesc(tuple(mesh.axis_sizes), tuple(mesh.axis_names))
    hw = hw.for_mesh(desc.shape)  # per-axis numbers from the hardware's levels
    if pinned:
        colours = None  # copies of a layer may be pinned differently: each is its own
    if colours is not None:  # mesh work once per class of copies (passes/classes.py)
        sk = skel if skel is not None else skeleton(graph, infos or op_infos(graph), colours)
        # with a plan to beat, a problem too large to bound is not built in full
        limit = LP_MAX_VARIABLES if beat is not None else None
        work = on_mesh(sk, desc, hw)
        problem, request, groups = class_problem(sk, graph, work, time_limit, limit)
    else:
        problem, request, groups = _per_operation(graph, desc, hw, time_limit, pinned, infos)
    mp = MeshPlan(mesh, problem, None, (), None, request, groups)
    if progress is not None:
        n_var = sum(len(problem.units[r]) for r in problem.roots)
        n_ilp = groups.classes if groups is not None else len(problem.roots)
        progress.solving(desc.shape, len(problem.roots), n_ilp, n_var)
    if beat is not None:
        bound = None
        if request is not None and _variables(request) <= LP_MAX_VARIABLES:
            bound = lower_bound(request, min(time_limit, LP_BOUND_TIME))
        if bound is None:  # too large to bound in time: its ILP would not finish either
            bound = float("inf")
        if bound >= beat * (1 - MESH_TIE_BREAK):
            n = len(problem.roots)
            skipped = SolverResult((0,) * n, bound, "skipped", 0.0, 0, 0)
            return replace(mp, result=skipped)
    live = Liveness(problem, donated)
    mp = replace(mp, liveness=live)
    if budget is not None and beat is None:
        # until a plan is found, a mesh no plan fits on is told apart without its ILP
        # (afterwards the cutoff ILP settles it, quicker than the screen's rounds)
        floor, least, points, rows_floor = excluded_by_memory(
            mp, budget, min(time_limit, LP_BOUND_TIME)
        )
        mp = replace(mp, least=least, memory_points=points, rows_floor=rows_floor)
        if floor is not None:
            none = SolverResult((0,) * len(problem.roots), float("inf"), "infeasible", 0.0, 0, 0)
            picks = decode(problem, mp.expand(least))
            return replace(mp, result=none, picks=picks, memory_floor=floor)
    cut = None if beat is None else beat * (1 - MESH_TIE_BREAK)  # a plan must beat it
    result = mp.solve(replace(request, cutoff=cut))
    picks = decode(problem, result.choice)
    if result.status != "cutoff" and (
        budget is None or _peak(live, problem, picks) <= budget * (1 + FIT_TOLERANCE)
    ):
        return replace(mp, result=result, picks=picks)
    if result.status != "cutoff":
        within = replace(mp, request=replace(request, cutoff=cut))
        result, picks, req = _within(within, budget, over=picks)
        mp = replace(mp, request=replace(req, cutoff=None))
    if result.status == "cutoff":  # no plan on this mesh beats the best found
        # (nan: none found in the memory rounds' time, `MEMORY_ROUND_TIME_TO_BEAT`)
        bound = cut if result.objective == result.objective else result.objective
        skipped = SolverResult((0,) * len(problem.roots), bound, "skipped", 0.0, 0, 0)
        return replace(mp, result=skipped)
    return replace(mp, result=result, picks=picks)


def _per_operation(graph: OpGraph, desc: MeshDesc, hw: Hardware, time_limit, pinned, infos):
    """(problem, request, None): every operation walked on this mesh (with pins, whose
    strategies differ between copies)."""
    units = [  # a PRNG key input stays whole
        source_strategies(info.shape, info.nbytes, desc, hw, info.is_key)
        for info in (graph.values[v] for v in graph.inputs)
    ]
    units += [source_strategies(graph.values[v].shape, 0, desc, hw, True) for v, _ in graph.consts]
    units += [enumerate_strategies(op, desc, hw) for op in infos or op_infos(graph)]
    if pinned:
        units = restrict(units, graph, pinned)
    problem = merge_followers(graph, units, desc, hw)
    return problem, build_request(problem, time_limit), None


class MemoryBudgetError(ValueError):
    """No plan on any candidate mesh fits the per-device memory budget. The message
    (the least memory reachable and what dominates it) is worked out when read."""

    def __init__(self, message: str | None = None, over=(), budget: float = 0.0, untried=()):
        super().__init__(message)
        self._message, self._over, self._budget = message, list(over), budget
        self._untried = list(untried)  # meshes too large to solve in time, not tried

    def __str__(self) -> str:
        if self._message is None:
            self._message = over_budget_message(self._over, self._budget)
            if self._untried:
                shapes = ", ".join(map(str, self._untried))
                one = len(self._untried) == 1
                self._message += (
                    f" {'Mesh' if one else 'Meshes'} {shapes} {'was' if one else 'were'} not "
                    f"tried: {'its ILP is' if one else 'their ILPs are'} too large to solve "
                    "in time (pass mesh= to plan on one)."
                )
        return self._message


@per_graph
def op_infos(graph: OpGraph) -> list:
    """What strategy enumeration needs of each operation (the same on every mesh)."""
    feeds = feeds_contraction(graph)
    memo: dict = {}  # copies of an operation share one OpInfo
    # all-reduces inside a loop body run every iteration: none is fused with the others
    return [op_info(graph, n, not feeds[n.id] and n.weight == 1, memo) for n in graph.nodes]


def op_weights(graph: OpGraph, infos) -> dict:
    """Per distinct operation signature, the iterations its copies run in all."""
    by_id: dict = {}  # copies share one OpInfo: hashing each once is what costs
    for node, op in zip(graph.nodes, infos, strict=True):
        entry = by_id.setdefault(id(op), [op, 0])
        entry[1] += node.weight
    weights: dict = {}
    for op, w in by_id.values():
        weights[op] = weights.get(op, 0) + w
    return weights


def compute_floor(graph: OpGraph, infos, desc: MeshDesc, hw: Hardware, weights=None) -> float:
    """No plan on the mesh costs less: every operation's cheapest strategy, times the
    iterations it runs (resharding and shared latencies only add). Cheap: strategies
    are enumerated once per operation signature and kept for the mesh's solve.
    weights: `op_weights(graph, infos)`, when known."""
    hw = hw.for_mesh(desc.shape)
    weights = op_weights(graph, infos) if weights is None else weights
    cheapest = (min(s.cost for s in enumerate_strategies(op, desc, hw)) for op in weights)
    return sum(w * c for w, c in zip(weights.values(), cheapest, strict=True))


def mesh_floors(graph: OpGraph, meshes, infos, hw: Hardware) -> list[float]:
    """compute_floor of every candidate mesh."""
    descs = [MeshDesc(tuple(m.axis_sizes), tuple(m.axis_names)) for m in meshes]
    weights = op_weights(graph, infos)
    return [compute_floor(graph, infos, d, hw, weights) for d in descs]


def mesh_order(meshes, floors) -> list[int]:
    """Indices of the meshes to build, in order: per number of axes (fewer first), the
    MESHES_PER_RANK[axes - 1] with the lowest floors, lowest first (so the best plan is
    usually found early and bounds skip the rest; `_order_key` breaks ties)."""
    by_rank: dict[int, list[int]] = {}
    for i, m in enumerate(meshes):
        by_rank.setdefault(len(m.axis_sizes), []).append(i)
    keep = []
    for rank in sorted(by_rank):
        cap = MESHES_PER_RANK[min(rank, len(MESHES_PER_RANK)) - 1]
        keep += sorted(by_rank[rank], key=lambda i: _order_key(meshes[i], floors[i], i))[:cap]
    return keep


def _order_key(mesh, floor: float, i: int) -> tuple:
    """Lowest floor first; floors equal to FLOOR_DIGITS significant digits (large
    models: every operation's cheapest strategy is its fully split compute on any
    mesh) then the most even shape first (every axis can split a dimension: on
    large models the cheapest plans are there), then the given order."""
    sizes = tuple(mesh.axis_sizes)
    return float(f"{floor:.{FLOOR_DIGITS}g}"), max(sizes) / min(sizes), i


def _to_beat(best: MeshPlan | None, best_i: int, i: int) -> float | None:
    """What mesh i's plan must cost less than (times 1 - MESH_TIE_BREAK) to win over
    the best plan so far, mesh best_i's: the earlier mesh in the given order wins ties
    whatever order they are solved in."""
    if best is None:
        return None
    obj = best.result.objective
    return obj if i > best_i else obj / (1 - MESH_TIE_BREAK) ** 2


def strategy_variables(graph: OpGraph, infos, desc: MeshDesc, hw: Hardware, colours=None) -> int:
    """The ILP's strategy variables on a mesh, without building its problem: the
    strategies of every input, constant and operation whose layout does not follow an
    operand (followers are merged into their producer's ILP node; which operations
    follow does not depend on the mesh), each class of copies counted once when
    colours (`passes.repeats.unit_colours`) are given, as the ILP shares them.
    Cheap: strategies are enumerated once per operation signature.

    Args:
      graph: the step's operation graph; infos: `op_infos(graph)`.
      desc: the mesh; hw: the hardware.
      colours: per unit, its class of copies (None: every unit its own).

    Returns:
      The number of (node, strategy) variables of the mesh's ILP without pins.

    Example:
      >>> desc = MeshDesc((4, 8, 8), ("x", "y", "z"))
      >>> strategy_variables(graph, op_infos(graph), desc, hw)  # doctest: +SKIP
    """
    hw = hw.for_mesh(desc.shape)
    sources = [graph.values[v] for v in graph.inputs]
    counts = [len(source_strategies(i.shape, i.nbytes, desc, hw, i.is_key)) for i in sources]
    counts += [
        len(source_strategies(graph.values[v].shape, 0, desc, hw, True)) for v, _ in graph.consts
    ]
    sizes: dict = {}  # copies share one OpInfo: enumerated (from a cache) once each
    counts += [
        0
        if pos is not None
        else sizes.get(id(o)) or sizes.setdefault(id(o), len(enumerate_strategies(o, desc, hw)))
        for pos, o in zip(followed_operands(graph), infos, strict=True)
    ]
    if colours is None:
        return sum(counts)
    return sum({c: n for c, n in zip(colours, counts, strict=True) if n}.values())


def _variables(request) -> int:
    return sum(len(c) for c in request.node_costs) + sum(e.cost.size for e in request.edges)


def search(
    graph: OpGraph,
    meshes,
    hw: Hardware,
    time_limit: float,
    budget: float | None = None,
    donated: frozenset[int] = frozenset(),
    pinned: list | None = None,
    collapse: bool = True,
    progress=None,
) -> tuple[MeshPlan, dict[str, float]]:
    """Solve on the meshes (per number of axes, the MESHES_PER_RANK with the lowest
    compute floors; a mesh whose floor is not below the best plan found is skipped);
    the cheapest plan within the budget wins, the earlier (smaller) mesh on ties.
    Raises MemoryBudgetError if no mesh has one. pinned: per mesh, value id -> spec
    the user fixed. With collapse, copies of repeated layers share ILP variables."""
    best, best_i, tried, over, untried = None, -1, {}, [], []
    colours = unit_colours(graph) if collapse else None
    infos = op_infos(graph)
    skel = skeleton(graph, infos, colours) if collapse else None
    pinned = pinned or [None] * len(meshes)
    floors = mesh_floors(graph, meshes, infos, hw)
    for i in mesh_order(meshes, floors):
        mesh, pins = meshes[i], pinned[i]
        beat = _to_beat(best, best_i, i)
        if beat is not None and floors[i] >= beat * (1 - MESH_TIE_BREAK):
            if progress is not None:
                progress.skipped(tuple(mesh.axis_sizes), floors[i], beat)
            continue
        # once a mesh was solved or ruled out, one too large to solve in time is not built
        tried_one = beat is not None or over
        if tried_one and not pins and _too_large(graph, infos, mesh, hw, colours, progress):
            untried.append(tuple(mesh.axis_sizes))
            continue
        mp = solve_on_mesh(
            graph, mesh, hw, time_limit, budget, donated, pins, colours, progress, beat, infos, skel
        )
        if mp.result.status == "skipped":
            if progress is not None:
                progress.skipped(tuple(mesh.axis_sizes), mp.result.objective, beat)
            continue
        if mp.result.status in ("infeasible", "timed_out"):
            over.append(mp)
            if progress is not None:
                progress.note(f"mesh {tuple(mesh.axis_sizes)}: no plan within the budget")
            continue
        tried[str(tuple(mesh.axis_sizes))] = mp.result.objective
        if best is None or mp.result.objective < _to_beat(best, best_i, i) * (1 - MESH_TIE_BREAK):
            best, best_i = mp, i
        if progress is not None:
            r = mp.result
            progress.solved(
                tuple(mesh.axis_sizes),
                r.objective,
                best.result.objective,
                r.num_variables,
                r.num_constraints,
            )
    if best is None:
        raise MemoryBudgetError(over=over, budget=budget, untried=untried)
    return best, tried


def _too_large(graph: OpGraph, infos, mesh, hw: Hardware, colours, progress) -> bool:
    """More than LP_MAX_STRATEGIES strategy variables on this mesh, copies of layers
    counted once (said on progress)."""
    desc = MeshDesc(tuple(mesh.axis_sizes), tuple(mesh.axis_names))
    n = strategy_variables(graph, infos, desc, hw, colours)
    if n <= LP_MAX_STRATEGIES:
        return False
    if progress is not None:
        progress.note(
            f"mesh {desc.shape}: skipped, {n} strategy variables: too large to bound or "
            "solve in time once another mesh was solved or ruled out (pass this mesh to "
            "plan on it)"
        )
    return True


def specs_of(values, layout: Layout, names):
    return [
        partition_spec(layout.value_specs[v], names) if not isinstance(v, Lit) else None
        for v in values
    ]
