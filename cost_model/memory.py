"""Per-device memory of a plan: arguments, outputs and the live-activation peak."""

from __future__ import annotations

from collections.abc import Sequence


def live_peak(
    produced: Sequence[Sequence[int]],
    consumed: Sequence[Sequence[int]],
    nbytes: Sequence[float],
    keep: set[int],
) -> float:
    """Peak bytes of intermediate values alive at once, walking operations in order.

    Args:
      produced: per operation, the value ids it creates.
      consumed: per operation, the value ids it reads.
      nbytes: per value id, its per-device bytes.
      keep: values alive to the end (step outputs).

    A value lives from the operation that makes it to its last reader.
    """
    last = {}
    for i, vs in enumerate(consumed):
        for v in vs:
            last[v] = i
    made = {v for vs in produced for v in vs}  # inputs are counted as arguments
    live, peak = 0.0, 0.0
    for i, outs in enumerate(produced):
        live += sum(nbytes[v] for v in outs)
        peak = max(peak, live)
        dead = {v for v in consumed[i] if last.get(v) == i and v not in keep}
        dead |= {v for v in outs if v not in last and v not in keep}
        live -= sum(nbytes[v] for v in dead if v in made)
    return peak
