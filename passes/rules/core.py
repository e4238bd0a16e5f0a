"""Factor maps: the einsum-like description of how an operation may be split.

A factor is one index of the operation's iteration space (like a letter of an
einsum). Each tensor dimension is a tuple of factors, major first: a reshape
that merges [h, d] into one dimension gives that dimension the factors (h, d).
Splitting a factor over mesh axes splits every dimension it appears in.

    dot_general [b,m,k] x [b,k,n] -> [b,m,n]
    factors: b, m, n (pass), k (reduce: a split k leaves partial sums)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

Shape = tuple[int, ...]
Dims = tuple[tuple[int, ...], ...]  # per dimension, the factor indices (major first)

PASS, REDUCE, FIXED = "pass", "reduce", "fixed"


@dataclass(frozen=True)
class Factor:
    """One index of the iteration space.

    kind: PASS (appears in an output; splitting it splits the work),
      REDUCE (contracted; a split leaves partial results combined by `reduce_op`),
      FIXED (must stay whole on every device: sort axes, gathered axes, ...).
    """

    size: int
    kind: str = PASS
    reduce_op: str = "sum"


@dataclass(frozen=True)
class FactorMap:
    """Factors of an operation and how each operand/output dimension is made of them."""

    factors: tuple[Factor, ...]
    operands: tuple[Dims, ...]
    outputs: tuple[Dims, ...]

    def splittable(self) -> tuple[bool, ...]:
        """A factor may be split if it is not FIXED, is larger than 1, and is the
        major (first non-unit) factor of every dimension it appears in, so that a
        split of it is a block split of that dimension."""
        ok = [f.kind != FIXED and f.size > 1 for f in self.factors]
        for dims in (*self.operands, *self.outputs):
            for dim in dims:
                major = [i for i in dim if self.factors[i].size > 1]
                for i in major[1:]:
                    ok[i] = False
        return tuple(ok)


class Builder:
    """Allocates factors while a rule describes an operation."""

    def __init__(self) -> None:
        self.factors: list[Factor] = []

    def new(self, size: int, kind: str = PASS, reduce_op: str = "sum") -> int:
        self.factors.append(Factor(int(size), kind, reduce_op))
        return len(self.factors) - 1

    def fixed_dims(self, shape: Shape) -> Dims:
        """Fresh FIXED factors, one per dimension: a tensor that must stay whole."""
        return tuple((self.new(d, FIXED),) for d in shape)

    def build(self, operands: Sequence[Dims], outputs: Sequence[Dims]) -> FactorMap:
        return FactorMap(tuple(self.factors), tuple(operands), tuple(outputs))


@dataclass(frozen=True)
class OpView:
    """What a rule sees of an operation: shapes and params, nothing of jax."""

    primitive: str
    in_shapes: tuple[Shape, ...]
    out_shapes: tuple[Shape, ...]
    params: Any


Rule = Callable[[OpView], FactorMap]
RULES: dict[str, Rule] = {}
_warned: set[str] = set()


def register(*names: str) -> Callable[[Rule], Rule]:
    def wrap(rule: Rule) -> Rule:
        for name in names:
            RULES[name] = rule
        return rule

    return wrap


def replicated_rule(op: OpView) -> FactorMap:
    """The documented fallback: every operand and output stays whole (replicated)."""
    b = Builder()
    ins = [b.fixed_dims(s) for s in op.in_shapes]
    outs = [b.fixed_dims(s) for s in op.out_shapes]
    return b.build(ins, outs)


def factor_map(op: OpView) -> FactorMap:
    """Look up the rule for op's primitive; unknown primitives are replicated, with
    one warning per primitive name."""
    rule = RULES.get(op.primitive)
    if rule is None:
        if op.primitive not in _warned:
            _warned.add(op.primitive)
            warnings.warn(
                f"autoshard: no sharding rule for primitive '{op.primitive}'; its operands "
                "and results are kept replicated (correct, possibly slower).",
                stacklevel=2,
            )
        return replicated_rule(op)
    fmap = rule(op)
    check(op, fmap)
    return fmap


def has_rule(primitive: str) -> bool:
    return primitive in RULES


def check(op: OpView, fmap: FactorMap) -> None:
    """Each dimension's factors multiply to its size."""
    pairs = [*zip(op.in_shapes, fmap.operands, strict=True)]
    pairs += [*zip(op.out_shapes, fmap.outputs, strict=True)]
    for shape, dims in pairs:
        sizes = tuple(math.prod(fmap.factors[i].size for i in dim) for dim in dims)
        if sizes != tuple(shape):
            raise AssertionError(f"rule for {op.primitive}: factors {sizes} != shape {shape}")
