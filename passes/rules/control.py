"""Loops and branches.

A scan is planned through its body (see passes/graph.py); its boundary operations pass
layouts across: `loop_enter`/`loop_exit` keep every dimension, `loop_slice` drops the
scanned (leading) dimension and `loop_stack` adds it, whole. A `while` loop or a scan
kept as one operation shares one sharding per carry (in == out) and keeps constants
and scanned slices whole, as do `cond`'s operands and results (the documented
conservative choice)."""

from __future__ import annotations

from autoshard.passes.rules.core import FIXED, Builder, FactorMap, OpView, register


def _carry_rule(first_carry, num_carry):
    def rule(op: OpView) -> FactorMap:
        lo = first_carry(op.params)
        n = num_carry(op.params, len(op.out_shapes))
        b = Builder()
        carry = [tuple((b.new(d),) for d in s) for s in op.in_shapes[lo : lo + n]]
        ins = [b.fixed_dims(s) for s in op.in_shapes[:lo]] + carry
        ins += [b.fixed_dims(s) for s in op.in_shapes[lo + n :]]
        outs = carry + [b.fixed_dims(s) for s in op.out_shapes[n:]]
        return b.build(ins, outs)

    return rule


register("scan")(_carry_rule(lambda p: p["num_consts"], lambda p, n: p["num_carry"]))
register("while")(_carry_rule(lambda p: p["cond_nconsts"] + p["body_nconsts"], lambda p, n: n))


@register("cond")
def cond(op: OpView) -> FactorMap:
    b = Builder()
    return b.build(
        [b.fixed_dims(s) for s in op.in_shapes], [b.fixed_dims(s) for s in op.out_shapes]
    )


@register("loop_enter", "loop_exit")
def loop_pass(op: OpView) -> FactorMap:
    b = Builder()
    dims = tuple((b.new(d),) for d in op.out_shapes[0])
    return b.build([dims], [dims])


@register("loop_slice")
def loop_slice(op: OpView) -> FactorMap:
    b = Builder()
    length = b.new(op.in_shapes[0][0], FIXED)
    dims = tuple((b.new(d),) for d in op.out_shapes[0])
    return b.build([((length,), *dims)], [dims])


@register("loop_stack")
def loop_stack(op: OpView) -> FactorMap:
    b = Builder()
    length = b.new(op.out_shapes[0][0], FIXED)
    dims = tuple((b.new(d),) for d in op.in_shapes[0])
    return b.build([dims], [((length,), *dims)])
