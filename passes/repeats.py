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

    Each round, an operation's colour mixes its last colour, its operands' colours in
    order (a literal by its shape; an operation's result by that operation's colour
    and the output index, none before the first round) and the multiset of (reader's
    colour, operand position) of its results; an input's mixes its last colour with
    the multiset of its readers' new colours. Colours are 64-bit hashes, ordered
    tuples as chained mixes and multisets as wrapping sums of mixes, so a round is a
    few array operations, not a pass over every operation.

    Args:
      graph: the operation graph.
      rounds: refinement rounds (hops of context that must agree).

    Returns:
      One int per unit; equal ints mark copies.

    Example:
      >>> colours = unit_colours(graph)  # doctest: +SKIP
    """
    w = _Wiring(graph)
    src = np.array(w.src0, dtype=np.int64).view(np.uint64)
    own = _Own()
    node = np.array([own(graph, n) for n in graph.nodes], dtype=np.int64).view(np.uint64)
    n_src = len(src)
    val = np.zeros(len(graph.values), dtype=np.uint64)
    val[w.src_values] = src
    for _ in range(rounds):  # each round reads the last round's colours only
        operand = np.where(w.op_val >= 0, val[w.op_val], w.op_lit)
        ins = _sum(len(node), w.op_node, _mix(operand + w.op_salt))
        reads = _sum(len(node), w.rd_owner, _mix(node[w.rd_node] + w.rd_salt))
        node = _mix(_mix(_mix(node ^ _NODE) + ins) + reads)
        reads = _sum(n_src, w.srd_owner, _mix(node[w.srd_node] + w.srd_salt))
        src = _mix(_mix(src ^ _SOURCE) + reads)
        val[w.out_values] = _mix(node[w.out_node] + w.out_salt)
        val[w.src_values] = src
    return [*src.tolist(), *node.tolist()]


# Odd 64-bit constants that keep the parts of a colour apart before mixing.
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_NODE = np.uint64(0x243F6A8885A308D3)
_SOURCE = np.uint64(0x13198A2E03707344)


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise (uint64 arithmetic wraps)."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _sum(n: int, owner: np.ndarray, terms: np.ndarray) -> np.ndarray:
    out = np.zeros(n, dtype=np.uint64)
    np.add.at(out, owner, terms)
    return out


def _salt(k) -> np.ndarray:
    """A distinct offset per position (operand, output) in a tuple."""
    return (np.asarray(k, dtype=np.uint64) + np.uint64(1)) * _GOLDEN


class _Wiring:
    """The graph's wiring as flat index arrays: operands (op_*), reads of operations'
    results (rd_*) and of inputs' (srd_*), operations' results (out_*)."""

    def __init__(self, graph: OpGraph):
        sources = [*graph.inputs, *(v for v, _ in graph.consts)]
        self.src_values = np.array(sources, dtype=np.int64)
        self.src0 = [
            hash(("in", _LAYER_INDEX.sub("#", graph.values[v].name), *_what(graph.values[v])))
            for v in graph.inputs
        ]
        self.src0 += [hash(("const", *_what(graph.values[v]))) for v, _ in graph.consts]
        owner = {v: (-1 - i) for i, v in enumerate(sources)}  # a source: -1 - its index
        out_node, out_k, out_values = [], [], []
        for n in graph.nodes:
            for k, o in enumerate(n.outputs):
                owner[o] = n.id
                out_node.append(n.id)
                out_k.append(k)
                out_values.append(o)
        self.out_node = np.array(out_node, dtype=np.int64)
        self.out_values = np.array(out_values, dtype=np.int64)
        self.out_salt = _salt(out_k)
        op_node, op_pos, op_val, op_lit, rd = [], [], [], [], []
        for n in graph.nodes:
            for pos, r in enumerate(n.inputs):
                op_node.append(n.id)
                op_pos.append(pos)
                lit = isinstance(r, Lit)
                op_val.append(-1 if lit else r)
                op_lit.append(hash(("lit", r.shape)) if lit else 0)
                if not lit and r in owner:
                    rd.append((owner[r], n.id, pos))
        self.op_node = np.array(op_node, dtype=np.int64)
        self.op_val = np.array(op_val, dtype=np.int64)
        self.op_lit = np.array(op_lit, dtype=np.int64).view(np.uint64)
        self.op_salt = _salt(op_pos)
        rd_n = [x for x in rd if x[0] >= 0]
        rd_s = [(-1 - o, c, p) for o, c, p in rd if o < 0]
        self.rd_owner, self.rd_node, self.rd_salt = _columns(rd_n)
        self.srd_owner, self.srd_node, self.srd_salt = _columns(rd_s)


def _columns(rows) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(owner, reader, salt of the operand position) arrays of (owner, reader, pos)."""
    a = np.array(rows, dtype=np.int64).reshape(-1, 3)
    return a[:, 0], a[:, 1], _salt(a[:, 2])


def _what(info) -> tuple:
    return info.shape, str(info.dtype)


class _Own:
    """What an operation is, apart from where it sits, as a hash; the readable forms of
    dtypes and literal values (slow to make) are made once per distinct one."""

    def __init__(self):
        self._dtypes: dict = {}
        self._lits: dict = {}

    def dtype(self, dtype) -> str:
        try:
            s = self._dtypes.get(dtype)
        except TypeError:  # an unhashable dtype: no memo
            return str(dtype)
        if s is None:
            s = self._dtypes[dtype] = str(dtype)
        return s

    def lit(self, value) -> str:
        if not isinstance(value, np.ndarray) or value.dtype.hasobject:
            return repr(value)
        key = (type(value), value.dtype, value.shape, getattr(value, "weak_type", None))
        key = (*key, value.tobytes())
        s = self._lits.get(key)
        if s is None:
            s = self._lits[key] = repr(value)
        return s

    def __call__(self, graph: OpGraph, n) -> int:
        values = graph.values
        return hash(
            (
                n.name,
                n.weight,
                _param_sig(n.params),
                tuple(graph.shape(r) for r in n.inputs),
                tuple((values[o].shape, self.dtype(values[o].dtype)) for o in n.outputs),
                tuple(self.lit(r.value) for r in n.inputs if isinstance(r, Lit)),
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
