"""Loops and branches: a loop carry keeps one sharding (in == out); loop constants,
scanned slices and branch results stay whole (the documented conservative choice)."""

from __future__ import annotations

from autoshard.passes.rules.core import Builder, FactorMap, OpView, register


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
