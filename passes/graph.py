"""jaxpr -> OpGraph: a flat list of operations over numbered values.

Call-like equations (jit, custom_jvp/vjp, remat) are inlined. A `scan` is planned
through its body: the body's operations join the graph once, weighted by the trip
count, between boundary operations that slice the scanned operands (`loop_slice`),
pass constants and carries in (`loop_enter`), stack the per-iteration results
(`loop_stack`) and hand the final carries out (`loop_exit`); each carry is tied to
one layout in and out. `while` loops and `cond` stay whole as one node. Inputs keep
their pytree paths, and state that flows in and out (params, optimizer moments,
step counter) is recorded as ties.
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from autoshard.passes import jax_core
from autoshard.passes.rules.families import CONTRACTIONS
from autoshard.passes.trace import Traced


@dataclass(frozen=True)
class Lit:
    """A literal operand (a constant scalar in the jaxpr)."""

    value: Any
    shape: tuple[int, ...] = ()


@dataclass(frozen=True)
class ValueInfo:
    """One value: shape, dtype (a numpy dtype, or a jax PRNG key dtype such as
    `key<fry>`, which numpy cannot interpret) and a readable name."""

    shape: tuple[int, ...]
    dtype: Any
    name: str = ""

    @functools.cached_property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def is_key(self) -> bool:
        """A typed PRNG key array: kept whole on every device."""
        return is_key_dtype(self.dtype)


def is_key_dtype(dtype: Any) -> bool:
    """Whether dtype is a jax PRNG key dtype (`key<fry>`, `key<rbg>`, ...)."""
    return jax_core.is_key_dtype(dtype)


@dataclass(frozen=True)
class Boundary:
    """A planning-only operation at a scan's edge; never bound to jax."""

    name: str


LOOP_ENTER = Boundary("loop_enter")  # a constant or initial carry, as the body sees it
LOOP_SLICE = Boundary("loop_slice")  # stacked operand [L, ...] -> one iteration's [...]
LOOP_STACK = Boundary("loop_stack")  # one iteration's result [...] -> stacked [L, ...]
LOOP_EXIT = Boundary("loop_exit")  # the body's last carry -> the loop's result


@dataclass(frozen=True, eq=False)
class Node:
    """One operation: a primitive applied to values (or literals), giving values.

    weight: how many times it runs per step (the product of enclosing trip counts).
    region: the loop whose body holds it (-1: the step itself).
    boundary: for loop boundary operations, the loop they belong to (-1 otherwise).
    """

    id: int
    primitive: Any  # jax Primitive (or Boundary), used again by the interpreter
    params: dict = field(repr=False)
    inputs: tuple[int | Lit, ...]
    outputs: tuple[int, ...]
    weight: int = 1
    region: int = -1
    boundary: int = -1

    @property
    def name(self) -> str:
        return self.primitive.name


@dataclass(frozen=True, eq=False)
class Loop:
    """A scan planned through its body.

    enter: boundary nodes, one per scan operand (constants, carries, scanned).
    exit: boundary nodes, one per scan result (carries, stacked).
    """

    id: int
    params: dict = field(repr=False)
    region: int
    enter: tuple[int, ...]
    exit: tuple[int, ...]

    @property
    def num_consts(self) -> int:
        return self.params["num_consts"]

    @property
    def num_carry(self) -> int:
        return self.params["num_carry"]


@dataclass(frozen=True, eq=False)
class OpGraph:
    values: tuple[ValueInfo, ...]
    nodes: tuple[Node, ...]
    inputs: tuple[int, ...]  # value ids of the flat step arguments
    consts: tuple[tuple[int, Any], ...]  # (value id, array) closed over by the step
    outputs: tuple[int | Lit, ...]
    ties: tuple[tuple[int, int], ...]  # (flat input index, flat output index)
    traced: Traced = field(repr=False)
    loops: tuple[Loop, ...] = ()
    value_ties: tuple[tuple[int, int], ...] = ()  # (carry in, carry out) value ids

    def producer(self) -> dict[int, int]:
        return {v: n.id for n in self.nodes for v in n.outputs}

    def consumers(self) -> dict[int, list[tuple[int, int]]]:
        """value id -> [(node id, operand position)]. Made once per graph and shared:
        read it, do not change it."""
        return _consumers(self)

    def shape(self, ref: int | Lit) -> tuple[int, ...]:
        return ref.shape if isinstance(ref, Lit) else self.values[ref].shape


