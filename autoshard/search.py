"""Mesh search: plan on every candidate mesh, keep the cheapest."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import jax
import numpy as np

from autoshard.cost_model import collectives as coll
from autoshard.cost_model.hardware import Hardware, MeshDesc
from autoshard.cost_model.ilp import SolverRequest, SolverResult, min_memory, solve
from autoshard.cost_model.resharding import reshard
from autoshard.passes.annotate import Layout, partition_spec
from autoshard.passes.graph import Lit, OpGraph, feeds_contraction
from autoshard.passes.liveness import Liveness
from autoshard.passes.simplify import Problem, build_request, decode, merge_followers
from autoshard.passes.strategies import enumerate_strategies, op_info, source_strategies
from autoshard.pins import restrict

# A larger mesh must be cheaper by this fraction to win over a smaller one that ties.
MESH_TIE_BREAK = 1e-6


@dataclass(frozen=True, eq=False)
class MeshPlan:
    """The solved problem on one mesh."""

    mesh: jax.sharding.Mesh
    problem: Problem
    result: SolverResult
    picks: tuple[int, ...]  # strategy index per unit
    liveness: Liveness
    request: SolverRequest  # with the memory rows of a budget, if one applied

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


def candidate_shapes(
    n: int, ndim: int | None = None, uniform: bool = False
) -> list[tuple[int, ...]]:
    """(n,), then every 2-D and 3-D factorisation with axes of size >= 2. With uniform
    hardware (the same numbers on every axis) a permutation of a shape is the same
    problem with axes relabelled, so only the sorted shape is kept."""
    shapes = [(n,)]
    for a in range(2, n):
        if n % a == 0:
            shapes.append((a, n // a))
    for a in range(2, n):
        for b in range(2, n):
            if n % (a * b) == 0 and n // (a * b) >= 2:
                shapes.append((a, b, n // (a * b)))
    if uniform:
        shapes = [s for s in shapes if list(s) == sorted(s)]
    return [s for s in shapes if ndim is None or len(s) == ndim]


# Cutting-plane rounds: each adds up to MEMORY_POINTS points where the last plan's
# memory went over.
MEMORY_ROUNDS = 12
MEMORY_POINTS = 8
# The least-memory search behind MemoryBudgetError's message: budgets stepped down by
# this factor from the best plan known, at most this many times.
LEAST_MEMORY_STEP = 0.92
LEAST_MEMORY_STEPS = 8


def _new_points(profile, points, args: float, limit: float) -> list[int]:
    """The highest steps of profile above limit (arguments included) not yet rows."""
    over = [int(t) for t in np.argsort(-profile) if args + profile[t] > limit * (1 + 1e-6)]
    return [t for t in over if t not in points][:MEMORY_POINTS]


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


def solve_on_mesh(
    graph: OpGraph,
    mesh: jax.sharding.Mesh,
    hw: Hardware,
    time_limit: float,
    budget: float | None = None,
    donated: frozenset[int] = frozenset(),
    pinned: dict | None = None,
) -> MeshPlan:
    """The cheapest plan on one mesh; with a budget, the cheapest whose per-device
    memory stays within it (result status "infeasible" if none does). pinned: value
    id -> spec the user fixed (autoshard.pins)."""
    desc = MeshDesc(tuple(mesh.axis_sizes), tuple(mesh.axis_names))
    hw = hw.for_mesh(desc.shape)  # per-axis numbers from the hardware's levels
    units = [  # a PRNG key input stays whole
        source_strategies(info.shape, info.nbytes, desc, hw, info.is_key)
        for info in (graph.values[v] for v in graph.inputs)
    ]
    units += [source_strategies(graph.values[v].shape, 0, desc, hw, True) for v, _ in graph.consts]
    feeds = feeds_contraction(graph)
    # all-reduces inside a loop body run every iteration: none is fused with the others
    units += [
        enumerate_strategies(op_info(graph, n, not feeds[n.id] and n.weight == 1), desc, hw)
        for n in graph.nodes
    ]
    if pinned:
        units = restrict(units, graph, pinned)
    problem = merge_followers(graph, units, desc, hw)
    request = build_request(problem, time_limit)
    live = Liveness(problem, donated)
    result = solve(request)
    picks = decode(problem, result.choice)
    if budget is None or _peak(live, problem, picks) <= budget * (1 + 1e-6):
        return MeshPlan(mesh, problem, result, picks, live, request)
    result, picks, req = _within(problem, request, live, budget)
    return MeshPlan(mesh, problem, result, picks, live, req)


def _peak(live: Liveness, problem: Problem, picks) -> float:
    """Predicted per-device memory of a plan, resharded copies included."""
    args, full = live.profile(value_specs(problem, picks), operand_specs(problem, picks))
    return args + float(full.max(initial=0.0))


def _within(problem: Problem, request: SolverRequest, live: Liveness, budget: float):
    """(result, picks, request) of the cheapest plan within budget, by cutting planes:
    memory rows at the steps where the last plan went over. Resharded copies are not
    linear in the choices; when only they push a plan over, the rows aim lower."""
    node_of_root = {r: i for i, r in enumerate(problem.roots)}
    replicated = decode(problem, [0] * len(problem.roots))
    args, prof = live.profile(value_specs(problem, replicated))
    points = _new_points(prof, [], args, budget)
    target, low, high = budget, None, None  # low: a target found infeasible
    for _ in range(MEMORY_ROUNDS):
        rows = tuple(live.row(t, node_of_root) for t in points)
        req = replace(request, memory=rows, memory_budget=target)
        result = solve(req)
        picks = decode(problem, result.choice)
        if result.status == "infeasible":
            if high is None:
                break  # infeasible at the budget itself
            low, target = target, (target + high) / 2
            continue
        specs = value_specs(problem, picks)
        args, prof = live.profile(specs)
        _, full = live.profile(specs, operand_specs(problem, picks))
        if args + full.max() <= budget * (1 + 1e-6):
            return result, picks, req
        new = _new_points(prof, points, args, target)
        if not new:
            high = target
            target = target - (args + full.max() - budget) if low is None else (low + target) / 2
            new = _new_points(full, points, args, budget)
        points += new
    return replace(result, status="infeasible"), replicated, req


def least_memory(mp: MeshPlan) -> tuple[float, list[tuple[float, str, str]]]:
    """About the least per-device memory a plan on mp's mesh reaches, and what is
    alive at its peak: (bytes, kind, what), largest first. A lower bound comes from
    the memory rows alone; plans found under budgets stepped down from the best plan
    known narrow it down."""
    problem, live = mp.problem, mp.liveness
    node_of_root = {r: i for i, r in enumerate(problem.roots)}
    args, prof = live.profile(value_specs(problem, mp.picks))
    points = _new_points(prof, [], args, 0.0)
    free = replace(mp.request, memory=(), memory_budget=None)
    for _ in range(MEMORY_ROUNDS):
        rows = tuple(live.row(t, node_of_root) for t in points)
        choice, bound = min_memory(replace(free, memory=rows))
        args, prof = live.profile(value_specs(problem, decode(problem, choice)))
        new = _new_points(prof, points, args, bound)
        if not new:
            break
        points += new
    candidates = [decode(problem, choice), decode(problem, solve(free).choice)]
    best = min(candidates, key=lambda p: _peak(live, problem, p))
    high = _peak(live, problem, best)
    # step the budget down from the best plan known while plans keep fitting
    for _ in range(LEAST_MEMORY_STEPS):
        target = max(bound, LEAST_MEMORY_STEP * high)
        result, picks, _ = _within(problem, free, live, target)
        if result.status == "infeasible" or target <= bound:
            break
        best, high = picks, min(high, _peak(live, problem, picks))
    specs = value_specs(problem, best)
    _, full = live.profile(specs, operand_specs(problem, best))
    return high, live.alive_at(int(np.argmax(full)), specs)


def predicted_collectives(mp: MeshPlan, layout: Layout) -> list[tuple[int, coll.Collective]]:
    """(graph node id, collective) for every collective the plan implies: each
    operation's own, and each resharding of an operand."""
    p, g = mp.problem, mp.problem.graph
    out, done = [], set()
    for n in g.nodes:
        u = p.node_unit(n.id)
        out += [(n.id, c) for c in p.units[u][mp.picks[u]].collectives]
        for r, want in zip(n.inputs, layout.operand_specs[n.id], strict=True):
            # XLA reshards a value once for all consumers that want the same layout.
            if not isinstance(r, Lit) and want != layout.value_specs[r] and (r, want) not in done:
                done.add((r, want))
                cs = reshard(layout.value_specs[r], want, g.values[r].nbytes, p.mesh)
                out += [(n.id, c) for c in cs]
    return out


