"""Data movement: broadcast, reshape, transpose, slicing, concatenation, gather/scatter,
iota. Dimensions that a primitive moves data along are FIXED; the rest pass through."""

from __future__ import annotations

from autoshard.passes.rules.core import FIXED, PASS, REDUCE, Builder, FactorMap, OpView, register


@register("broadcast_in_dim")
def broadcast_in_dim(op: OpView) -> FactorMap:
    """[a] -> [x, a]: operand dim i is output dim broadcast_dimensions[i] unless size 1."""
    b = Builder()
    shape, bdims = op.out_shapes[0], op.params["broadcast_dimensions"]
    out = [(b.new(d),) for d in shape]
    ins = tuple(
        out[j] if s == shape[j] else () for s, j in zip(op.in_shapes[0], bdims, strict=True)
    )
    extra = [b.fixed_dims(s) for s in op.in_shapes[1:]]
    return b.build([ins, *extra], [tuple(out)])


@register("transpose")
def transpose(op: OpView) -> FactorMap:
    b = Builder()
    ins = tuple((b.new(d),) for d in op.in_shapes[0])
    return b.build([ins], [tuple(ins[p] for p in op.params["permutation"])])


@register("squeeze")
def squeeze(op: OpView) -> FactorMap:
    b = Builder()
    dropped = {d % len(op.in_shapes[0]) for d in op.params["dimensions"]}
    ins = tuple((b.new(d),) for d in op.in_shapes[0])
    return b.build([ins], [tuple(f for i, f in enumerate(ins) if i not in dropped)])


@register("expand_dims")
def expand_dims(op: OpView) -> FactorMap:
    b = Builder()
    ins = tuple((b.new(d),) for d in op.in_shapes[0])
    it = iter(ins)
    added = set(op.params["dimensions"])
    out = tuple(() if i in added else next(it) for i in range(len(op.out_shapes[0])))
    return b.build([ins], [out])


def _groups(ins: tuple[int, ...], outs: tuple[int, ...]):
    """Pair up runs of input and output dimensions with equal products."""
    i = j = 0
    while i < len(ins) or j < len(outs):
        if i < len(ins) and ins[i] == 1:
            yield [i], []
            i += 1
            continue
        if j < len(outs) and outs[j] == 1:
            yield [], [j]
            j += 1
            continue
        gi, gj, pi, pj = [i], [j], ins[i], outs[j]
        while pi != pj:
            if pi < pj:
                i += 1
                gi.append(i)
                pi *= ins[i]
            else:
                j += 1
                gj.append(j)
                pj *= outs[j]
        yield gi, gj
        i, j = i + 1, j + 1


@register("reshape")
def reshape(op: OpView) -> FactorMap:
    """[a*b, c] -> [a, b, c]: a split dimension is the compound of its parts (a major)."""
    ins, outs = op.in_shapes[0], op.out_shapes[0]
    b = Builder()
    if 0 in ins:
        return b.build([b.fixed_dims(ins)], [b.fixed_dims(outs)])
    in_dims: list = [()] * len(ins)
    out_dims: list = [()] * len(outs)
    for gi, gj in _groups(ins, outs):
        if len(gi) == 1 and gj:
            fs = [b.new(outs[k]) for k in gj]
            in_dims[gi[0]] = tuple(fs)
            for k, f in zip(gj, fs, strict=True):
                out_dims[k] = (f,)
        elif len(gj) == 1 and gi:
            fs = [b.new(ins[k]) for k in gi]
            out_dims[gj[0]] = tuple(fs)
            for k, f in zip(gi, fs, strict=True):
                in_dims[k] = (f,)
        else:  # [6, 4] -> [4, 6]: no common refinement that keeps blocks
            for k in gi:
                in_dims[k] = (b.new(ins[k], FIXED),)
            for k in gj:
                out_dims[k] = (b.new(outs[k], FIXED),)
    return b.build([tuple(in_dims)], [tuple(out_dims)])


@register("iota")
def iota(op: OpView) -> FactorMap:
    b = Builder()
    return b.build([], [tuple((b.new(d),) for d in op.out_shapes[0])])


