"""Find the layer-stack loops a pipeline can split into stages.

A train step's jaxpr after AD holds the forward `scan` over the stacked layers
(saving residuals stacked per layer) and a reverse `scan` for the backward pass.
Both can run as pipeline stages when every carry carries the batch: each stage
then runs its share of the layers on one microbatch at a time.

Where the batch lives in each operand is found by tracing the step a second time
with the batch divided by the number of microbatches: a dimension whose size
changed carries the batch. Per-layer results without a batch dimension that
depend on the batch (weight gradients) are summed over microbatches; those that
do not are the same for every microbatch. A body whose constants change with the
batch size, or where a value reduced over the batch flows back into the rows
(batch statistics), mixes examples and is not split into microbatches.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from autoshard.passes import jax_core
from autoshard.passes.graph import Lit, OpGraph

BATCH, SUM, SAME = "batch", "sum", "same"


@dataclass(frozen=True)
class StackLoop:
    """A scan that runs as pipeline stages.

    in_dims: per scan operand (constants, carries, scanned), the batch dimension in
      the operand's own (outer, stacked) shape, or None.
    out_dims: per scan result (carries, stacked), the batch dimension, or None.
    out_kinds: per result, BATCH (split by microbatch), SUM (summed over
      microbatches) or SAME (equal for every microbatch).
    micro: the scan's params as traced at the microbatch size; its body is what
      each stage runs on one microbatch (shapes in the body are baked in).
    """

    loop: int
    length: int
    reverse: bool
    in_dims: tuple[int | None, ...]
    out_dims: tuple[int | None, ...]
    out_kinds: tuple[str, ...]
    micro: dict = field(repr=False, compare=False, default_factory=dict)


def _batch_dim(full, micro) -> int | None:
    diff = [d for d, (a, b) in enumerate(zip(full, micro, strict=True)) if a != b]
    return diff[0] if len(diff) == 1 else None


def _depends(body, batched: list[bool]) -> list[bool]:
    """Per body output, whether it depends on a batched body input."""
    jaxpr, _ = jax_core.split_closed(body)
    dep = {v for v, b in zip(jaxpr.invars, batched, strict=True) if b}
    for eqn in jaxpr.eqns:
        if any(not jax_core.is_literal(v) and v in dep for v in eqn.invars):
            dep.update(eqn.outvars)
    return [not jax_core.is_literal(v) and v in dep for v in jaxpr.outvars]


def _same_literals(a, b) -> bool:
    """The two jaxprs' literals and constants agree, nested bodies included: nothing
    in them depends on the batch size (a mean over the batch divides by it)."""
    ja, ca = jax_core.split_closed(a)
    jb, cb = jax_core.split_closed(b)
    if len(ja.eqns) != len(jb.eqns) or len(ca) != len(cb):
        return False
    if not all(
        np.shape(x) == np.shape(y) and np.array_equal(x, y) for x, y in zip(ca, cb, strict=True)
    ):
        return False
    for ea, eb in zip(ja.eqns, jb.eqns, strict=True):
        if ea.primitive != eb.primitive:
            return False
        for x, y in zip(ea.invars, eb.invars, strict=True):
            if jax_core.is_literal(x) and not np.array_equal(x.val, y.val):
                return False
        sa, sb = (
            list(jax_core.jaxprs_in_params(ea.params)),
            list(jax_core.jaxprs_in_params(eb.params)),
        )
        if len(sa) != len(sb) or not all(_same_literals(x, y) for x, y in zip(sa, sb, strict=True)):
            return False
    return True


def _rows_independent(body, mbody, depends: list[bool]) -> bool:
    """No value reduced over the batch flows back into a value that carries it (as
    batch statistics would): each microbatch's rows then depend on its rows only.
    depends: per body input, whether it depends on the batch. Call-like equations
    (jit, custom_jvp/vjp, remat) are checked inside."""
    jf, _ = jax_core.split_closed(body)
    jm, _ = jax_core.split_closed(mbody)
    shape = {v: (v.aval.shape, w.aval.shape) for v, w in zip(jf.invars, jm.invars, strict=True)}
    dep = {v for v, d in zip(jf.invars, depends, strict=True) if d}
    for ef, em in zip(jf.eqns, jm.eqns, strict=True):
        for v, w in zip(ef.outvars, em.outvars, strict=True):
            shape[v] = (v.aval.shape, w.aval.shape)
        flags = [not jax_core.is_literal(v) and v in dep for v in ef.invars]
        if not any(flags):
            continue
        dep.update(ef.outvars)
        sub = jax_core.INLINE_BODY_PARAM.get(ef.primitive.name)
        if sub in ef.params:
            if not _rows_independent(ef.params[sub], em.params[sub], flags):
                return False
            continue
        ins = [v for v, f in zip(ef.invars, flags, strict=True) if f]
        reduced = any(shape[v][0] == shape[v][1] for v in ins)
        if reduced and any(a != b for a, b in (shape[v] for v in ef.outvars)):
            return False
    return True


def _analyse(loop, micro_loop) -> StackLoop | None:
    """The loop's batch dimensions, or None if it cannot run as pipeline stages."""
    p, q = loop.params, micro_loop.params
    body, mbody = p["jaxpr"], q["jaxpr"]
    nc, nk = p["num_consts"], p["num_carry"]
    ins = [v.aval.shape for v in body.jaxpr.invars]
    mins = [v.aval.shape for v in mbody.jaxpr.invars]
    outs = [v.aval.shape for v in body.jaxpr.outvars]
    mouts = [v.aval.shape for v in mbody.jaxpr.outvars]
    if len(ins) != len(mins) or len(outs) != len(mouts) or p["length"] != q["length"]:
        return None
    if any(len(a) != len(b) for a, b in zip(ins + outs, mins + mouts, strict=True)):
        return None
    in_dims = [_batch_dim(a, b) for a, b in zip(ins, mins, strict=True)]
    out_dims = [_batch_dim(a, b) for a, b in zip(outs, mouts, strict=True)]
    if nk == 0 or len(ins) == nc + nk:
        return None  # no carry to pass between stages, or nothing stacked per layer
    if any(d is None for d in in_dims[nc : nc + nk] + out_dims[:nk]):
        return None  # a carry without the batch (a counter, an accumulator) stays whole
    batched = [d is not None for d in in_dims]
    if not _same_literals(body, mbody) or not _rows_independent(body, mbody, batched):
        return None  # the body mixes the examples of a batch
    dep = _depends(body, batched)
    kinds = [
        BATCH if d is not None else SUM if dp else SAME for d, dp in zip(out_dims, dep, strict=True)
    ]
    # stacked operands and results gain the layer dimension in front
    in_outer = [d if i < nc + nk or d is None else d + 1 for i, d in enumerate(in_dims)]
    out_outer = [d if i < nk or d is None else d + 1 for i, d in enumerate(out_dims)]
    return StackLoop(
        loop.id, p["length"], p["reverse"], tuple(in_outer), tuple(out_outer), tuple(kinds), q
    )