def make_mesh(shape, names, devices) -> jax.sharding.Mesh:
    devs = devices[: math.prod(shape)]
    return jax.make_mesh(
        shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape), devices=devs
    )


class MemoryBudgetError(ValueError):
    """No plan on any candidate mesh fits the per-device memory budget. The message
    (the least memory reachable and what dominates it) is worked out when read."""

    def __init__(self, message: str | None = None, over=(), budget: float = 0.0):
        super().__init__(message)
        self._message, self._over, self._budget = message, list(over), budget

    def __str__(self) -> str:
        if self._message is None:
            self._message = _over_budget_message(self._over, self._budget)
        return self._message


def search(
    graph: OpGraph,
    meshes,
    hw: Hardware,
    time_limit: float,
    budget: float | None = None,
    donated: frozenset[int] = frozenset(),
    pinned: list | None = None,
) -> tuple[MeshPlan, dict[str, float]]:
    """Solve on every mesh; the cheapest plan within the budget wins, the earlier
    (smaller) mesh on ties. Raises MemoryBudgetError if no mesh has one. pinned: per
    mesh, value id -> spec the user fixed."""
    best, tried, over = None, {}, []
    pinned = pinned or [None] * len(meshes)
    for mesh, pins in zip(meshes, pinned, strict=True):
        mp = solve_on_mesh(graph, mesh, hw, time_limit, budget, donated, pins)
        if mp.result.status == "infeasible":
            over.append(mp)
            continue
        tried[str(tuple(mesh.axis_sizes))] = mp.result.objective
        if best is None or mp.result.objective < best.result.objective * (1 - MESH_TIE_BREAK):
            best = mp
    if best is None:
        raise MemoryBudgetError(over=over, budget=budget)
    return best, tried


