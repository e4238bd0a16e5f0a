"""jaxpr -> OpGraph: a flat list of operations over numbered values.

Call-like equations (jit, custom_jvp/vjp, remat) are inlined; loops and branches stay
whole as one node. Inputs keep their pytree paths, and state that flows in and out
(params, optimizer moments, step counter) is recorded as ties.
"""

from __future__ import annotations

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
    shape: tuple[int, ...]
    dtype: np.dtype
    name: str = ""

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclass(frozen=True, eq=False)
class Node:
    """One operation: a primitive applied to values (or literals), giving values."""

    id: int
    primitive: Any  # jax Primitive, used again when the graph is re-interpreted
    params: dict = field(repr=False)
    inputs: tuple[int | Lit, ...]
    outputs: tuple[int, ...]

    @property
    def name(self) -> str:
        return self.primitive.name


@dataclass(frozen=True, eq=False)
class OpGraph:
    values: tuple[ValueInfo, ...]
    nodes: tuple[Node, ...]
    inputs: tuple[int, ...]  # value ids of the flat step arguments
    consts: tuple[tuple[int, Any], ...]  # (value id, array) closed over by the step
    outputs: tuple[int | Lit, ...]
    ties: tuple[tuple[int, int], ...]  # (flat input index, flat output index)
    traced: Traced = field(repr=False)

    def producer(self) -> dict[int, int]:
        return {v: n.id for n in self.nodes for v in n.outputs}

    def consumers(self) -> dict[int, list[tuple[int, int]]]:
        """value id -> [(node id, operand position)]."""
        out: dict[int, list[tuple[int, int]]] = {}
        for n in self.nodes:
            for pos, v in enumerate(n.inputs):
                if isinstance(v, int):
                    out.setdefault(v, []).append((n.id, pos))
        return out

    def shape(self, ref: int | Lit) -> tuple[int, ...]:
        return ref.shape if isinstance(ref, Lit) else self.values[ref].shape


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

    def value(self, aval: Any, name: str = "") -> int:
        self.values.append(ValueInfo(tuple(aval.shape), np.dtype(aval.dtype), name))
        return len(self.values) - 1

    def read(self, env: dict, atom: Any) -> int | Lit:
        if jax_core.is_literal(atom):
            return Lit(atom.val, tuple(np.shape(atom.val)))
        return env[atom]

    def inline(self, jaxpr: Any, env: dict, consts: list) -> list[tuple[int, Any]]:
        """Add jaxpr's equations with env mapping its invars; returns new consts."""
        new_consts = []
        for eqn in jaxpr.eqns:
            ins = [self.read(env, a) for a in eqn.invars]
            body = jax_core.INLINE_BODY_PARAM.get(eqn.primitive.name)
            if body is not None and body in eqn.params:
                inner, inner_consts = jax_core.split_closed(eqn.params[body])
                inner_env = {}
                for cv, c in zip(inner.constvars, inner_consts, strict=True):
                    inner_env[cv] = self.value(cv.aval, "const")
                    new_consts.append((inner_env[cv], c))
                inner_env.update(zip(inner.invars, ins, strict=True))
                new_consts += self.inline(inner, inner_env, consts)
                for ov, iv in zip(eqn.outvars, inner.outvars, strict=True):
                    env[ov] = self.read(inner_env, iv)
                continue
            outs = [self.value(v.aval) for v in eqn.outvars]
            for v, o in zip(eqn.outvars, outs, strict=True):
                if not jax_core.is_dropvar(v):
                    env[v] = o
            node = Node(len(self.nodes), eqn.primitive, dict(eqn.params), tuple(ins), tuple(outs))
            self.nodes.append(node)
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
    const_vals += b.inline(jaxpr, env, consts)
    outputs = tuple(b.read(env, v) for v in jaxpr.outvars)
    return OpGraph(
        tuple(b.values),
        tuple(b.nodes),
        tuple(inputs),
        tuple(const_vals),
        outputs,
        state_ties(traced),
        traced,
    )
