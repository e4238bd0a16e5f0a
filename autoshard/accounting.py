"""Collective accounting: the collectives a plan implies, as XLA will run them."""

from __future__ import annotations

import math
from dataclasses import replace

from autoshard.cost_model import collectives as coll
from autoshard.cost_model.resharding import reshard
from autoshard.mesh_plan import MeshPlan
from autoshard.passes.annotate import Layout
from autoshard.passes.graph import Lit, OpGraph
from autoshard.passes.strategies import op_flops

# XLA fuses independent all-reduces over the same devices into one (its all-reduce
# combiner runs on every backend); other kinds are counted one by one.
COMBINED_KINDS = (coll.ALL_REDUCE,)


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


def times(mp: MeshPlan, combined) -> tuple[float, float]:
    """(compute, communication) seconds of the chosen plan, given its collectives as
    the compiled program runs them: (times run per step, collective) pairs."""
    mesh, hw = mp.problem.mesh, mp.problem.hw
    comm = sum(w * coll.total_time([c], mesh, hw) for w, c in combined)
    return max(mp.result.objective - comm, 0.0), comm


def _ancestors(graph: OpGraph, bit: dict[int, int]) -> list[int]:
    """Per node, a bitset of the nodes in bit (node id -> its bit) it depends on
    (transitively): only those are ever tested, and the sets stay small."""
    prod = graph.producer()
    anc: list[int] = []
    for n in graph.nodes:
        bits = 0
        for r in n.inputs:
            if not isinstance(r, Lit) and r in prod:
                p = prod[r]
                bits |= anc[p] | (1 << bit[p] if p in bit else 0)
        anc.append(bits)
    return anc


def combine(mp: MeshPlan, preds) -> list[tuple[int, coll.Collective]]:
    """The collectives the compiled program should contain, each with the number of
    times it runs per step: the predicted ones, with independent all-reduces over the
    same axes in the same loop body (or outside all loops) merged greedily into one.
    A collective in a loop body appears once in the program text."""
    g = mp.problem.graph
    bit: dict[int, int] = {}  # the nodes with a combinable collective, numbered
    for nid, c in preds:
        if c.kind in COMBINED_KINDS:
            bit.setdefault(nid, len(bit))
    anc = _ancestors(g, bit)
    # per bucket: its collective, region, first member, and as bitsets its members and
    # every node a member depends on (independence of a new member is two bit tests)
    buckets: list[tuple[coll.Collective, int, int, int, int]] = []
    out = []
    for nid, c in preds:
        region, weight = g.nodes[nid].region, g.nodes[nid].weight
        if c.kind not in COMBINED_KINDS:
            out.append((weight, c))
            continue
        for i, (b, r, first, members, below) in enumerate(buckets):
            same = (b.kind, b.axes, b.reduce_op, r) == (c.kind, c.axes, c.reduce_op, region)
            indep = not anc[nid] & members and not (below >> bit[nid]) & 1
            if same and indep:
                merged = replace(b, nbytes=b.nbytes + c.nbytes)
                buckets[i] = (merged, r, first, members | 1 << bit[nid], below | anc[nid])
                break
        else:
            buckets.append((c, region, nid, 1 << bit[nid], anc[nid]))
    return out + [(g.nodes[first].weight, b) for b, _, first, _, _ in buckets]


def comm_time_by_kind(mp, combined) -> dict[str, float]:
    """Communication seconds per step of the chosen plan, by collective kind."""
    mesh, hw = mp.problem.mesh, mp.problem.hw
    out: dict[str, float] = {}
    for w, c in combined:
        out[c.kind] = out.get(c.kind, 0.0) + w * coll.total_time([c], mesh, hw)
    return out


def roofline(mp: MeshPlan, infos=None) -> tuple[tuple[float, float], ...]:
    """Per operation of the chosen plan: (flops, bytes of device memory traffic) per
    device per step, times the iterations it runs, as the planner priced it (its
    compute time is max(flops / peak, bytes / memory bandwidth) of each). Operations
    with neither are left out. The calibration (`cost_model.calibration`) re-prices
    a plan from these without planning it again."""
    from autoshard.search import op_infos  # search imports this module

    p, g = mp.problem, mp.problem.graph
    infos = op_infos(g) if infos is None else infos
    out = []
    memo: dict = {}  # copies share their OpInfo and strategies: each pair priced once
    for n, op in zip(g.nodes, infos, strict=True):
        u = p.node_unit(n.id)
        st = p.units[u][mp.picks[u]]
        key = (id(op), id(st))
        if key not in memo:
            memo[key] = _op_roofline(op, st, p.mesh)
        flops, nbytes, used = memo[key]
        if flops or nbytes:
            out.append((n.weight * flops / used, n.weight * nbytes / used))
    return tuple(out)


def _op_roofline(op, st, mesh) -> tuple[float, float, int]:
    """(flops, bytes, devices that split it) of one operation under strategy st."""
    specs = [s for s in (*st.in_specs, *st.out_specs) if s is not None]
    used = mesh.group(sorted({a for s in specs for d in s for a in d}))
    sizes = op.fmap.factors
    shapes = [[math.prod(sizes[f].size for f in d) for d in o] for o in op.fmap.outputs]
    flops = op_flops(op.primitive, op.fmap, shapes)
    nbytes = 0.0 if op.fusible else sum(op.in_bytes) + sum(op.out_bytes)
    return flops, nbytes, used
