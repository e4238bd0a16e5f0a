"""Contractions and reductions: dot_general, reduce_*, argmax, cumulative ops, sort."""

from __future__ import annotations

from autoshard.passes.rules.core import FIXED, PASS, REDUCE, Builder, FactorMap, OpView, register


@register("dot_general")
def dot_general(op: OpView) -> FactorMap:
    """([b.., m.., k..], [b.., k.., n..]) -> [b.., m.., n..], reduce {k}."""
    (lc, rc), (lb, rb) = op.params["dimension_numbers"]
    ls, rs = op.in_shapes
    b = Builder()
    lhs: list = [None] * len(ls)
    rhs: list = [None] * len(rs)
    out = []
    for i, j in zip(lb, rb, strict=True):
        f = b.new(ls[i])
        lhs[i], rhs[j] = (f,), (f,)
        out.append((f,))
    for i, j in zip(lc, rc, strict=True):
        f = b.new(ls[i], REDUCE)
        lhs[i], rhs[j] = (f,), (f,)
    for dims, shape in ((lhs, ls), (rhs, rs)):
        for i, d in enumerate(shape):
            if dims[i] is None:
                f = b.new(d)
                dims[i] = (f,)
                out.append((f,))
    return b.build([tuple(lhs), tuple(rhs)], [tuple(out)])


def _reduction(kind: str, reduce_op: str):
    def rule(op: OpView) -> FactorMap:
        """[a, r] -> [a]: reduced axes become `kind` factors."""
        axes = set(op.params["axes"])
        b = Builder()
        ins, out = [], []
        for i, d in enumerate(op.in_shapes[0]):
            f = b.new(d, kind if i in axes else PASS, reduce_op)
            ins.append((f,))
            if i not in axes:
                out.append((f,))
        return b.build([tuple(ins)], [tuple(out)] * len(op.out_shapes))

    return rule


def def_reduction(name: str, reduce_op: str) -> None:
    register(name)(_reduction(REDUCE, reduce_op))


for _name, _op in (
    ("reduce_sum", "sum"),
    ("reduce_max", "max"),
    ("reduce_min", "min"),
    ("reduce_prod", "prod"),
    ("reduce_and", "and"),
    ("reduce_or", "or"),
):
    def_reduction(_name, _op)
# An index of a maximum cannot be combined across devices by one all-reduce.
register("argmax", "argmin")(_reduction(FIXED, "none"))


def _along_axis(axis_of) -> callable:
    def rule(op: OpView) -> FactorMap:
        """Operands and outputs share factors, except the one axis that must stay whole
        (outputs may differ in its size, as top_k's do)."""
        shape = op.in_shapes[0]
        axis = axis_of(op.params, len(shape)) % len(shape)
        b = Builder()
        dims = tuple((b.new(d, FIXED if i == axis else PASS),) for i, d in enumerate(shape))

        def like(s):
            if len(s) != len(shape):
                return b.fixed_dims(s)
            return tuple(dims[i] if i != axis else (b.new(s[i], FIXED),) for i in range(len(s)))

        ins = [dims if s == shape else like(s) for s in op.in_shapes]
        return b.build(ins, [dims if s == shape else like(s) for s in op.out_shapes])

    return rule


register("cumsum", "cumprod", "cummax", "cummin", "cumlogsumexp")(
    _along_axis(lambda p, r: p["axis"])
)
register("sort")(_along_axis(lambda p, r: p["dimension"]))
register("top_k")(_along_axis(lambda p, r: p.get("axis", -1)))
