"""Cost of changing one tensor's layout from one spec to another.

A spec is a tuple with, per dimension, the tuple of mesh-axis indices splitting it
(major first). Per mesh axis: kept in place costs nothing; newly split is a local
slice (free); moved to another dimension (or position) is an all-to-all; dropped is
an all-gather. Several axes moving between different pairs of dimensions at once are
gathered (XLA has no single all-to-all for that); a swap adds a collective-permute.
"""

from __future__ import annotations

from autoshard.cost_model.collectives import ALL_GATHER, ALL_TO_ALL, PERMUTE, Collective
from autoshard.cost_model.hardware import MeshDesc

Spec = tuple[tuple[int, ...], ...]


def placement(spec: Spec) -> dict[int, tuple[int, tuple[int, ...]]]:
    """axis -> (dimension, the axes before it on that dimension)."""
    return {a: (d, axes[:k]) for d, axes in enumerate(spec) for k, a in enumerate(axes)}


def per_device_bytes(nbytes: float, spec: Spec, mesh: MeshDesc) -> float:
    return nbytes / mesh.group([a for axes in spec for a in axes])


def reshard(src: Spec, dst: Spec, nbytes: float, mesh: MeshDesc) -> tuple[Collective, ...]:
    """The collectives that turn a tensor of `nbytes` (global) laid out as src into dst."""
    if src == dst:
        return ()
    ps, pd = placement(src), placement(dst)
    moved = tuple(sorted(a for a in ps if a in pd and ps[a] != pd[a]))
    dropped = tuple(sorted(a for a in ps if a not in pd))
    pairs = {(ps[a][0], pd[a][0]) for a in moved}
    if len({s for s, _ in pairs}) < len(pairs) or len({d for _, d in pairs}) < len(pairs):
        # XLA's partitioner makes an all-to-all only when source and target dimensions
        # pair up one to one; merging or splitting axes across dimensions is gathered
        # and re-sliced ("involuntary full rematerialization").
        moved, dropped = (), tuple(sorted(moved + dropped))
    out = []
    if moved and mesh.group(moved) > 1:
        out.append(Collective(ALL_TO_ALL, moved, per_device_bytes(nbytes, src, mesh)))
        if len(pairs) > 1:  # a swap of dimensions also permutes the blocks
            out.append(Collective(PERMUTE, moved, per_device_bytes(nbytes, src, mesh)))
    # Axes leaving different dimensions are gathered one dimension at a time, the
    # minor dimension first (as XLA's partitioner does).
    split = set(ps)
    for dim in sorted({ps[a][0] for a in dropped}, reverse=True):
        axes = tuple(a for a in dropped if ps[a][0] == dim)
        split -= set(axes)
        if mesh.group(axes) > 1:
            out.append(Collective(ALL_GATHER, axes, nbytes / mesh.group(split)))
    return tuple(out)