def _keep_or_fix(b: Builder, shape, keep) -> tuple:
    """One factor per dim: PASS where keep(i), else FIXED."""
    return tuple((b.new(d, PASS if keep(i) else FIXED),) for i, d in enumerate(shape))


@register("slice")
def slice_(op: OpView) -> FactorMap:
    ins, outs = op.in_shapes[0], op.out_shapes[0]
    b = Builder()
    dims = _keep_or_fix(b, ins, lambda i: ins[i] == outs[i])
    out = tuple(dims[i] if ins[i] == outs[i] else (b.new(outs[i], FIXED),) for i in range(len(ins)))
    return b.build([dims], [out])


@register("dynamic_slice")
def dynamic_slice(op: OpView) -> FactorMap:
    ins, outs = op.in_shapes[0], op.out_shapes[0]
    b = Builder()
    dims = _keep_or_fix(b, ins, lambda i: ins[i] == outs[i])
    out = tuple(dims[i] if ins[i] == outs[i] else (b.new(outs[i], FIXED),) for i in range(len(ins)))
    return b.build([dims, *(() for _ in op.in_shapes[1:])], [out])


@register("dynamic_update_slice")
def dynamic_update_slice(op: OpView) -> FactorMap:
    ins, upd = op.in_shapes[0], op.in_shapes[1]
    b = Builder()
    dims = _keep_or_fix(b, ins, lambda i: ins[i] == upd[i])
    u = tuple(dims[i] if ins[i] == upd[i] else (b.new(upd[i], FIXED),) for i in range(len(ins)))
    return b.build([dims, u, *(() for _ in op.in_shapes[2:])], [dims])


@register("concatenate")
def concatenate(op: OpView) -> FactorMap:
    axis = op.params["dimension"]
    out = op.out_shapes[0]
    b = Builder()
    shared = [(b.new(d),) if i != axis else None for i, d in enumerate(out)]
    ins = [tuple(shared[i] or (b.new(s[i], FIXED),) for i in range(len(s))) for s in op.in_shapes]
    outd = tuple(shared[i] or (b.new(out[i], FIXED),) for i in range(len(out)))
    return b.build(ins, [outd])


@register("split")
def split(op: OpView) -> FactorMap:
    axis = op.params["axis"]
    ins = op.in_shapes[0]
    b = Builder()
    shared = [(b.new(d),) if i != axis else None for i, d in enumerate(ins)]
    fix = lambda s: tuple(shared[i] or (b.new(s[i], FIXED),) for i in range(len(s)))
    return b.build([fix(ins)], [fix(s) for s in op.out_shapes])


@register("pad")
def pad(op: OpView) -> FactorMap:
    ins, outs = op.in_shapes[0], op.out_shapes[0]
    b = Builder()
    plain = [cfg == (0, 0, 0) for cfg in map(tuple, op.params["padding_config"])]
    dims = _keep_or_fix(b, ins, lambda i: plain[i])
    out = tuple(dims[i] if plain[i] else (b.new(outs[i], FIXED),) for i in range(len(ins)))
    return b.build([dims, ()], [out])


@register("rev")
def rev(op: OpView) -> FactorMap:
    b = Builder()
    flipped = set(op.params["dimensions"])
    dims = _keep_or_fix(b, op.in_shapes[0], lambda i: i not in flipped)
    return b.build([dims], [dims])


