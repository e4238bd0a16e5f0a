"""Alpha-beta costs of collectives over groups of mesh axes.

Bytes are per device, counted the way autoshard.collectives reads them from HLO:
all-reduce and all-to-all: the buffer; all-gather: the gathered result;
reduce-scatter: the operand before scattering. Ring algorithms (bandwidth-optimal):
all-reduce moves 2(n-1)/n of the buffer, the others (n-1)/n.
"""

from __future__ import annotations

from dataclasses import dataclass

from autoshard.cost_model.hardware import Hardware, MeshDesc

ALL_REDUCE, ALL_GATHER = "all-reduce", "all-gather"
REDUCE_SCATTER, ALL_TO_ALL = "reduce-scatter", "all-to-all"
PERMUTE = "collective-permute"
_RING_FACTOR = {ALL_REDUCE: 2.0, ALL_GATHER: 1.0, REDUCE_SCATTER: 1.0, ALL_TO_ALL: 1.0}


def _factor(kind: str, n: int) -> float:
    """Fraction of the bytes each device sends: ring algorithms, or all of it for a
    point-to-point permute."""
    return 1.0 if kind == PERMUTE else _RING_FACTOR[kind] * (n - 1) / n


@dataclass(frozen=True)
class Collective:
    """One predicted collective: kind, mesh axes it spans, per-device bytes."""

    kind: str
    axes: tuple[int, ...]
    nbytes: float
    reduce_op: str = "sum"


def fixed_cost(axes: tuple[int, ...], hw: Hardware) -> float:
    """Latency of one collective over these mesh axes (the slowest axis's)."""
    return max(hw.axis_latency(a) for a in axes)


def time(c: Collective, mesh: MeshDesc, hw: Hardware, latency: bool = True) -> float:
    """Seconds for one collective: latency + ring factor * bytes / slowest axis bandwidth.

    latency=False prices a collective that the compiler fuses into another one (its
    bytes still move, its fixed cost is paid once by the fused collective)."""
    n = mesh.group(c.axes)
    if n <= 1 or c.nbytes == 0:
        return 0.0
    bw = min(hw.axis_bandwidth(a) for a in c.axes)
    lat = fixed_cost(c.axes, hw) if latency else 0.0
    return lat + _factor(c.kind, n) * c.nbytes / bw


def total_time(cs, mesh: MeshDesc, hw: Hardware, fused_all_reduce: bool = False) -> float:
    """Seconds for collectives run one after another; with fused_all_reduce, their
    all-reduces join one fused all-reduce and pay no latency of their own."""
    return sum(time(c, mesh, hw, not (fused_all_reduce and c.kind == ALL_REDUCE)) for c in cs)
