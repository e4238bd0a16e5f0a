"""Shrink the strategy problem before it reaches the solver.

Every graph input and every operation is a *unit* with its strategies. An operation
with one array operand (reshape, transpose, reduce, broadcast, convert, ...) or an
elementwise operation *follows* the producer of that operand: its strategy becomes a
function of the producer's, chosen to take the operand as it comes (Alpa's follower
merging). Chains collapse into one ILP node, so Adam's elementwise work adds almost
nothing to the problem. What stays is one ILP node per root unit: inputs, dots,
gathers, scatters and other many-operand operations.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from autoshard.cost_model import collectives as coll
from autoshard.cost_model.hardware import Hardware, MeshDesc
from autoshard.cost_model.ilp import Edge, SharedCost, SolverRequest, Tie
from autoshard.cost_model.resharding import reshard
from autoshard.passes.graph import Lit, OpGraph, per_graph
from autoshard.passes.rules.families import CONTRACTIONS, DECISIONS, ELEMENTWISE
from autoshard.passes.strategies import Strategy


@dataclass(frozen=True, eq=False)
class Problem:
    """The merged problem on one mesh.

    units: strategies per unit (inputs first, then graph nodes in order).
    root_of: per unit, the ILP node (root unit) that decides it.
    follow: per unit, its strategy index for each strategy of its root.
    roots: root units in ILP node order.
    """

    graph: OpGraph
    mesh: MeshDesc
    hw: Hardware
    units: tuple[tuple[Strategy, ...], ...]
    value_src: dict  # value id -> (unit, output position)
    root_of: tuple[int, ...]
    follow: tuple[np.ndarray, ...]
    followed_pos: tuple[int | None, ...]
    roots: tuple[int, ...]

    def node_unit(self, node_id: int) -> int:
        return len(self.graph.inputs) + len(self.graph.consts) + node_id

    def spec_of(self, value: int, j: int):
        """Spec of a value when its root unit picks strategy j."""
        u, idx = self.value_src[value]
        return self.units[u][self.follow[u][j]].out_specs[idx]


def followed_operand(graph: OpGraph, node, weak: set[int]) -> int | None:
    """The operand whose layout the operation takes, if it has one to follow. An
    elementwise operation follows an operand of its own shape, preferring one that
    is not `weak` (broadcast, or computed from constants alone: a causal mask, a
    broadcast scale), since those cannot carry the layout of the data."""
    if node.name in DECISIONS:
        return None
    arrays = [p for p, r in enumerate(node.inputs) if not isinstance(r, Lit) and graph.shape(r)]
    if len(arrays) == 1:
        return arrays[0]
    if node.name in ELEMENTWISE:
        out = graph.values[node.outputs[0]].shape
        same = [p for p in arrays if graph.shape(node.inputs[p]) == out]
        strong = [p for p in same if node.inputs[p] not in weak]
        return (strong or same or [None])[0]
    return None


@per_graph
def weak_values(graph: OpGraph) -> frozenset[int]:
    """Values made by a broadcast, or from constants and iotas alone."""
    const = {v for v, _ in graph.consts}
    weak = set()
    for n in graph.nodes:
        arrays = [r for r in n.inputs if not isinstance(r, Lit)]
        if all(r in const for r in arrays):
            const.update(n.outputs)
        if n.name == "broadcast_in_dim" or all(r in const for r in arrays):
            weak.update(n.outputs)
    return frozenset(weak)


@per_graph
def followed_operands(graph: OpGraph) -> tuple[int | None, ...]:
    """Per node, `followed_operand` (which does not depend on the mesh)."""
    weak = weak_values(graph)
    return tuple(followed_operand(graph, node, weak) for node in graph.nodes)


def merge_followers(graph: OpGraph, units, mesh: MeshDesc, hw: Hardware) -> Problem:
    """Pure: assigns every unit a root and a strategy map; strategies are not changed."""
    n_in = len(graph.inputs) + len(graph.consts)
    value_src = {v: (i, 0) for i, v in enumerate([*graph.inputs, *(c for c, _ in graph.consts)])}
    for node in graph.nodes:
        value_src.update({v: (n_in + node.id, k) for k, v in enumerate(node.outputs)})
    root_of = list(range(len(units)))
    own: dict = {}  # copies of an operation share their strategies, hence one arange
    follow = [own.setdefault(id(s), np.arange(len(s))) for s in units]
    followed = [None] * len(units)
    rtime = reshard_time(mesh, hw)
    best = FollowCache(rtime)
    maps: dict = {}  # copies of a chain repeat the same map: computed once per signature
    for node, pos in zip(graph.nodes, followed_operands(graph), strict=True):
        u = n_in + node.id
        if pos is None:
            continue
        v = node.inputs[pos]
        p_unit, idx = value_src[v]
        nbytes = graph.values[v].nbytes
        key = (id(units[u]), pos, id(units[p_unit]), idx, id(follow[p_unit]), nbytes)
        if key not in maps:
            have = [units[p_unit][k].out_specs[idx] for k in follow[p_unit]]
            maps[key] = np.array([best(units[u], pos, spec, nbytes) for spec in have])
        follow[u] = maps[key]
        root_of[u], followed[u] = root_of[p_unit], pos
    roots = tuple(u for u in range(len(units)) if root_of[u] == u)
    return Problem(
        graph,
        mesh,
        hw,
        tuple(units),
        value_src,
        tuple(root_of),
        tuple(follow),
        tuple(followed),
        roots,
    )


@functools.lru_cache(maxsize=8)
def reshard_time(mesh: MeshDesc, hw: Hardware):
    """Resharding time per (source spec, target spec, bytes) on a mesh, memoised (one
    table per mesh and hardware, shared by follower merging and the request)."""

    @functools.cache
    def rt(src, dst, nbytes):
        return coll.total_time(reshard(src, dst, nbytes, mesh), mesh, hw)

    return rt


class FollowCache:
    """A follower's strategy for each layout of its operand: take the operand as it
    comes if possible; then split nothing more than needed (the first such strategy
    on ties). Copies of an operation share their strategy tuple, so answers are kept
    per (strategies, operand position, operand layout, bytes)."""

    def __init__(self, rtime):
        self.rtime = rtime
        self.answers: dict = {}
        self.groups: dict = {}

    def _groups(self, strategies, pos):
        """Per distinct operand layout, its best strategy by (axes used, cost, index),
        in that order."""
        key = (id(strategies), pos)
        if key not in self.groups:
            best: dict = {}
            for k, s in enumerate(strategies):
                cand = (s.axes_used, s.cost, k)
                spec = s.in_specs[pos]
                if spec not in best or cand < best[spec]:
                    best[spec] = cand
            ranked = sorted(best.items(), key=lambda item: item[1])
            self.groups[key] = (strategies, ranked)  # keeps strategies alive
        return self.groups[key][1]

    def __call__(self, strategies, pos, spec, nbytes) -> int:
        key = (id(strategies), pos, spec, nbytes)
        if key not in self.answers:
            # the least (resharding time, axes used, cost, index); groups come ranked
            # by the rest, so the first that takes the operand for free wins
            found = None
            for want, cand in self._groups(strategies, pos):
                t = self.rtime(spec, want, nbytes)
                if found is None or (t, *cand) < found:
                    found = (t, *cand)
                if t == 0:
                    break
            self.answers[key] = found[-1]
        return self.answers[key]


def build_request(problem: Problem, time_limit: float) -> SolverRequest:
    """The ILP over root units: node costs, resharding edges, state ties."""
    g, rtime = problem.graph, reshard_time(problem.mesh, problem.hw)
    node = {r: i for i, r in enumerate(problem.roots)}
    costs = [np.zeros(len(problem.units[r])) for r in problem.roots]
    n_in = len(g.inputs) + len(g.consts)
    inputs = set(g.inputs)
    edges = []
    made: dict = {}  # copies of an operation repeat the same edge
    own: dict = {}  # strategy costs per strategy tuple
    for u, strategies in enumerate(problem.units):
        root, fol = problem.root_of[u], problem.follow[u]
        # an operation inside a loop body (and the resharding of its operands) is paid
        # once per iteration
        weight = 1 if u < n_in else g.nodes[u - n_in].weight
        if id(strategies) not in own:  # copies of an operation share their strategies
            own[id(strategies)] = (strategies, np.array([st.cost for st in strategies]))
        costs[node[root]] += weight * own[id(strategies)][1][fol]
        if u < n_in:
            continue
        node_u = g.nodes[u - n_in]
        for pos, v in enumerate(node_u.inputs):
            if isinstance(v, Lit):
                continue
            nbytes = g.values[v].nbytes
            # a parameter gathered for a matmul can be prefetched behind earlier compute
            hidden = v in inputs and node_u.name in CONTRACTIONS
            scale = weight * (1 - problem.hw.prefetch_overlap) if hidden else weight
            src, idx = problem.value_src[v]
            src_root = problem.root_of[src]
            # copies of an operation read copies of the same producer: keyed by identity
            sig = (id(problem.units[src]), idx, id(problem.follow[src]), id(strategies))
            sig += (pos, id(fol), nbytes, scale, src_root == root)
            if sig not in made:
                args = (strategies, fol, pos, rtime, scale, src_root == root, made)
                made[sig] = _operand_cost(problem, v, *args)
            if made[sig] is None:
                continue
            if src_root == root:
                costs[node[root]] += made[sig]
            else:
                edges.append(Edge(node[src_root], node[root], *made[sig]))
    pairs = [(g.inputs[i], g.outputs[o]) for i, o in g.ties] + list(g.value_ties)
    ties = [_tie(problem, node, vi, vo) for vi, vo in pairs]
    return SolverRequest(
        tuple(costs),
        tuple(edges),
        tuple(t for t in ties if t),
        time_limit,
        _fused_latencies(problem, node),
    )


def _operand_cost(problem: Problem, v, strategies, fol, pos, rtime, scale, same, made):
    """Resharding cost of one operand: with `same` (producer and reader share a root)
    an array per strategy of that root, else the edge between the two ILP nodes
    (None if it costs nothing). made: edges by their (have, want) layouts."""
    nbytes = problem.graph.values[v].nbytes
    src_root = problem.root_of[problem.value_src[v][0]]
    have = [problem.spec_of(v, j) for j in range(len(problem.units[src_root]))]
    want = [strategies[k].in_specs[pos] for k in fol]
    if same:
        return scale * np.array([rtime(a, b, nbytes) for a, b in zip(have, want, strict=True)])
    key = (tuple(have), tuple(want), nbytes, scale)
    if key not in made:
        made[key] = edge_between(have, want, functools.partial(_sized, rtime, nbytes, scale))
    return made[key]


def _fused_latencies(problem: Problem, node) -> tuple[SharedCost, ...]:
    """One latency per mesh-axis group of fused all-reduces, shared by every root
    strategy whose (followers') strategies join that group."""
    members: dict[tuple[int, ...], dict[int, set[int]]] = {}
    for u, strategies in enumerate(problem.units):
        root = problem.root_of[u]
        for j, k in enumerate(problem.follow[u]):
            for g in strategies[k].fused_groups:
                members.setdefault(g, {}).setdefault(node[root], set()).add(j)
    return shared_costs(members, problem.mesh, problem.hw)


def shared_costs(members: dict, mesh: MeshDesc, hw: Hardware) -> tuple[SharedCost, ...]:
    """One fused collective latency per device group of more than one device, paid
    once if any of its members (ILP node -> strategy indices) is chosen."""
    return tuple(
        SharedCost(
            coll.fixed_cost(g, hw),
            tuple((n, tuple(sorted(js))) for n, js in sorted(m.items())),
        )
        for g, m in sorted(members.items())
        if mesh.group(g) > 1
    )


def _sized(rtime, nbytes, weight, a, b) -> float:
    return weight * rtime(a, b, nbytes)


def _classes(specs):
    index: dict = {}
    return np.array([index.setdefault(s, len(index)) for s in specs]), list(index)


def edge_between(have, want, cost_fn):
    """(row class per producer strategy, column class per consumer strategy, cost) of
    an edge between two ILP nodes, or None if it costs nothing; layout classes with
    identical cost rows (columns) are merged, which keeps edges between many-layout
    tensors small."""
    uc, rows = _classes(have)
    vc, cols = _classes(want)
    cost = np.array([[cost_fn(a, b) for b in cols] for a in rows])
    if not cost.any():
        return None
    cost, row_of = np.unique(cost, axis=0, return_inverse=True)
    cost, col_of = np.unique(cost, axis=1, return_inverse=True)
    return row_of.ravel()[uc], col_of.ravel()[vc], cost


def _tie(problem: Problem, node, vi: int, vo) -> Tie | None:
    """Values vi and vo take the same layout (state in and out, a loop carry)."""
    if isinstance(vo, Lit) or vo == vi:
        return None
    ri, ro = (problem.root_of[problem.value_src[v][0]] for v in (vi, vo))
    index: dict = {}
    ic = np.array(
        [
            index.setdefault(problem.spec_of(vi, j), len(index))
            for j in range(len(problem.units[ri]))
        ]
    )
    oc = np.array(
        [
            index.setdefault(problem.spec_of(vo, j), len(index))
            for j in range(len(problem.units[ro]))
        ]
    )
    return Tie(node[ri], node[ro], ic, oc)


def decode(problem: Problem, choice) -> tuple[int, ...]:
    """Strategy index of every unit from the ILP's choice per root."""
    pick = dict(zip(problem.roots, choice, strict=True))
    return tuple(
        int(problem.follow[u][pick[problem.root_of[u]]]) for u in range(len(problem.units))
    )
