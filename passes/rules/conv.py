"""Convolutions and windowed reductions (pooling and its gradients).

    conv_general_dilated  lhs [n, c, s..], rhs [o, c, k..] -> out [n, o, t..], reduce={c}

Which dimension is which comes from ``dimension_numbers``, so the same rule reads
the forward convolution and the two convolutions of its gradient: the input
gradient (the output features ``o`` are contracted) and the kernel gradient (the
batch ``n`` is contracted: lhs and rhs carry it as their feature dimension).
Spatial dimensions stay whole (a split would need halo exchanges), except
"pointwise" ones, which a window of size 1 with stride 1 and no padding or
dilation maps one to one.

Convolutions are CONTRACTIONS (families.py): their work is counted as
2 * prod(factor sizes). The iteration space of one spatial dimension is
(output position, window position); the input's dimension is not a loop of its
own, so where its size equals (or is a multiple of) one of theirs, it reuses
that FIXED factor instead of adding one (and a dilated input that the output is
a multiple of becomes the output's major factor). The count is then exact for
stride 1, and at most stride times too high otherwise. A FIXED factor is never
split, so sharing one says nothing about layouts.
"""

from __future__ import annotations

from autoshard.passes.rules.core import (
    FIXED,
    PASS,
    REDUCE,
    Builder,
    FactorMap,
    OpView,
    register,
    replicated_rule,
)


def _pointwise(window: int, stride: int, pad, dilation: int) -> bool:
    """Output position i reads exactly input position i along this dimension."""
    return window == 1 and stride == 1 and tuple(pad) == (0, 0) and dilation == 1


