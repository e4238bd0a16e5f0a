"""Mesh search: plan on every candidate mesh, keep the cheapest."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import jax

from autoshard.cost_model import collectives as coll
from autoshard.cost_model.hardware import Hardware, MeshDesc
from autoshard.cost_model.ilp import SolverResult, solve
from autoshard.cost_model.memory import live_peak
from autoshard.cost_model.resharding import per_device_bytes, reshard
from autoshard.passes.annotate import Layout, partition_spec
from autoshard.passes.graph import Lit, OpGraph, feeds_contraction
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

    def layout(self) -> Layout:
        p, g = self.problem, self.problem.graph
        specs: list = [None] * len(g.values)
        for v, (u, k) in p.value_src.items():
            specs[v] = p.units[u][self.picks[u]].out_specs[k]
        ops = tuple(
            p.units[p.node_unit(n.id)][self.picks[p.node_unit(n.id)]].in_specs for n in g.nodes
        )
        return Layout(tuple(specs), ops)


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


def solve_on_mesh(
    graph: OpGraph, mesh: jax.sharding.Mesh, hw: Hardware, time_limit: float
) -> MeshPlan:
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
    result = solve(build_request(problem, time_limit))
    return MeshPlan(mesh, problem, result, decode(problem, result.choice))


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


def memory(mp: MeshPlan, layout: Layout) -> dict[str, float]:
    p, g = mp.problem, mp.problem.graph
    specs = layout.value_specs
    per_dev = [
        per_device_bytes(v.nbytes, s, p.mesh) if s is not None else v.nbytes
        for v, s in zip(g.values, specs, strict=True)
    ]
    args = sum(per_dev[v] for v in g.inputs)
    outs = [r for r in g.outputs if not isinstance(r, Lit)]
    produced = [n.outputs for n in g.nodes]
    consumed = [[r for r in n.inputs if not isinstance(r, Lit)] for n in g.nodes]
    peak = live_peak(produced, consumed, per_dev, set(outs))
    out_bytes = sum(per_dev[v] for v in outs)
    return {"arguments": args, "outputs": out_bytes, "activations_peak": peak, "total": args + peak}


def make_mesh(shape, names, devices) -> jax.sharding.Mesh:
    devs = devices[: math.prod(shape)]
    return jax.make_mesh(
        shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape), devices=devs
    )


def search(
    graph: OpGraph, meshes, hw: Hardware, time_limit: float
) -> tuple[MeshPlan, dict[str, float]]:
    """Solve on every mesh; the cheapest wins, the earlier (smaller) one on ties."""
    best, tried = None, {}
    for mesh in meshes:
        mp = solve_on_mesh(graph, mesh, hw, time_limit)
        tried[str(tuple(mesh.devices.shape))] = mp.result.objective
        if best is None or mp.result.objective < best.result.objective * (1 - MESH_TIE_BREAK):
            best = mp
    return best, tried


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
