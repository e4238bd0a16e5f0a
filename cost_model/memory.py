"""Per-device memory of a plan: arguments, outputs and the live-activation peak."""

from __future__ import annotations

from collections.abc import Sequence


def live_sets(
    produced: Sequence[Sequence[int]],
    consumed: Sequence[Sequence[int]],
    keep: set[int],
    materialized: set[int] | None = None,
    reuse: Sequence[int | None] | None = None,
    held: set[int] | None = None,
) -> list[list[int]]:
    """Per operation, walking them in order, the intermediate values alive once it has
    made its results (its operands still alive).

    Args:
      produced: per operation, the value ids it creates.
      consumed: per operation, the value ids it reads.
      keep: values alive to the end (step outputs).
      materialized: the values that occupy memory (default all); the others are
        fused into their readers.
      reuse: per operation, an operand whose buffer its result may take over when
        this operation is its last reader (XLA writes elementwise results and scatters
        in place), or None.
      held: values in buffers of their own for the whole step, alive from the first
        operation (the step's outputs: XLA allocates them apart from the
        temporaries); an operand whose buffer one of them takes over lives in it.

    A value lives from the operation that makes it to its last reader. Values no
    operation makes (step arguments) are not listed: they are counted as arguments.
    """
    spans = live_intervals(produced, consumed, keep, materialized, reuse, held)
    out: list[list[int]] = [[] for _ in produced]
    for v in sorted(spans):
        first, last = spans[v]
        for i in range(first, last + 1):
            out[i].append(v)
    return out


def live_intervals(
    produced: Sequence[Sequence[int]],
    consumed: Sequence[Sequence[int]],
    keep: set[int],
    materialized: set[int] | None = None,
    reuse: Sequence[int | None] | None = None,
    held: set[int] | None = None,
) -> dict[int, tuple[int, int]]:
    """The same walk as `live_sets`, kept as one (first, last) operation per value that
    is ever alive: a value is made once and dies once, so it is alive at exactly the
    operations first..last. Linear in the number of values (the sets are not)."""
    held = held or set()
    last = {}
    for i, vs in enumerate(consumed):
        for v in vs:
            last[v] = i
    live: set[int] = set()
    first: dict[int, int] = {}
    spans: dict[int, tuple[int, int]] = {}
    for i, made in enumerate(produced):
        r = reuse[i] if reuse is not None else None
        if r is not None and last.get(r) == i and r not in keep and r in live:
            live.discard(r)  # the result is written into r's buffer
            if not held.intersection(made):  # else r lived in the held result's buffer
                spans[r] = (first[r], i - 1)
        for v in made:
            if (materialized is None or v in materialized) and v not in live:
                live.add(v)
                first[v] = i
        dead = {v for v in consumed[i] if last.get(v) == i and v not in keep}
        dead |= {v for v in made if v not in last and v not in keep}
        for v in dead & live:
            spans[v] = (first[v], i)
        live -= dead
    for v in live:
        spans[v] = (first[v], len(produced) - 1)
    for v in held.intersection(spans):
        spans[v] = (0, spans[v][1])
    return spans


def live_peak(
    produced: Sequence[Sequence[int]],
    consumed: Sequence[Sequence[int]],
    nbytes: Sequence[float],
    keep: set[int],
) -> float:
    """Peak bytes of intermediate values alive at once (see :func:`live_sets`)."""
    sets = live_sets(produced, consumed, keep)
    return max((sum(nbytes[v] for v in s) for s in sets), default=0.0)


def dfs_order(
    produced: Sequence[Sequence[int]], consumed: Sequence[Sequence[int]], roots: Sequence[int]
) -> list[int]:
    """Operations in depth-first post-order from the values in roots (step outputs):
    each result is computed right before its first reader needs it, so a gradient is
    consumed by its optimizer update before the next one is computed. This is the
    order XLA's memory-minimising DFS scheduler approximates. Operations that no root
    depends on are left out: XLA removes dead code, so they neither run nor keep
    their operands alive."""
    maker = {v: i for i, vs in enumerate(produced) for v in vs}
    seen: set[int] = set()
    order: list[int] = []
    for root in roots:
        if root not in maker or maker[root] in seen:
            continue
        stack = [(maker[root], False)]
        while stack:
            op, expanded = stack.pop()
            if expanded:
                order.append(op)
                continue
            if op in seen:
                continue
            seen.add(op)
            stack.append((op, True))
            for v in reversed(consumed[op]):
                p = maker.get(v)
                if p is not None and p not in seen:
                    stack.append((p, False))
    return order