@register("gather")
def gather(op: OpView) -> FactorMap:
    """operand[V, D] indexed by indices[B, S, 1] -> [B, S, D] (an embedding lookup).

    Index batch dims pass to the output; whole-slice operand dims pass to the output's
    offset dims. The one indexed operand dim of a row lookup (slice size 1) may be split:
    each device looks up the rows it holds, zero elsewhere, and the results are summed
    (a vocabulary-parallel embedding). Other indexed operand dims stay whole."""
    dn = op.params["dimension_numbers"]
    opnd, idx = op.in_shapes[0], op.in_shapes[1]
    out = op.out_shapes[0]
    sizes = op.params["slice_sizes"]
    b = Builder()
    idx_dims = [(b.new(d),) for d in idx[:-1]] + [(b.new(idx[-1], FIXED),)]
    opnd_dims: list = [None] * len(opnd)
    for od, idd in zip(dn.operand_batching_dims, dn.start_indices_batching_dims, strict=True):
        opnd_dims[od] = idx_dims[idd]
    window = [
        i for i in range(len(opnd)) if i not in dn.collapsed_slice_dims and opnd_dims[i] is None
    ]
    out_dims: list = [None] * len(out)
    for od, i in zip(dn.offset_dims, window, strict=True):
        if sizes[i] == opnd[i] and i not in dn.start_index_map:
            opnd_dims[i] = out_dims[od] = (b.new(opnd[i]),)
        else:
            out_dims[od] = (b.new(out[od], FIXED),)
    batch = iter(idx_dims[:-1])
    out_dims = [d if d is not None else next(batch) for d in out_dims]
    rows = _row_lookup_dim(dn.start_index_map, dn.collapsed_slice_dims, sizes)
    opnd_dims = [
        d if d is not None else (b.new(opnd[i], REDUCE if i == rows else FIXED),)
        for i, d in enumerate(opnd_dims)
    ]
    return b.build([tuple(opnd_dims), tuple(idx_dims)], [tuple(out_dims)])


def _row_lookup_dim(index_map, collapsed, sizes=None) -> int | None:
    """The operand dim of a lookup by one index into one collapsed dim (of slice size 1:
    collapsed gather dims and inserted scatter dims are size 1 by definition)."""
    if len(index_map) == 1 and index_map[0] in collapsed:
        if sizes is None or sizes[index_map[0]] == 1:
            return index_map[0]
    return None


def _scatter(kind: str):
    def rule(op: OpView) -> FactorMap:
        """operand[V, D] <- updates[B, S, D] at indices[B, S, 1]: window dims pass; the
        scattered update dims are summed (scatter-add) or kept whole (scatter)."""
        dn = op.params["dimension_numbers"]
        opnd, idx, upd = op.in_shapes[:3]
        b = Builder()
        batching = dict(
            zip(dn.scatter_indices_batching_dims, dn.operand_batching_dims, strict=True)
        )
        idx_dims = [(b.new(d, PASS if i in batching else kind),) for i, d in enumerate(idx[:-1])]
        idx_dims.append((b.new(idx[-1], FIXED),))
        opnd_dims: list = [None] * len(opnd)
        for idd, od in batching.items():
            opnd_dims[od] = idx_dims[idd]
        window = [
            i for i in range(len(opnd)) if i not in dn.inserted_window_dims and opnd_dims[i] is None
        ]
        upd_dims: list = [None] * len(upd)
        for ud, i in zip(dn.update_window_dims, window, strict=True):
            if upd[ud] == opnd[i] and i not in dn.scatter_dims_to_operand_dims:
                opnd_dims[i] = upd_dims[ud] = (b.new(opnd[i]),)
            else:
                upd_dims[ud] = (b.new(upd[ud], FIXED),)
        scatter = iter(idx_dims[:-1])
        upd_dims = [d if d is not None else next(scatter) for d in upd_dims]
        # scatter-add into rows by one index (an embedding's gradient): each device adds
        # the rows it holds and drops the rest
        rows = _row_lookup_dim(dn.scatter_dims_to_operand_dims, dn.inserted_window_dims)
        rows = rows if kind == REDUCE and rows is not None else None
        opnd_dims = [
            d or (b.new(opnd[i], PASS if i == rows else FIXED),) for i, d in enumerate(opnd_dims)
        ]
        ins = [tuple(opnd_dims), tuple(idx_dims), tuple(upd_dims)]
        return b.build(ins, [tuple(opnd_dims)])

    return rule


register("scatter-add", "scatter_add")(_scatter(REDUCE))
register("scatter", "scatter-mul", "scatter_mul", "scatter-min", "scatter-max")(_scatter(FIXED))
