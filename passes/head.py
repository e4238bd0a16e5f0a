"""The loss head between the forward and backward layer-stack loops, run per microbatch.

The 1F1B schedule starts a microbatch's backward pass on the last stage as soon as
its forward pass leaves it, so the step-level operations that turn the forward
loop's final carry into the backward loop's initial carry (the loss and its
gradient: the "head") must run one microbatch at a time. They were traced for the
whole batch, so this pass proves that running them on a microbatch's rows gives
exactly those rows of the whole-batch result:

- every operation on a value that carries the batch keeps the batch dimension
  (elementwise operations, per-row contractions, reductions over other
  dimensions, reshapes and transposes that keep rows together); nothing reduces
  over the batch, and nothing shifts, sorts, gathers or scans along it;
- a value that carries the batch without depending on one (the gradient of a mean
  broadcast to the batch's shape) comes from a broadcast, so its rows are equal.

The operations then run with the shapes of the trace at the microbatch size and
the literals of the whole-batch trace: a mean's 1/B stays 1/B, not m/B.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from autoshard.passes import jax_core
from autoshard.passes.graph import Lit, OpGraph
from autoshard.passes.stages import SUM, StackLoop

# operations that change a batched operand's shape but keep each row's values in
# that row (when the result still carries the batch)
ROW_LOCAL = frozenset(
    {
        "broadcast_in_dim",
        "reshape",
        "transpose",
        "dot_general",
        "reduce_sum",
        "reduce_max",
        "reduce_min",
        "argmax",
        "argmin",
        "squeeze",
        "expand_dims",
        "convert_element_type",
        "slice",
    }
)
# shape-preserving operations that move values between positions
MIXING = frozenset(
    {
        "cumsum",
        "cumprod",
        "cummax",
        "cummin",
        "cumlogsumexp",
        "sort",
        "rev",
        "dynamic_slice",
        "dynamic_update_slice",
        "pad",
        "concatenate",
        "iota",
        "reduce_window_sum",
        "reduce_window_max",
        "select_and_scatter_add",
        "conv_general_dilated",
        "fft",
        "random_bits",
        "rng_bit_generator",
    }
)

INDEXING = frozenset({"gather", "scatter", "scatter-add", "scatter_add"})

RESID, CARRY, OUTER = "resid", "carry", "outer"


@dataclass(frozen=True)
class Head:
    """The operations run per microbatch between a forward and a backward loop.

    fwd, bwd: the loops (StackLoop) the 1F1B schedule fuses.
    nodes: ids of the step-level nodes run per microbatch, in order.
    carries: the forward loop's final-carry values the head reads.
    inputs: other values it reads (computed before the forward loop).
    input_dims: batch dimension of each input, or None.
    targets: per backward-loop carry, the value (or literal) it starts from.
    sources: per backward-loop operand, (RESID, j) for the forward loop's stacked
      result j, (CARRY, k) for carry k (from targets), or (OUTER, value).
    """

    fwd: StackLoop
    bwd: StackLoop
    nodes: tuple[int, ...]
    carries: tuple[int, ...]
    inputs: tuple[int, ...]
    input_dims: tuple[int | None, ...]
    targets: tuple
    sources: tuple


def _bdim(graph: OpGraph, micro: OpGraph, v: int) -> int | None:
    a, b = graph.values[v].shape, micro.values[v].shape
    diff = [d for d, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
    return diff[0] if len(diff) == 1 else None


def _batched(graph: OpGraph, micro: OpGraph, v: int) -> bool:
    return graph.values[v].shape != micro.values[v].shape


def _row_local(graph: OpGraph, micro: OpGraph, nid: int) -> str | None:
    """None if node nid keeps rows apart (see the module doc), else why not."""
    n = graph.nodes[nid]
    ins = [r for r in n.inputs if not isinstance(r, Lit)]
    vals = ins + list(n.outputs)
    if any(len(graph.values[v].shape) != len(micro.values[v].shape) for v in vals):
        return f"{n.name} changes rank with the batch size"
    if any(_batched(graph, micro, v) and _bdim(graph, micro, v) is None for v in vals):
        return f"{n.name} has an operand whose batch dimension is ambiguous"
    if n.name in INDEXING:
        return _indexing(graph, micro, n)
    if list(jax_core.jaxprs_in_params(n.params)):
        return f"{n.name} holds a nested computation"
    if n.name == "slice" and not _whole_rows(graph, micro, n):
        return "slice cuts the batch dimension"
    if n.name in MIXING:
        return f"{n.name} moves values between rows"
    bin_ = [v for v in ins if _batched(graph, micro, v)]
    bout = [v for v in n.outputs if _batched(graph, micro, v)]
    if not bout:
        return f"{n.name} reduces over the batch" if bin_ else None
    if len(bout) != len(n.outputs):
        return f"{n.name} reduces over the batch"
    if not bin_:
        # rows made from nothing batched: only a broadcast makes them all equal
        return None if n.name == "broadcast_in_dim" else f"{n.name} makes rows that differ"
    if n.name not in ROW_LOCAL and not _elementwise(graph, ins, n.outputs):
        return f"{n.name} changes shapes"
    if n.name == "reshape":
        a, b = bin_[0], bout[0]
        sa, sb = graph.values[a].shape, graph.values[b].shape
        da, db = _bdim(graph, micro, a), _bdim(graph, micro, b)
        if np.prod(sa[:da]) != np.prod(sb[:db]) or np.prod(sa[da:]) != np.prod(sb[db:]):
            return "reshape merges the batch with other dimensions"
    return None


def _elementwise(graph: OpGraph, ins, outs) -> bool:
    """Every operand has the result's shape, but for scalars and size-1 dimensions
    (broadcast alike to every row)."""
    shape = graph.values[outs[0]].shape
    for v in [*ins, *outs]:
        a = graph.values[v].shape
        if a and len(a) != len(shape):
            return False
        if a and any(x not in (y, 1) for x, y in zip(a, shape, strict=True)):
            return False
    return all(graph.values[v].shape == shape for v in outs)


def _whole_rows(graph: OpGraph, micro: OpGraph, n) -> bool:
    """A slice that keeps the batch dimension whole (start 0, stride 1, to the end)."""
    v = n.inputs[0]
    d = _bdim(graph, micro, v)
    if d is None:
        return True
    strides = n.params.get("strides") or (1,) * len(graph.values[v].shape)
    start, limit = n.params["start_indices"][d], n.params["limit_indices"][d]
    return start == 0 and limit == graph.values[v].shape[d] and strides[d] == 1


def _indexing(graph: OpGraph, micro: OpGraph, n) -> str | None:
    """A gather or scatter keeps rows apart when its indices do not carry the batch
    and the operand's batch dimension is a whole window (never indexed)."""
    operand, indices = n.inputs[0], n.inputs[1]
    if isinstance(operand, Lit) or isinstance(indices, Lit):
        return None
    d = _bdim(graph, micro, operand)
    if d is None:
        return (
            None
            if not any(_batched(graph, micro, v) for v in n.outputs)
            else (f"{n.name} makes rows that differ")
        )
    dn = n.params["dimension_numbers"]
    if n.name == "gather":
        indexed = (*dn.start_index_map, *dn.collapsed_slice_dims, *dn.operand_batching_dims)
        whole = n.params["slice_sizes"][d] == graph.values[operand].shape[d]
    else:
        indexed = (
            *dn.scatter_dims_to_operand_dims,
            *dn.inserted_window_dims,
            *dn.operand_batching_dims,
        )
        whole = True
    if _batched(graph, micro, indices):
        # per-row indices: the batch dimension must be a batching dimension of both
        ob = dn.operand_batching_dims
        ib = (
            dn.start_indices_batching_dims
            if n.name == "gather"
            else (dn.scatter_indices_batching_dims)
        )
        bi = _bdim(graph, micro, indices)
        if d not in ob or ib[ob.index(d)] != bi:
            return f"{n.name} indexes with values that carry the batch"
        indexed = tuple(x for x in indexed if x != d)
    if d in indexed or not whole:
        return f"{n.name} indexes the batch dimension"
    return None


