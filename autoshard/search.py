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
    request: SolverRequest | None = None  # with memory rows, when a budget was applied

    def layout(self) -> Layout:
        p = self.problem
        return Layout(tuple(value_specs(p, self.picks)), tuple(operand_specs(p, self.picks)))

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


# Cutting-plane rounds: each adds the point where the last plan's memory peaked.
MEMORY_ROUNDS = 8


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
) -> MeshPlan:
    """The cheapest plan on one mesh; with a budget, the cheapest whose per-device
    memory stays within it (result status "infeasible" if none does)."""
    desc = MeshDesc(tuple(mesh.devices.shape), tuple(mesh.axis_names))
    units = [
        source_strategies(graph.values[v].shape, graph.values[v].nbytes, desc, hw)
        for v in graph.inputs
    ]
    units += [source_strategies(graph.values[v].shape, 0, desc, hw, True) for v, _ in graph.consts]
    feeds = feeds_contraction(graph)
    # all-reduces inside a loop body run every iteration: none is fused with the others
    units += [
        enumerate_strategies(op_info(graph, n, not feeds[n.id] and n.weight == 1), desc, hw)
        for n in graph.nodes
    ]
    problem = merge_followers(graph, units, desc, hw)
    request = build_request(problem, time_limit)
    live = Liveness(problem, donated)
    replicated = decode(problem, [0] * len(problem.roots))
    args, prof = live.profile(value_specs(problem, replicated))
    if budget is None or args + prof.max(initial=0.0) <= budget:
        # no plan needs more memory than the replicated one: the budget cannot bind
        result = solve(request)
        return MeshPlan(mesh, problem, result, decode(problem, result.choice), live)
    node_of_root = {r: i for i, r in enumerate(problem.roots)}
    points = [int(t) for t in np.argsort(prof)[-4:]]
    target = budget
    for _ in range(MEMORY_ROUNDS):
        rows = tuple(live.row(t, node_of_root) for t in points)
        req = replace(request, memory=rows, memory_budget=target)
        result = solve(req)
        picks = decode(problem, result.choice)
        if result.status == "infeasible":
            break
        specs = value_specs(problem, picks)
        args, prof = live.profile(specs)
        _, full = live.profile(specs, operand_specs(problem, picks))
        if args + full.max() <= budget * (1 + 1e-6):
            break
        t = int(np.argmax(prof))
        if args + prof[t] > target * (1 + 1e-6):
            points.append(t)  # a point the rows did not cover
        else:
            # resharded copies (not linear in the choices) pushed it over: aim lower
            target -= args + full.max() - budget
            points.append(int(np.argmax(full)))
    else:
        result = replace(result, status="infeasible")
    return MeshPlan(mesh, problem, result, picks, live, req)


def least_memory(mp: MeshPlan) -> tuple[float, list[tuple[float, str]]]:
    """The least per-device memory any plan on mp's mesh reaches, and what is alive
    at its peak: (bytes, description), largest first."""
    problem, live = mp.problem, mp.liveness
    node_of_root = {r: i for i, r in enumerate(problem.roots)}
    points = [int(t) for t in np.argsort(live.profile(value_specs(problem, mp.picks))[1])[-4:]]
    for _ in range(MEMORY_ROUNDS):
        rows = tuple(live.row(t, node_of_root) for t in points)
        choice, _ = min_memory(replace(mp.request, memory=rows))
        specs = value_specs(problem, decode(problem, choice))
        args, prof = live.profile(specs)
        t = int(np.argmax(prof))
        if t in points:
            break
        points.append(t)
    return args + float(prof[t]), live.alive_at(t, specs)


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
    """No plan on any candidate mesh fits the per-device memory budget."""


def search(
    graph: OpGraph,
    meshes,
    hw: Hardware,
    time_limit: float,
    budget: float | None = None,
    donated: frozenset[int] = frozenset(),
) -> tuple[MeshPlan, dict[str, float]]:
    """Solve on every mesh; the cheapest plan within the budget wins, the earlier
    (smaller) mesh on ties. Raises MemoryBudgetError if no mesh has one."""
    best, tried, over = None, {}, []
    for mesh in meshes:
        mp = solve_on_mesh(graph, mesh, hw, time_limit, budget, donated)
        if mp.result.status == "infeasible":
            over.append(mp)
            continue
        tried[str(tuple(mesh.devices.shape))] = mp.result.objective
        if best is None or mp.result.objective < best.result.objective * (1 - MESH_TIE_BREAK):
            best = mp
    if best is None:
        raise MemoryBudgetError(_over_budget_message(over, budget))
    return best, tried


def _over_budget_message(over: list[MeshPlan], budget: float) -> str:
    least = [(least_memory(mp), mp) for mp in over]
    (need, alive), mp = min(least, key=lambda x: x[0][0])
    top = "; ".join(f"{what}: {_size(b)}" for b, what in alive[:3])
    n = mp.mesh.devices.size
    return (
        f"autoshard: no plan fits memory_budget={_size(budget)} per device on {n} devices. "
        f"The least any plan reaches is {_size(need)} per device (mesh "
        f"{tuple(mp.mesh.devices.shape)}); at its peak the largest are {top}. Raise "
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
