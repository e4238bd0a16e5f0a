"""Strategies: every legal assignment of mesh axes to an operation's factors.

Each mesh axis goes to at most one factor (so to at most one dimension of any
tensor), jointly over all axes; a factor is split only if its size is divisible by
the axes given to it. A split REDUCE factor leaves partial results: the strategy
pays an all-reduce, or a reduce-scatter where its output keeps that axis.

Names read like Alpa's: "S0R x RS1 -> S0S1 [AR1]" is lhs split on dim 0 by mesh axis
0, rhs split on dim 1 by axis 1, output split on both, and an all-reduce over axis 1.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

from autoshard.cost_model import collectives as coll
from autoshard.cost_model.compute import compute_time
from autoshard.cost_model.hardware import Hardware, MeshDesc
from autoshard.cost_model.resharding import Spec, per_device_bytes
from autoshard.passes.graph import Lit, OpGraph
from autoshard.passes.rules import REDUCE, FactorMap, OpView, factor_map
from autoshard.passes.rules.core import Builder
from autoshard.passes.rules.families import BOUNDARY, CONTRACTIONS, FUSIBLE, SCATTERABLE

_SHORT = {coll.ALL_REDUCE: "AR", coll.REDUCE_SCATTER: "RS"}


@dataclass(frozen=True)
class Strategy:
    """One way to run an operation: the spec of every operand and output, the
    operation's own collectives, and its per-device cost."""

    name: str
    in_specs: tuple[Spec | None, ...]  # None for literal operands
    out_specs: tuple[Spec, ...]
    collectives: tuple[coll.Collective, ...]
    cost: float  # seconds: compute + own collectives
    axes_used: int
    # Mesh-axis groups of all-reduces that XLA fuses with others (priced without
    # latency here; the ILP pays one latency per group that any chosen strategy uses).
    fused_groups: tuple[tuple[int, ...], ...] = ()


def spec_str(spec: Spec | None) -> str:
    if spec is None:
        return "-"
    if not spec:
        return "()"
    return "".join("S" + "".join(map(str, d)) if d else "R" for d in spec)


def _spec(dims, axes_of) -> Spec:
    return tuple(tuple(a for f in dim for a in axes_of.get(f, ())) for dim in dims)


def _valid(spec: Spec) -> bool:
    flat = [a for d in spec for a in d]
    return len(flat) == len(set(flat))


def op_flops(primitive: str, fmap: FactorMap, out_shapes) -> float:
    """Work of one operation: 2*prod(factors) for contractions, else one per element."""
    if primitive in CONTRACTIONS:
        return 2.0 * math.prod(f.size for f in fmap.factors)
    if primitive in BOUNDARY:
        return 0.0
    return float(max((math.prod(s) for s in out_shapes), default=0))


@dataclass(frozen=True)
class OpInfo:
    """What strategy enumeration needs to know of one operation."""

    primitive: str
    fmap: FactorMap
    in_bytes: tuple[float, ...]  # global bytes of each operand (0 for literals)
    out_bytes: tuple[float, ...]
    literal: tuple[bool, ...]
    # Its all-reduces are independent of other gradient/loss all-reduces (no matmul
    # depends on it), so XLA's all-reduce combiner fuses them: no latency of their own.
    fused_all_reduce: bool = False
    # XLA fuses elementwise and layout operations into their neighbours: they cost
    # their flops, not a round trip through memory each.
    fusible: bool = False


# Operations repeat: an unrolled model runs the same primitive on the same shapes with
# the same parameters in every layer, so strategies are cached by that signature.
STRATEGY_CACHE_SIZE = 1 << 14


@functools.lru_cache(maxsize=STRATEGY_CACHE_SIZE)
def enumerate_strategies(op: OpInfo, mesh: MeshDesc, hw: Hardware) -> tuple[Strategy, ...]:
    """All legal strategies of one operation on a mesh; the first is fully replicated.
    Pure, and cached by (operation signature, mesh, hardware)."""
    fmap = op.fmap
    ok = fmap.splittable()
    cands = [i for i, s in enumerate(ok) if s]
    out_shapes = [[math.prod(fmap.factors[f].size for f in dim) for dim in d] for d in fmap.outputs]
    flops = op_flops(op.primitive, fmap, out_shapes)
    seen, out = set(), []
    for choice in itertools.product([-1, *cands], repeat=len(mesh.shape)):
        axes_of: dict[int, tuple[int, ...]] = {}
        for a, f in enumerate(choice):
            if f >= 0:
                axes_of[f] = (*axes_of.get(f, ()), a)
        if any(fmap.factors[f].size % mesh.group(ax) for f, ax in axes_of.items()):
            continue
        ins = tuple(
            None if lit else _spec(d, axes_of)
            for d, lit in zip(fmap.operands, op.literal, strict=True)
        )
        outs = tuple(_spec(d, axes_of) for d in fmap.outputs)
        if not all(_valid(s) for s in (*ins, *outs) if s is not None):
            continue
        reduce_axes = tuple(
            sorted(a for f, ax in axes_of.items() if fmap.factors[f].kind == REDUCE for a in ax)
        )
        reduce_op = next(
            (fmap.factors[f].reduce_op for f in axes_of if fmap.factors[f].kind == REDUCE), "sum"
        )
        for outs_v, colls in _reductions(outs, reduce_axes, reduce_op, op, fmap, mesh, hw):
            key = (ins, outs_v, colls)
            if key in seen:
                continue
            seen.add(key)
            used = mesh.group([a for ax in axes_of.values() for a in ax])
            nbytes = 0.0 if op.fusible else sum(op.in_bytes) + sum(op.out_bytes)
            cost = compute_time(flops / used, nbytes / used, hw) + coll.total_time(
                colls, mesh, hw, op.fused_all_reduce
            )
            name = (
                " x ".join(spec_str(s) for s in ins)
                + " -> "
                + " ".join(spec_str(s) for s in outs_v)
            )
            if colls:
                name += (
                    " ["
                    + " ".join(
                        _SHORT.get(c.kind, c.kind) + "".join(map(str, c.axes)) for c in colls
                    )
                    + "]"
                )
            out.append(
                Strategy(
                    name,
                    ins,
                    outs_v,
                    colls,
                    cost,
                    sum(len(a) for a in axes_of.values()),
                    _fused_groups(colls, op.fused_all_reduce),
                )
            )
    return tuple(out)