def _input_dim(b: Builder, size: int, loops: tuple[int, ...]) -> tuple[int, ...]:
    """The input's spatial dim as the FIXED loop factor of equal size, or as that
    factor times a FIXED remainder, else a fresh FIXED factor."""
    for f in loops:
        s = b.factors[f].size
        if s == size:
            return (f,)
    for f in loops:
        s = b.factors[f].size
        if s > 1 and size % s == 0:
            return (f, b.new(size // s, FIXED))
    return (b.new(size, FIXED),)


def _conv_features(b: Builder, op: OpView, lhs: list, rhs: list, out: list, dn) -> None:
    """Batch and feature dims; feature/batch groups keep the grouped dims FIXED."""
    ls, rs = op.in_shapes
    lspec, rspec, ospec = dn
    groups = op.params.get("feature_group_count", 1)
    batch_groups = op.params.get("batch_group_count", 1)
    n, c, o = ls[lspec[0]], ls[lspec[1]], rs[rspec[0]]
    if batch_groups > 1:  # lhs batch = (group, n'); output features = (group, o')
        g = b.new(batch_groups, FIXED)
        nb = b.new(n // batch_groups, FIXED)
        lhs[lspec[0]], out[ospec[0]] = (g, nb), (nb,)
        rhs[rspec[0]] = out[ospec[1]] = (g, b.new(o // batch_groups, FIXED))
    else:
        lhs[lspec[0]] = out[ospec[0]] = (b.new(n),)
    if groups > 1:  # lhs features = (group, c'); output features = (group, o')
        g = b.new(groups, FIXED)
        cg = b.new(c // groups, FIXED)
        lhs[lspec[1]], rhs[rspec[1]] = (g, cg), (cg,)
        rhs[rspec[0]] = out[ospec[1]] = (g, b.new(o // groups, FIXED))
    else:
        lhs[lspec[1]] = rhs[rspec[1]] = (b.new(c, REDUCE),)
    if out[ospec[1]] is None:
        rhs[rspec[0]] = out[ospec[1]] = (b.new(o),)


@register("conv_general_dilated")
def conv_general_dilated(op: OpView) -> FactorMap:
    """lhs [n, c, s..] x rhs [o, c, k..] -> [n, o, t..], reduce={c}, spatial FIXED."""
    p = op.params
    if p.get("feature_group_count", 1) > 1 and p.get("batch_group_count", 1) > 1:
        return replicated_rule(op)  # XLA rejects this; nothing to describe
    (ls, rs), (os_,) = op.in_shapes, op.out_shapes
    dn = p.get("dimension_numbers")
    dn = (tuple(range(len(ls))),) * 3 if dn is None else tuple(dn)
    b = Builder()
    lhs: list = [None] * len(ls)
    rhs: list = [None] * len(rs)
    out: list = [None] * len(os_)
    _conv_features(b, op, lhs, rhs, out, dn)
    lspec, rspec, ospec = dn
    for i, (ld, rd, od) in enumerate(zip(lspec[2:], rspec[2:], ospec[2:], strict=True)):
        lhs_dil = p.get("lhs_dilation", (1,) * len(lspec[2:]))[i]
        if _pointwise(rs[rd], p["window_strides"][i], p["padding"][i], lhs_dil):
            lhs[ld] = out[od] = (b.new(ls[ld]),)
            rhs[rd] = ()
        elif 1 < ls[ld] < os_[od] and os_[od] % ls[ld] == 0:  # lhs-dilated (input gradient)
            window, position = b.new(rs[rd], FIXED), b.new(ls[ld], FIXED)
            rhs[rd], lhs[ld] = (window,), (position,)
            out[od] = (position, b.new(os_[od] // ls[ld], FIXED))
        else:
            window, position = b.new(rs[rd], FIXED), b.new(os_[od], FIXED)
            rhs[rd], out[od] = (window,), (position,)
            lhs[ld] = _input_dim(b, ls[ld], (position, window))
    return b.build([tuple(lhs), tuple(rhs)], [tuple(out)])


def _window_dims(b: Builder, in_shape, out_shape, params) -> tuple[tuple, tuple]:
    """(input dims, output dims): pointwise dims share a PASS factor, the rest are
    FIXED on each side."""
    rank = len(in_shape)
    base = params.get("base_dilation") or (1,) * rank
    ins, outs = [], []
    for d in range(rank):
        pad = params["padding"][d]
        if _pointwise(params["window_dimensions"][d], params["window_strides"][d], pad, base[d]):
            f = b.new(in_shape[d], PASS)
            ins.append((f,))
            outs.append((f,))
        else:
            ins.append((b.new(in_shape[d], FIXED),))
            outs.append((b.new(out_shape[d], FIXED),))
    return tuple(ins), tuple(outs)


@register("reduce_window_sum", "reduce_window_max", "reduce_window_min")
def reduce_window_monoid(op: OpView) -> FactorMap:
    """[n, h, w, c] -> [n, h', w', c]: windowed dims FIXED, the others pass."""
    b = Builder()
    ins, outs = _window_dims(b, op.in_shapes[0], op.out_shapes[0], op.params)
    return b.build([ins], [outs])


@register("reduce_window")
def reduce_window(op: OpView) -> FactorMap:
    """operands..., init values... -> results...: as reduce_window_sum, jointly."""
    n = len(op.out_shapes)
    b = Builder()
    ins, outs = _window_dims(b, op.in_shapes[0], op.out_shapes[0], op.params)
    fixed_inits = [b.fixed_dims(s) for s in op.in_shapes[n:]]  # scalars: no dims
    return b.build([ins] * n + fixed_inits, [outs] * n)


@register("select_and_scatter_add")
def select_and_scatter_add(op: OpView) -> FactorMap:
    """source [pooled], operand [x] -> [x]: the gradient of max pooling."""
    b = Builder()
    x_dims, pooled = _window_dims(b, op.in_shapes[1], op.in_shapes[0], op.params)
    return b.build([pooled, x_dims], [x_dims])


@register("select_and_scatter")
def select_and_scatter(op: OpView) -> FactorMap:
    """operand [x], source [pooled], init value -> [x]."""
    b = Builder()
    x_dims, pooled = _window_dims(b, op.in_shapes[0], op.in_shapes[1], op.params)
    return b.build([x_dims, pooled, b.fixed_dims(op.in_shapes[2])], [x_dims])


@register("select_and_gather_add")
def select_and_gather_add(op: OpView) -> FactorMap:
    """tangents [x], operand [x] -> [pooled]: the JVP of max pooling."""
    b = Builder()
    x_dims, pooled = _window_dims(b, op.in_shapes[0], op.out_shapes[0], op.params)
    return b.build([x_dims, x_dims], [pooled])