_PER_GRAPH: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def per_graph(fn):
    """Decorator: fn(graph) computed once per graph (graphs are immutable) and kept
    while the graph lives. The result is shared between callers: read it, do not
    change it.

    Args:
      fn: a pure function of one OpGraph.

    Returns:
      fn, cached per graph.

    Example:
      >>> @per_graph
      ... def node_count(graph):
      ...     return len(graph.nodes)
    """

    @functools.wraps(fn)
    def cached(graph):
        memo = _PER_GRAPH.setdefault(graph, {})
        if fn not in memo:
            memo[fn] = fn(graph)
        return memo[fn]

    return cached


@per_graph
def _consumers(graph: OpGraph) -> dict[int, list[tuple[int, int]]]:
    out: dict[int, list[tuple[int, int]]] = {}
    for n in graph.nodes:
        for pos, v in enumerate(n.inputs):
            if isinstance(v, int):
                out.setdefault(v, []).append((n.id, pos))
    return out


@per_graph
def feeds_contraction(graph: OpGraph) -> tuple[bool, ...]:
    """Per node: does any matmul/convolution depend on its results? Collectives of
    nodes that feed none (gradients on their way to the optimizer, the loss) are
    independent of each other, which is what lets XLA fuse their all-reduces."""
    consumers = graph.consumers()
    feeds = [False] * len(graph.nodes)
    for n in reversed(graph.nodes):
        users = [graph.nodes[c] for v in n.outputs for c, _ in consumers.get(v, ())]
        feeds[n.id] = any(u.name in CONTRACTIONS or feeds[u.id] for u in users)
    return tuple(feeds)


class _Builder:
    def __init__(self) -> None:
        self.values: list[ValueInfo] = []
        self.nodes: list[Node] = []
        self.loops: list[Loop | None] = []
        self.value_ties: list[tuple[int, int]] = []

    def node(self, primitive, params, ins, outs, weight, region, boundary=-1) -> int:
        n = Node(
            len(self.nodes), primitive, params, tuple(ins), tuple(outs), weight, region, boundary
        )
        self.nodes.append(n)
        return n.id

    def value(self, aval: Any, name: str = "") -> int:
        self.values.append(ValueInfo(tuple(aval.shape), jax_core.value_dtype(aval.dtype), name))
        return len(self.values) - 1

    def read(self, env: dict, atom: Any) -> int | Lit:
        if jax_core.is_literal(atom):
            return Lit(atom.val, tuple(np.shape(atom.val)))
        return env[atom]

    def closed_consts(self, jaxpr: Any, env: dict) -> tuple[Any, list[tuple[int, Any]]]:
        inner, inner_consts = jax_core.split_closed(jaxpr)
        new = []
        for cv, c in zip(inner.constvars, inner_consts, strict=True):
            env[cv] = self.value(cv.aval, "const")
            new.append((env[cv], c))
        return inner, new

    def scan(self, eqn, ins, env, weight: int, region: int) -> list[tuple[int, Any]]:
        """Add a scan as boundary nodes around its body's operations."""
        lid = len(self.loops)
        self.loops.append(None)
        inner_env: dict = {}
        body, new_consts = self.closed_consts(eqn.params["jaxpr"], inner_env)
        first_x = eqn.params["num_consts"] + eqn.params["num_carry"]
        enter = []
        for k, (iv, ref) in enumerate(zip(body.invars, ins, strict=True)):
            inner_env[iv] = self.value(iv.aval)
            kind = LOOP_SLICE if k >= first_x else LOOP_ENTER
            enter.append(self.node(kind, {}, [ref], [inner_env[iv]], weight, region, lid))
        inner_weight = weight * int(eqn.params["length"])
        new_consts += self.inline(body, inner_env, inner_weight, lid)
        n_carry = eqn.params["num_carry"]
        outs = [self.read(inner_env, v) for v in body.outvars]
        for k in range(n_carry):
            cin, cout = inner_env[body.invars[eqn.params["num_consts"] + k]], outs[k]
            if isinstance(cout, int) and cout != cin:
                self.value_ties.append((cin, cout))
        exits = []
        for k, (ov, ref) in enumerate(zip(eqn.outvars, outs, strict=True)):
            out = self.value(ov.aval)
            if not jax_core.is_dropvar(ov):
                env[ov] = out
            kind = LOOP_EXIT if k < n_carry else LOOP_STACK
            exits.append(self.node(kind, {}, [ref], [out], inner_weight, region, lid))
        self.loops[lid] = Loop(lid, dict(eqn.params), region, tuple(enter), tuple(exits))
        return new_consts

    def inline(
        self, jaxpr: Any, env: dict, weight: int = 1, region: int = -1
    ) -> list[tuple[int, Any]]:
        """Add jaxpr's equations with env mapping its invars; returns new consts."""
        new_consts = []
        for eqn in jaxpr.eqns:
            ins = [self.read(env, a) for a in eqn.invars]
            if eqn.primitive.name == "scan":
                new_consts += self.scan(eqn, ins, env, weight, region)
                continue
            body = jax_core.INLINE_BODY_PARAM.get(eqn.primitive.name)
            if body is not None and body in eqn.params:
                inner_env: dict = {}
                inner, inner_consts = self.closed_consts(eqn.params[body], inner_env)
                new_consts += inner_consts
                inner_env.update(zip(inner.invars, ins, strict=True))
                new_consts += self.inline(inner, inner_env, weight, region)
                for ov, iv in zip(eqn.outvars, inner.outvars, strict=True):
                    env[ov] = self.read(inner_env, iv)
                continue
            outs = [self.value(v.aval) for v in eqn.outvars]
            for v, o in zip(eqn.outvars, outs, strict=True):
                if not jax_core.is_dropvar(v):
                    env[v] = o
            self.node(eqn.primitive, dict(eqn.params), ins, outs, weight, region)
        return new_consts


