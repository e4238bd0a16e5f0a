"""Cost of changing one tensor's layout from one spec to another.

A spec is a tuple with, per dimension, the tuple of mesh-axis indices splitting it
(major first). Per mesh axis: kept in place costs nothing; newly split is a local
slice (free); moved to another dimension (or position) is an all-to-all; dropped is
an all-gather.
"""

from __future__ import annotations

import math

from autoshard.cost_model.collectives import ALL_GATHER, ALL_TO_ALL, Collective
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
    out = []
    if moved and mesh.group(moved) > 1:
        out.append(Collective(ALL_TO_ALL, moved, per_device_bytes(nbytes, src, mesh)))
    if dropped and mesh.group(dropped) > 1:
        kept = [a for a in ps if a not in dropped]
        out.append(Collective(ALL_GATHER, dropped, nbytes / math.prod(mesh.shape[a] for a in kept)))
    return tuple(out)
