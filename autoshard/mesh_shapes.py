"""Mesh shapes to search and jax meshes over the devices."""

from __future__ import annotations

import math

import jax


def candidate_shapes(
    n: int, ndim: int | None = None, uniform: bool = False
) -> list[tuple[int, ...]]:
    """(n,), then every 2-D and 3-D factorisation with axes of size >= 2. With uniform
    hardware (the same numbers on every axis) a permutation of a shape is the same
    problem with axes relabelled, so only the sorted shape is kept."""
    shapes = [(n,)]
    for a in range(2, n):
        if n % a == 0:
            shapes.append((a, n // a))
    for a in range(2, n):
        for b in range(2, n):
            if n % (a * b) == 0 and n // (a * b) >= 2:
                shapes.append((a, b, n // (a * b)))
    if uniform:
        shapes = [s for s in shapes if list(s) == sorted(s)]
    return [s for s in shapes if ndim is None or len(s) == ndim]


def make_mesh(shape, names, devices) -> jax.sharding.Mesh:
    devs = devices[: math.prod(shape)]
    return jax.make_mesh(
        shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape), devices=devs
    )