def _producers(graph: OpGraph) -> dict[int, int]:
    return {v: n.id for n in graph.nodes for v in n.outputs}


def analyse(graph: OpGraph, micro: OpGraph, fwd: StackLoop, bwd: StackLoop) -> Head | str:
    """The head between loops fwd and bwd, or a sentence saying why it cannot run
    per microbatch.

    Args:
      graph: the step's graph at the full batch.
      micro: the same step traced at batch / m (the same operations in the same order).
      fwd, bwd: the forward and backward layer-stack loops (from `stack_loops`).

    Returns:
      A Head, or a str naming the operation or value that prevents it.

    Example:
      >>> head = analyse(full, micro, *stack_loops(full, micro))  # doctest: +SKIP
    """
    if len(graph.nodes) != len(micro.nodes) or len(graph.values) != len(micro.values):
        return "the step traces differently at the microbatch size"
    if fwd.reverse or not bwd.reverse or fwd.length != bwd.length:
        return "no forward and backward pair of layer loops"
    flp, blp = graph.loops[fwd.loop], graph.loops[bwd.loop]
    fnk, bnc, bnk = flp.num_carry, blp.num_consts, blp.num_carry
    if SUM in fwd.out_kinds[fnk:]:
        return "the forward loop sums a per-layer result over the batch"
    start = min(flp.enter)
    prod = _producers(graph)
    fcarry = [graph.nodes[i].outputs[0] for i in flp.exit[:fnk]]
    fys = [graph.nodes[i].outputs[0] for i in flp.exit[fnk:]]
    bwd_enter = set(blp.enter)
    for n in graph.nodes:
        reads = [r for r in n.inputs if not isinstance(r, Lit) and r in fys]
        if reads and n.id not in bwd_enter:
            return f"the forward loop's residuals are read by {n.name}, not only the backward loop"
    if any(r in fys for r in graph.outputs if not isinstance(r, Lit)):
        return "the forward loop's residuals are an output of the step"

    def before(v) -> bool:
        return isinstance(v, Lit) or v not in prod or prod[v] < start

    sources, targets = [], []
    for pos, i in enumerate(blp.enter):
        r = graph.nodes[i].inputs[0]
        if bnc <= pos < bnc + bnk:
            sources.append((CARRY, pos - bnc))
            targets.append(r)
        elif not isinstance(r, Lit) and r in fys:
            if pos < bnc + bnk:
                return "a residual enters the backward loop unscanned"
            sources.append((RESID, fys.index(r)))
        elif before(r):
            sources.append((OUTER, r))
        else:
            return "the backward loop reads a value computed after the forward loop"
    nodes, inputs, carries = set(), set(), set()
    todo = [t for t in targets if not isinstance(t, Lit)]
    while todo:
        v = todo.pop()
        if v in fcarry:
            carries.add(v)
        elif before(v):
            inputs.add(v)
        else:
            n = graph.nodes[prod[v]]
            if n.region != -1 or n.boundary >= 0:
                return "the backward loop's carry comes from another loop"
            if n.id not in nodes:
                nodes.add(n.id)
                todo.extend(r for r in n.inputs if not isinstance(r, Lit))
    for nid in sorted(nodes):
        a, b = graph.nodes[nid], micro.nodes[nid]
        lits = [isinstance(r, Lit) for r in a.inputs], [isinstance(r, Lit) for r in b.inputs]
        if a.name != b.name or lits[0] != lits[1]:
            return "the step traces differently at the microbatch size"
        why = _row_local(graph, micro, nid)
        if why:
            return f"the loss head mixes the examples of a batch ({why})"
    ins = tuple(sorted(inputs))
    if any(_batched(graph, micro, v) and _bdim(graph, micro, v) is None for v in ins):
        return "a value the loss head reads has an ambiguous batch dimension"
    return Head(
        fwd,
        bwd,
        tuple(sorted(nodes)),
        tuple(sorted(carries, key=fcarry.index)),
        ins,
        tuple(_bdim(graph, micro, v) for v in ins),
        tuple(targets),
        tuple(sources),
    )
