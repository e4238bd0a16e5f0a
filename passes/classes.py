"""The strategy problem built once per class of repeated operations.

`simplify.merge_followers` and `simplify.build_request` walk every operation on every
mesh, then `repeats.Collapse.request` sums the copies of repeated layers. Most of that
walk does not depend on the mesh (which operand an operation follows, which ILP node
decides it, which nodes are copies), and the rest depends on a few signatures only:

- a *source*: what an operation's strategies are made from (its `OpInfo`, or an
  input's shape and bytes); equal sources have the same strategies on every mesh;
- a *follow class*: a source with the chain that leads to its root (operand
  position, the followed producer's follow class, output index, bytes); equal follow
  classes have the same strategy map on every mesh;
- an *operand term*: a reader's follow class, operand position and the producer's
  follow class, output and bytes; equal terms cost the same on every mesh.

`skeleton` finds these once per graph and adds up how often each term occurs per
class of ILP nodes (`repeats.collapse_roots`' classes). `class_problem` then does the
mesh's work once per source, follow class and term, and sums the class-level request
from the counts: the same request as `Collapse.request(build_request(...))`, without
a pass over every operation.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from autoshard.cost_model.hardware import Hardware, MeshDesc
from autoshard.cost_model.ilp import Edge, SharedCost, SolverRequest, Tie
from autoshard.passes.graph import Lit, OpGraph
from autoshard.passes.repeats import Collapse
from autoshard.passes.rules.families import CONTRACTIONS
from autoshard.passes.simplify import (
    FollowCache,
    Problem,
    edge_between,
    followed_operands,
    reshard_time,
    shared_costs,
)
from autoshard.passes.strategies import enumerate_strategies, source_strategies


@dataclass(frozen=True, eq=False)
class Skeleton:
    """The mesh-independent part of the merged problem, with per-class term counts.

    sources: distinct strategy sources; unit_source: per unit, its source.
    follows: per follow class (source, followed class or -1, operand position, output
      index, bytes), followed classes first; unit_follow: per unit, its follow class.
    node_class: per ILP node (root unit), its class of copies.
    costs: (class, follow class, summed weight) of every unit's own cost.
    inner: (class, term, summed weight) of operands whose producer has the same root.
    edges: (producer's class, reader's class, term, summed weight), first-seen order.
    ties: (class, class, (follow class, output, follow class, output)), first-seen order.
    fused: per class, the follow classes of its members (their fused all-reduces).
    terms: (producer follow class, output, reader follow class, operand position,
      bytes, prefetched) per operand term.
    """

    sources: tuple
    unit_source: tuple[int, ...]
    follows: tuple[tuple, ...]
    unit_follow: tuple[int, ...]
    root_of: tuple[int, ...]
    followed_pos: tuple[int | None, ...]
    roots: tuple[int, ...]
    value_src: dict
    node_class: np.ndarray
    costs: tuple[tuple[int, int, float], ...]
    inner: tuple[tuple[int, int, float], ...]
    edges: tuple[tuple[int, int, int, float], ...]
    ties: tuple[tuple[int, int, tuple], ...]
    fused: tuple[tuple[int, ...], ...]
    terms: tuple[tuple, ...]


def _intern(table: dict, key) -> int:
    return table.setdefault(key, len(table))


def skeleton(graph: OpGraph, infos, colours) -> Skeleton:
    """The skeleton of graph's problem (infos: `search.op_infos`, colours:
    `repeats.unit_colours`, one per unit). Pure; no mesh involved."""
    n_in = len(graph.inputs) + len(graph.consts)
    srcs, usrc = _sources(graph, infos)
    value_src = {v: (i, 0) for i, v in enumerate([*graph.inputs, *(c for c, _ in graph.consts)])}
    for node in graph.nodes:
        value_src.update({v: (n_in + node.id, k) for k, v in enumerate(node.outputs)})
    follows, ufol, root_of, followed = _follow_classes(graph, n_in, usrc, value_src)
    roots = tuple(u for u in range(len(usrc)) if root_of[u] == u)
    # copies: equal colours and the same strategies (whether an all-reduce is fused
    # changes costs, not the strategies: such copies share variables, costs summed)
    kinds = [s if isinstance(s, tuple) else replace(s, fused_all_reduce=False) for s in srcs]
    index: dict = {}
    node_class = np.array(
        [_intern(index, (colours[r], kinds[usrc[r]])) for r in roots], dtype=np.int64
    )
    cls_of = dict(zip(roots, node_class.tolist(), strict=True))
    cls = [cls_of[root_of[u]] for u in range(len(usrc))]
    costs, inner, edges, terms = _counts(graph, n_in, value_src, root_of, ufol, cls)
    members: list[dict] = [{} for _ in range(len(index))]
    for u, f in enumerate(ufol):
        members[cls[u]][f] = None
    return Skeleton(
        tuple(srcs),
        tuple(usrc),
        tuple(follows),
        tuple(ufol),
        tuple(root_of),
        tuple(followed),
        roots,
        value_src,
        node_class,
        costs,
        inner,
        edges,
        _tie_terms(graph, value_src, root_of, ufol, cls),
        tuple(tuple(m) for m in members),
        terms,
    )


def _sources(graph: OpGraph, infos) -> tuple[dict, list[int]]:
    """(distinct sources, per unit its source)."""
    srcs: dict = {}
    infos_in = (graph.values[v] for v in graph.inputs)
    usrc = [_intern(srcs, ("src", i.shape, i.nbytes, i.is_key)) for i in infos_in]
    usrc += [_intern(srcs, ("src", graph.values[v].shape, 0, True)) for v, _ in graph.consts]
    by_id: dict = {}  # copies share one OpInfo: each is hashed once
    usrc += [
        by_id[id(op)] if id(op) in by_id else by_id.setdefault(id(op), _intern(srcs, op))
        for op in infos
    ]
    return srcs, usrc


def _follow_classes(graph: OpGraph, n_in: int, usrc, value_src):
    """(follow classes, per unit its follow class, root and followed operand), as
    `simplify.merge_followers` chooses them."""
    follows: dict = {}
    ufol = [_intern(follows, (s, -1, 0, 0, 0)) for s in usrc]
    root_of, followed = list(range(len(usrc))), [None] * len(usrc)
    for node, pos in zip(graph.nodes, followed_operands(graph), strict=True):
        u = n_in + node.id
        if pos is None:
            continue
        v = node.inputs[pos]
        p, idx = value_src[v]
        ufol[u] = _intern(follows, (usrc[u], ufol[p], pos, idx, graph.values[v].nbytes))
        root_of[u], followed[u] = root_of[p], pos
    return follows, ufol, root_of, followed


def _tie_terms(graph: OpGraph, value_src, root_of, ufol, cls) -> tuple:
    """(class, class, (follow class, output, follow class, output)) per distinct state
    tie (state in and out, loop carries), first-seen order."""
    pairs = [(graph.inputs[i], graph.outputs[o]) for i, o in graph.ties] + list(graph.value_ties)
    ties: dict = {}
    for vi, vo in pairs:
        if isinstance(vo, Lit) or vo == vi:
            continue
        (ui, ki), (uo, ko) = value_src[vi], value_src[vo]
        key = (cls[root_of[ui]], cls[root_of[uo]], (ufol[ui], ki, ufol[uo], ko))
        ties.setdefault(key, key)
    return tuple(ties)


def _counts(graph: OpGraph, n_in, value_src, root_of, ufol, cls):
    """(costs, inner, edges, terms) of the skeleton: weights summed per class."""
    costs: dict = {}
    inner: dict = {}
    edges: dict = {}
    terms: dict = {}
    inputs = set(graph.inputs)
    for u in range(len(ufol)):
        weight = 1 if u < n_in else graph.nodes[u - n_in].weight
        key = (cls[u], ufol[u])
        costs[key] = costs.get(key, 0) + weight
        if u < n_in:
            continue
        node = graph.nodes[u - n_in]
        for pos, v in enumerate(node.inputs):
            if isinstance(v, Lit):
                continue
            src, idx = value_src[v]
            hidden = v in inputs and node.name in CONTRACTIONS
            term = (ufol[src], idx, ufol[u], pos, graph.values[v].nbytes, hidden)
            t = _intern(terms, term)
            if root_of[src] == root_of[u]:
                key = (cls[u], t)
                inner[key] = inner.get(key, 0) + weight
            else:
                key = (cls[src], cls[u], t)
                edges[key] = edges.get(key, 0) + weight
    return (
        tuple((c, f, w) for (c, f), w in costs.items()),
        tuple((c, t, w) for (c, t), w in inner.items()),
        tuple((a, b, t, w) for (a, b, t), w in edges.items()),
        tuple(terms),
    )


def _strategies(source, mesh: MeshDesc, hw: Hardware):
    if isinstance(source, tuple):
        return source_strategies(source[1], source[2], mesh, hw, source[3])
    return enumerate_strategies(source, mesh, hw)


class MeshWork:
    """One mesh's answers per source, follow class and term, each computed once.

    Follow classes that differ only in where their chain starts (a residual stream
    followed back through every layer) get equal maps: those are merged here by
    content (`canon`), so the work on a mesh does not grow with depth."""

    def __init__(self, sk: Skeleton, mesh: MeshDesc, hw: Hardware):
        self.sk, self.mesh, self.hw = sk, mesh, hw
        self.strategies = [_strategies(s, mesh, hw) for s in sk.sources]
        self.rtime = reshard_time(mesh, hw)
        best = FollowCache(self.rtime)
        self._out: dict = {}
        self._terms: dict = {}
        self.maps: list[np.ndarray] = []  # per canonical follow class
        self.source: list[int] = []  # per canonical follow class
        self.canon: list[int] = []  # per follow class
        made: dict = {}  # (source, pos, canonical parent, idx, bytes) -> canonical
        content: dict = {}  # (source, map) -> canonical
        for s, parent, pos, idx, nbytes in sk.follows:
            key = (s, pos, self.canon[parent], idx, nbytes) if parent >= 0 else (s,)
            if key not in made:
                own = self.strategies[s]
                if parent < 0:
                    fmap = np.arange(len(own))
                else:
                    have = self._specs(self.canon[parent], idx)
                    fmap = np.array([best(own, pos, spec, nbytes) for spec in have])
                c = content.setdefault((s, fmap.tobytes()), len(self.maps))
                if c == len(self.maps):
                    self.maps.append(fmap)
                    self.source.append(s)
                made[key] = c
            self.canon.append(made[key])

    def _specs(self, c: int, idx: int) -> list:
        """Per strategy of the root, the layout of output idx of canonical class c."""
        key = (c, idx)
        if key not in self._out:
            own = self.strategies[self.source[c]]
            self._out[key] = [own[k].out_specs[idx] for k in self.maps[c]]
        return self._out[key]

    def follow(self, f: int) -> np.ndarray:
        return self.maps[self.canon[f]]

    def cost(self, f: int) -> np.ndarray:
        c = self.canon[f]
        key = ("cost", c)
        if key not in self._terms:  # follow classes of one canonical class share it
            own = self.strategies[self.source[c]]
            self._terms[key] = np.array([own[k].cost for k in self.maps[c]])
        return self._terms[key]

    def _operand(self, t: int):
        """(have, want, bytes, scale, key) of an operand term, per root strategy."""
        fs, idx, fr, pos, nbytes, hidden = self.sk.terms[t]
        cs, cr = self.canon[fs], self.canon[fr]
        key = (cs, idx, cr, pos, nbytes, hidden)
        reader = self.strategies[self.source[cr]]
        want = [reader[k].in_specs[pos] for k in self.maps[cr]]
        scale = 1 - self.hw.prefetch_overlap if hidden else 1.0
        return self._specs(cs, idx), want, nbytes, scale, key

    def _term_key(self, t: int):
        fs, idx, fr, pos, nbytes, hidden = self.sk.terms[t]
        return (self.canon[fs], idx, self.canon[fr], pos, nbytes, hidden)

    def inner(self, t: int) -> np.ndarray:
        key = ("inner", self._term_key(t))
        if key not in self._terms:
            have, want, nbytes, scale, _ = self._operand(t)
            rt = [self.rtime(a, b, nbytes) for a, b in zip(have, want, strict=True)]
            self._terms[key] = scale * np.array(rt)
        return self._terms[key]

    def edge(self, t: int):
        key = ("edge", self._term_key(t))
        if key not in self._terms:
            have, want, nbytes, scale, _ = self._operand(t)
            self._terms[key] = edge_between(
                have, want, lambda a, b: scale * self.rtime(a, b, nbytes)
            )
        return self._terms[key]


def on_mesh(sk: Skeleton, mesh: MeshDesc, hw: Hardware) -> MeshWork:
    """Strategies and follower maps on one mesh, once per source and follow class."""
    return MeshWork(sk, mesh, hw)


def class_problem(
    sk: Skeleton, graph: OpGraph, m: MeshWork, time_limit: float, max_variables=None
) -> tuple[Problem, SolverRequest | None, Collapse]:
    """The merged problem on m's mesh, its request over classes of copies (one ILP
    node per class) and the classes. Equal, up to float rounding of the sums, to
    `Collapse.request(build_request(merge_followers(...)))` with the same classes.

    Args:
      sk: `skeleton(graph, infos, colours)`.
      graph: the operation graph.
      m: `on_mesh(sk, mesh, hw)`.
      time_limit: the request's solver time limit.
      max_variables: if given, building stops as soon as the request has more
        variables (strategies and edge entries) than this, and request is None.

    Returns:
      (problem, request, collapse).

    Example:
      >>> sk = skeleton(graph, search.op_infos(graph), unit_colours(graph))  # doctest: +SKIP
      >>> problem, request, collapse = class_problem(sk, graph, on_mesh(sk, desc, hw), 60.0)
    """
    mesh, hw = m.mesh, m.hw
    units = tuple(m.strategies[s] for s in sk.unit_source)
    problem = Problem(
        graph,
        mesh,
        hw,
        units,
        sk.value_src,
        sk.root_of,
        tuple(m.follow(f) for f in sk.unit_follow),
        sk.followed_pos,
        sk.roots,
    )
    collapse = Collapse(sk.node_class)
    n = collapse.classes
    size = [0] * n
    for r, c in zip(sk.roots, sk.node_class.tolist(), strict=True):
        size[c] = len(units[r])
    costs = [np.zeros(k) for k in size]
    for c, f, w in sk.costs:
        costs[c] += w * m.cost(f)
    for c, t, w in sk.inner:
        costs[c] += w * m.inner(t)
    room = None if max_variables is None else max_variables - sum(size)
    edges = _edges(sk, m, costs, room)
    if edges is None:
        return problem, None, collapse
    request = SolverRequest(tuple(costs), edges, _ties(sk, m), time_limit, _fused(sk, m))
    return problem, request, collapse


def _edges(sk: Skeleton, m: MeshWork, costs, room=None) -> tuple[Edge, ...] | None:
    """Edges between classes, merged when their layout classes agree; an edge within
    one class adds its diagonal to the class's own costs. None once the edges have
    more entries than room (when given)."""
    edges: dict = {}
    entries = 0
    for cu, cv, t, w in sk.edges:
        e = m.edge(t)
        if e is None:
            continue
        uc, vc, cost = e
        if cu == cv:
            costs[cu] += w * cost[uc, vc]
            continue
        key = (cu, cv, uc.tobytes(), vc.tobytes())
        old = edges.get(key)
        if old is None:
            entries += cost.size
            if room is not None and entries > room:
                return None
        edges[key] = Edge(cu, cv, uc, vc, w * cost if old is None else old.cost + w * cost)
    return tuple(edges.values())


def _ties(sk: Skeleton, m: MeshWork) -> tuple[Tie, ...]:
    ties: dict = {}
    for cu, cv, (fi, ki, fo, ko) in sk.ties:
        index: dict = {}
        ic = np.array([index.setdefault(s, len(index)) for s in m._specs(m.canon[fi], ki)])
        oc = np.array([index.setdefault(s, len(index)) for s in m._specs(m.canon[fo], ko)])
        ties.setdefault((cu, cv, ic.tobytes(), oc.tobytes()), Tie(cu, cv, ic, oc))
    return tuple(ties.values())


def _fused(sk: Skeleton, m: MeshWork) -> tuple[SharedCost, ...]:
    """One latency per mesh-axis group of fused all-reduces, shared by every class
    strategy whose members' strategies join that group."""
    joins: dict = {}  # canonical follow class -> {group: root strategies that join it}
    members: dict[tuple[int, ...], dict[int, set[int]]] = {}
    for c, fs in enumerate(sk.fused):
        for f in fs:
            k = m.canon[f]
            if k not in joins:
                own = m.strategies[m.source[k]]
                joins[k] = {}
                for j, s in enumerate(m.maps[k]):
                    for g in own[s].fused_groups:
                        joins[k].setdefault(g, set()).add(j)
            for g, js in joins[k].items():
                members.setdefault(g, {}).setdefault(c, set()).update(js)
    return shared_costs(members, m.mesh, m.hw)
