"""Repeated layers: solve every copy of an unrolled layer once.

An unrolled model runs the same layer code L times: the same operations on the same
shapes, wired the same way, reading parameters whose pytree paths differ only in the
layer index (``blocks/3/attn/q/kernel``). Such copies get one set of ILP variables:
the ILP grows with the number of *different* operations, not with depth.

Copies are found by colour refinement (Weisfeiler-Leman) over the operation graph.
Each value starts with a colour from what it is (an input: its path with every
layer index replaced by ``#``, its shape and dtype; a result: the operation's primitive,
shapes and parameters), and each round mixes in the colours of its neighbours, in
both directions. After `REFINE_ROUNDS` rounds two operations share a colour when
everything within that many hops looks the same: the copies of a layer in the middle
of the stack do, the first and last layers (next to the embedding or the head) and
anything else that differs keep colours of their own, and stay separate.

Sharing variables restricts the plan (every copy takes the same strategy) but is
exact for the plans it allows: node costs, edge costs, fused latencies and memory
rows of the copies are summed (see `collapse`), so the collapsed objective of a
choice equals the full objective of the choice expanded to every copy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace

import numpy as np

from autoshard.cost_model.ilp import (
    Copy,
    Edge,
    MemoryRow,
    SharedCost,
    SolverRequest,
    SolverResult,
    merge_copies,
)
from autoshard.cost_model.ilp import solve as _solve
from autoshard.passes.graph import Lit, OpGraph

# Hops of context two operations must agree on to be copies. More rounds separate
# more of the operations next to the first and last layer; fewer risk pairing
# operations that only look alike nearby.
REFINE_ROUNDS = 6
# A layer index is a whole path component ([3], ['3'], .3) or a name's numeric suffix
# after an underscore (Linen's Block_3, layers_3); digits inside a name (conv1, w2)
# name a role, and two roles are not copies of one layer.
_LAYER_INDEX = re.compile(r"(?<=[\[_.'\"])\d+(?=[\]'\"._]|$)")


def _param_sig(params: dict) -> tuple:
    """A hashable summary of an operation's parameters (long ones cut short: only
    while/cond carry jaxprs here, and their shapes are in the colour already)."""
    return tuple(sorted((k, str(v)[:200]) for k, v in params.items()))


def unit_colours(graph: OpGraph, rounds: int = REFINE_ROUNDS) -> list[int]:
    """Per unit (step inputs, then constants, then operations, as `Problem` numbers
    them), a colour shared by the copies of that input or operation in other layers.

    Args:
      graph: the operation graph.
      rounds: refinement rounds (hops of context that must agree).

    Returns:
      One int per unit; equal ints mark copies.

    Example:
      >>> colours = unit_colours(graph)  # doctest: +SKIP
    """
    val = [0] * len(graph.values)
    for v in graph.inputs:
        info = graph.values[v]
        val[v] = hash(("in", _LAYER_INDEX.sub("#", info.name), info.shape, str(info.dtype)))
    for v, _ in graph.consts:
        val[v] = hash(("const", graph.values[v].shape, str(graph.values[v].dtype)))
    node = [_own_colour(graph, n) for n in graph.nodes]
    consumers = graph.consumers()
    sources = [*graph.inputs, *(v for v, _ in graph.consts)]
    # the wiring, read once: operands (a literal by its shape), readers, outputs
    lits = [tuple(r.shape if isinstance(r, Lit) else None for r in n.inputs) for n in graph.nodes]
    reads = [[(c, p) for v in n.outputs for c, p in consumers.get(v, ())] for n in graph.nodes]
    src_reads = [consumers.get(v, []) for v in sources]
    for _ in range(rounds):  # each round reads the last round's colours only
        node = [
            hash(
                (
                    node[n.id],
                    tuple(
                        val[r] if lit is None else lit
                        for r, lit in zip(n.inputs, lits[n.id], strict=True)
                    ),
                    tuple(sorted((node[c], p) for c, p in reads[n.id])),
                )
            )
            for n in graph.nodes
        ]
        src = [
            hash((val[v], tuple(sorted((node[c], p) for c, p in rs))))
            for v, rs in zip(sources, src_reads, strict=True)
        ]
        for n in graph.nodes:
            for k, o in enumerate(n.outputs):
                val[o] = hash((node[n.id], k))
        for v, c in zip(sources, src, strict=True):
            val[v] = c
    return [*(val[v] for v in sources), *node]


def _own_colour(graph: OpGraph, n) -> int:
    """What an operation is, apart from where it sits."""
    return hash(
        (
            n.name,
            n.weight,
            _param_sig(n.params),
            tuple(graph.shape(r) for r in n.inputs),
            tuple((graph.values[o].shape, str(graph.values[o].dtype)) for o in n.outputs),
            tuple(repr(r.value) for r in n.inputs if isinstance(r, Lit)),
        )
    )


@dataclass(frozen=True)
class Collapse:
    """ILP nodes grouped into classes that share one set of variables.

    node_class: per ILP node, its class (classes numbered 0..n-1 in first-seen order).
    """

    node_class: np.ndarray

    @property
    def classes(self) -> int:
        return int(self.node_class.max(initial=-1)) + 1

    def request(self, req: SolverRequest) -> SolverRequest:
        """The request over classes: costs, edges, ties, fused latencies and memory
        rows of the members summed (exact for choices that agree within a class)."""
        cls = self.node_class
        costs = [np.zeros(0)] * self.classes
        for i, c in enumerate(req.node_costs):
            k = cls[i]
            costs[k] = np.asarray(c, float) + (costs[k] if len(costs[k]) else 0.0)
        edges: dict = {}
        for e in req.edges:
            cu, cv = int(cls[e.u]), int(cls[e.v])
            if cu == cv:  # both ends in one class: the pair's cost is the class's own
                costs[cu] = costs[cu] + e.cost[e.u_class, e.v_class]
                continue
            key = (cu, cv, e.u_class.tobytes(), e.v_class.tobytes())
            old = edges.get(key)
            edges[key] = Edge(
                cu, cv, e.u_class, e.v_class, e.cost if old is None else old.cost + e.cost
            )
        ties = {}
        for t in req.ties:
            nt = replace(t, u=int(cls[t.u]), v=int(cls[t.v]))
            ties.setdefault((nt.u, nt.v, t.u_class.tobytes(), t.v_class.tobytes()), nt)
        shared = []
        for sc in req.shared:
            members: dict[int, set[int]] = {}
            for n, js in sc.members:
                members.setdefault(int(cls[n]), set()).update(js)
            shared.append(
                SharedCost(
                    sc.cost, tuple((n, tuple(sorted(js))) for n, js in sorted(members.items()))
                )
            )
        return replace(
            req,
            node_costs=tuple(costs),
            edges=tuple(edges.values()),
            ties=tuple(ties.values()),
            shared=tuple(shared),
            memory=tuple(self.row(r) for r in req.memory),
        )

    def row(self, row: MemoryRow) -> MemoryRow:
        copies = [
            Copy(c.nbytes, tuple((self._terms(t), k) for t, k in c.witnesses))
            for c in row.copies
        ]
        return MemoryRow(self._terms(row.terms), row.const, merge_copies(copies))

    def _terms(self, terms):
        out: dict[int, np.ndarray] = {}
        for n, b in terms:
            k = int(self.node_class[n])
            out[k] = out[k] + b if k in out else np.asarray(b, float)
        return tuple(sorted(out.items()))

    def expand(self, choice) -> tuple[int, ...]:
        """Per ILP node, its class's choice."""
        return tuple(int(choice[k]) for k in self.node_class)


def identity(n: int) -> Collapse:
    """No two ILP nodes share variables."""
    return Collapse(np.arange(n))


def collapse_roots(colours, roots, units) -> Collapse:
    """Classes of ILP nodes (root units): equal colour and equal strategy count.

    Args:
      colours: per unit, from `unit_colours`.
      roots: the problem's root units, in ILP node order.
      units: strategies per unit.

    Returns:
      The Collapse; ILP nodes of one class share variables.
    """
    index: dict = {}
    out = [index.setdefault((colours[u], len(units[u])), len(index)) for u in roots]
    return Collapse(np.array(out, dtype=np.int64))


def solve(request: SolverRequest, collapse: Collapse | None = None) -> SolverResult:
    """Solve with copies sharing variables; the result is for the full request
    (choice per ILP node, objective re-evaluated), sizes those of the solved ILP."""
    if collapse is None or collapse.classes == len(request.node_costs):
        return _solve(request)
    small = collapse.request(request)
    res = _solve(small)
    return replace(res, choice=collapse.expand(res.choice))