def state_ties(traced: Traced) -> tuple[tuple[int, int], ...]:
    """Pair each argument with the output of the same pytree structure and avals:
    (state, batch) -> (new_state, metrics) ties every leaf of state to new_state."""
    arg_trees = traced.in_tree.children()
    out_children = traced.out_tree.children() if traced.out_tree.num_nodes > 1 else []
    if not out_children or traced.out_tree.num_leaves == 1:
        out_children = [traced.out_tree]
    offsets_in = np.cumsum([0] + [t.num_leaves for t in arg_trees])
    offsets_out = np.cumsum([0] + [t.num_leaves for t in out_children])
    ties, used = [], set()
    for a, at in enumerate(arg_trees):
        a_avals = traced.in_avals[offsets_in[a] : offsets_in[a + 1]]
        for o, ot in enumerate(out_children):
            o_avals = traced.out_avals[offsets_out[o] : offsets_out[o + 1]]
            same = [(x.shape, x.dtype) for x in a_avals] == [(y.shape, y.dtype) for y in o_avals]
            if o not in used and at == ot and same and at.num_leaves > 0:
                used.add(o)
                ties += [
                    (int(offsets_in[a]) + k, int(offsets_out[o]) + k) for k in range(at.num_leaves)
                ]
                break
    return tuple(ties)


def build_graph(traced: Traced) -> OpGraph:
    """Flatten the traced step into an OpGraph (pure: the jaxpr is not changed)."""
    b = _Builder()
    jaxpr, consts = jax_core.split_closed(traced.jaxpr)
    env: dict = {}
    inputs = []
    for v, path in zip(jaxpr.invars, traced.in_paths, strict=True):
        env[v] = b.value(v.aval, path)
        inputs.append(env[v])
    const_vals = []
    for cv, c in zip(jaxpr.constvars, consts, strict=True):
        env[cv] = b.value(cv.aval, "const")
        const_vals.append((env[cv], c))
    const_vals += b.inline(jaxpr, env)
    outputs = tuple(b.read(env, v) for v in jaxpr.outvars)
    return OpGraph(
        tuple(b.values),
        tuple(b.nodes),
        tuple(inputs),
        tuple(const_vals),
        outputs,
        state_ties(traced),
        traced,
        tuple(b.loops),
        tuple(b.value_ties),
    )