def _over_budget_message(over: list[MeshPlan], budget: float) -> str:
    least = [(least_memory(mp), mp) for mp in over]
    (need, alive), mp = min(least, key=lambda x: x[0][0])
    kinds: dict[str, list[tuple[float, str]]] = {}
    for nbytes, kind, what in alive:
        kinds.setdefault(kind, []).append((nbytes, what))
    parts = sorted(
        ((sum(b for b, _ in items), kind, items[0]) for kind, items in kinds.items()),
        reverse=True,
    )
    peak = "; ".join(
        f"{kind} {_size(total)} (largest: {what}, {_size(b)})" for total, kind, (b, what) in parts
    )
    return (
        f"autoshard: no plan fits memory_budget={_size(budget)} per device on "
        f"{mp.mesh.size} devices. The least memory found for any plan is {_size(need)} "
        f"per device (mesh {tuple(mp.mesh.axis_sizes)}); at its peak: {peak}. Raise "
        "memory_budget (or Hardware(memory=...)), use more devices, or shrink the model or "
        "batch."
    )


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def specs_of(values, layout: Layout, names):
    return [
        partition_spec(layout.value_specs[v], names) if not isinstance(v, Lit) else None
        for v in values
    ]


def times(mp: MeshPlan, combined) -> tuple[float, float]:
    """(compute, communication) seconds of the chosen plan, given its collectives as
    the compiled program runs them: (times run per step, collective) pairs."""
    mesh, hw = mp.problem.mesh, mp.problem.hw
    comm = sum(w * coll.total_time([c], mesh, hw) for w, c in combined)
    return max(mp.result.objective - comm, 0.0), comm


def comm_time_by_kind(mp: MeshPlan, combined) -> dict[str, float]:
    """Communication seconds per step of the chosen plan, by collective kind."""
    mesh, hw = mp.problem.mesh, mp.problem.hw
    out: dict[str, float] = {}
    for w, c in combined:
        out[c.kind] = out.get(c.kind, 0.0) + w * coll.total_time([c], mesh, hw)
    return out


# XLA fuses independent all-reduces over the same devices into one (its all-reduce
# combiner runs on every backend); other kinds are counted one by one.
COMBINED_KINDS = (coll.ALL_REDUCE,)


def _ancestors(graph: OpGraph) -> list[int]:
    """Per node, a bitset of the nodes it depends on (transitively)."""
    prod = graph.producer()
    anc: list[int] = []
    for n in graph.nodes:
        bits = 0
        for r in n.inputs:
            if not isinstance(r, Lit) and r in prod:
                p = prod[r]
                bits |= anc[p] | (1 << p)
        anc.append(bits)
    return anc


def combine(mp: MeshPlan, preds) -> list[tuple[int, coll.Collective]]:
    """The collectives the compiled program should contain, each with the number of
    times it runs per step: the predicted ones, with independent all-reduces over the
    same axes in the same loop body (or outside all loops) merged greedily into one.
    A collective in a loop body appears once in the program text."""
    g = mp.problem.graph
    anc = _ancestors(g)
    buckets: list[tuple[coll.Collective, int, list[int]]] = []
    out = []
    for nid, c in preds:
        region, weight = g.nodes[nid].region, g.nodes[nid].weight
        if c.kind not in COMBINED_KINDS:
            out.append((weight, c))
            continue
        for i, (b, r, members) in enumerate(buckets):
            same = (b.kind, b.axes, b.reduce_op, r) == (c.kind, c.axes, c.reduce_op, region)
            indep = all(not (anc[nid] >> m) & 1 and not (anc[m] >> nid) & 1 for m in members)
            if same and indep:
                buckets[i] = (replace(b, nbytes=b.nbytes + c.nbytes), r, [*members, nid])
                break
        else:
            buckets.append((c, region, [nid]))
    return out + [(g.nodes[m[0]].weight, b) for b, _, m in buckets]
