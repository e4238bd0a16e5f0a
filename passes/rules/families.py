"""Primitive families that passes other than enumeration need to know: which
operations contract (do matmul-like work), which XLA fuses into their neighbours, and
which are decisions of their own even with a single array operand."""

from __future__ import annotations

from autoshard.passes.rules.elementwise import NARY, UNARY

ELEMENTWISE = frozenset(UNARY.split()) | frozenset(NARY.split())
CONTRACTIONS = frozenset({"dot_general", "conv_general_dilated"})
LAYOUT = frozenset(
    {"broadcast_in_dim", "reshape", "transpose", "squeeze", "expand_dims", "iota", "slice"}
    | {"concatenate", "pad", "rev"}
)
# A scan's boundary operations (passes/graph.py): no work, no memory traffic.
BOUNDARY = frozenset({"loop_enter", "loop_slice", "loop_stack", "loop_exit"})
FUSIBLE = ELEMENTWISE | LAYOUT | BOUNDARY
REDUCTIONS = frozenset(
    {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "reduce_and", "reduce_or"}
    | {"argmax", "argmin"}
)
# Operations XLA fuses their fusible producers into: a value made by a fusible operation
# and read only by these never exists in memory.
FUSION_CONSUMERS = FUSIBLE | REDUCTIONS
# Never merged into the producer of one operand: their layout is a choice of its own.
DECISIONS = (
    CONTRACTIONS
    | {"gather", "scatter", "scatter-add", "scatter_add"}
    | {
        "scatter-mul",
        "scatter_mul",
        "scatter-min",
        "scatter-max",
        "scan",
        "while",
        "cond",
        "random_bits",  # its operand is a key, whose layout says nothing of the bits
    }
)
# Operations whose partial sums a plan may reduce-scatter. The interpreter runs them
# under shard_map with an explicit psum_scatter: XLA does not form reduce-scatters on
# every backend (the CPU one keeps all-reduce + slice).
SCATTERABLE = frozenset({"dot_general", "reduce_sum"})