def _fused_groups(colls, fused: bool) -> tuple[tuple[int, ...], ...]:
    if not fused:
        return ()
    return tuple(sorted({c.axes for c in colls if c.kind == coll.ALL_REDUCE}))


def _reductions(outs, reduce_axes, reduce_op, op: OpInfo, fmap: FactorMap, mesh: MeshDesc, hw):
    """The ways to finish partial results: all-reduce every output, or (one output, sum)
    reduce-scatter it onto a dimension that can take the reduced axes."""
    if not reduce_axes:
        yield outs, ()
        return
    per_dev = [
        b / mesh.group([a for d in s for a in d]) for b, s in zip(op.out_bytes, outs, strict=True)
    ]
    yield outs, tuple(coll.Collective(coll.ALL_REDUCE, reduce_axes, b, reduce_op) for b in per_dev)
    if len(outs) != 1 or reduce_op != "sum" or not hw.reduce_scatter:
        return
    if op.primitive not in SCATTERABLE:
        return
    shape = [math.prod(fmap.factors[f].size for f in dim) for dim in fmap.outputs[0]]
    for d, axes in enumerate(outs[0]):
        if shape[d] % mesh.group((*axes, *reduce_axes)) == 0 and shape[d] > 1:
            new = tuple((*ax, *reduce_axes) if i == d else ax for i, ax in enumerate(outs[0]))
            yield (new,), (coll.Collective(coll.REDUCE_SCATTER, reduce_axes, per_dev[0]),)


@functools.lru_cache(maxsize=STRATEGY_CACHE_SIZE)
def source_strategies(shape, nbytes: float, mesh: MeshDesc, hw: Hardware, replicated_only=False):
    """Layouts an input may take: every block split of its dimensions (only the first,
    replicated one for constants). Each costs the time to read its per-device bytes."""
    b = Builder()
    fmap = b.build([], [tuple((b.new(d),) for d in shape)])
    info = OpInfo("input", fmap, (), (nbytes,), ())
    strategies = enumerate_strategies(info, mesh, hw)
    out = tuple(
        Strategy(
            "-> " + spec_str(s.out_specs[0]),
            (),
            s.out_specs,
            (),
            compute_time(0.0, per_device_bytes(nbytes, s.out_specs[0], mesh), hw),
            s.axes_used,
        )
        for s in strategies
    )
    return out[:1] if replicated_only else out


def op_info(graph: OpGraph, node, fused_all_reduce: bool = False, memo=None) -> OpInfo:
    """What strategy enumeration needs of node. memo (a dict kept by the caller)
    shares one OpInfo between copies of an operation: same primitive, shapes, bytes,
    literal operands and parameters (compared by equality; unhashable ones skip it)."""
    in_shapes = tuple(graph.shape(r) for r in node.inputs)
    out_shapes = tuple(graph.values[o].shape for o in node.outputs)
    in_bytes = tuple(
        0.0 if isinstance(r, Lit) else float(graph.values[r].nbytes) for r in node.inputs
    )
    out_bytes = tuple(float(graph.values[o].nbytes) for o in node.outputs)
    literal = tuple(isinstance(r, Lit) for r in node.inputs)
    key = None
    if memo is not None:
        key = (node.name, in_shapes, out_shapes, in_bytes, out_bytes, literal, fused_all_reduce)
        try:
            key += (tuple(sorted(node.params.items())),)
            if key in memo:
                return memo[key]
        except TypeError:  # an unhashable parameter (an array): no sharing
            key = None
    fmap = factor_map(OpView(node.name, in_shapes, out_shapes, node.params))
    fusible = node.name in FUSIBLE
    info = OpInfo(node.name, fmap, in_bytes, out_bytes, literal, fused_all_reduce, fusible)
    if key is not None:
        memo[key] = info
    return info