def stack_loops(graph: OpGraph, micro: OpGraph) -> tuple[StackLoop, ...]:
    """The step-level scans of graph that can run as pipeline stages.

    Args:
      graph: the step's graph at the full batch.
      micro: the same step's graph traced with the batch divided by the number of
        microbatches (the same operations in the same order).

    Returns:
      One StackLoop per pipelinable loop (forward and backward layer scans).

    Example:
      >>> loops = stack_loops(build_graph(full), build_graph(micro))  # doctest: +SKIP
    """
    if len(graph.loops) != len(micro.loops):
        return ()
    found = []
    for loop, mloop in zip(graph.loops, micro.loops, strict=True):
        if loop.region != -1:
            continue
        info = _analyse(loop, mloop)
        if info is not None:
            found.append(info)
    return tuple(found)


def _elementwise_like(graph: OpGraph, node, shape) -> bool:
    """Every array operand and result has this shape (scalars aside)."""
    vals = [r for r in node.inputs if not isinstance(r, Lit)] + list(node.outputs)
    return all(graph.values[v].shape in (shape, ()) for v in vals)


def stacked_values(graph: OpGraph, loops: tuple[StackLoop, ...]) -> frozenset[int]:
    """Values outside the loops that hold per-layer stacks: the loops' scanned
    operands and stacked results, and what shape-preserving operations (the
    optimizer update) join to them. They are split over the pipeline axis on
    their layer dimension, so each stage keeps its own layers' state."""
    seed: set[int] = set()
    for s in loops:
        lp = graph.loops[s.loop]
        nc, nk = lp.num_consts, lp.num_carry
        for i in lp.enter[nc + nk :]:
            r = graph.nodes[i].inputs[0]
            if not isinstance(r, Lit):
                seed.add(r)
        seed.update(graph.nodes[i].outputs[0] for i in lp.exit[nk:])
    top = [n for n in graph.nodes if n.region == -1 and n.boundary < 0]
    changed = True
    while changed:
        changed = False
        for n in top:
            vals = [r for r in n.inputs if not isinstance(r, Lit)] + list(n.outputs)
            vals = [v for v in vals if graph.values[v].shape]
            hit = [v for v in vals if v in seed]
            if not hit or not _elementwise_like(graph, n, graph.values[hit[0]].shape):
                continue
            new = set(vals) - seed
            if new:
                seed |= new
                changed = True
    return frozenset(seed)
