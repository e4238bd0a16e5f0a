"""Elementwise families: every same-shape operand and output shares one factor per
dimension; rank-0 operands (scalars, literals) carry no factor."""

from __future__ import annotations

from autoshard.passes.rules.core import Builder, FactorMap, OpView, register

UNARY = (
    "neg sign floor ceil round is_finite exp exp2 log log1p expm1 tanh logistic sin cos tan "
    "asin acos atan sinh cosh asinh acosh atanh sqrt rsqrt cbrt abs not population_count clz "
    "imag real conj integer_pow square reciprocal erf erfc erf_inv lgamma digamma "
    "stop_gradient copy copy_p convert_element_type reduce_precision sharding_constraint reshard"
)
NARY = (
    "add sub mul div rem pow max min nextafter atan2 and or xor eq ne lt le gt ge "
    "shift_left shift_right_logical shift_right_arithmetic add_any select_n clamp "
    "igamma igammac random_gamma_grad polygamma zeta threefry2x32 complex"
)


def elementwise(op: OpView) -> FactorMap:
    """[a,b], [a,b] | [1,b] | [] -> [a,b]: one factor per output dimension; operands
    broadcast along size-1 dimensions (or rank 0) carry no factor there."""
    b = Builder()
    shape = op.out_shapes[0]
    dims = tuple((b.new(d),) for d in shape)
    ins = []
    for s in op.in_shapes:
        if s == shape:
            ins.append(dims)
        elif len(s) == 0:
            ins.append(())
        elif len(s) == len(shape) and all(a in (1, o) for a, o in zip(s, shape, strict=True)):
            ins.append(tuple(d if a == o else () for d, a, o in zip(dims, s, shape, strict=True)))
        else:  # implicit broadcasting is not in jaxprs; keep anything odd whole
            ins.append(b.fixed_dims(s))
    outs = [dims if s == shape else b.fixed_dims(s) for s in op.out_shapes]
    return b.build(ins, outs)


def paired_identity(op: OpView) -> FactorMap:
    """Operand i -> output i, unchanged (device_put, optimization_barrier)."""
    b = Builder()
    dims = [tuple((b.new(d),) for d in s) for s in op.in_shapes]
    return b.build(dims, dims[: len(op.out_shapes)])


def def_elementwise(*names: str) -> None:
    register(*names)(elementwise)


def_elementwise(*UNARY.split(), *NARY.split())
register("device_put", "optimization_barrier")(paired_identity)
