"""The user's mesh argument, the devices, and the default hardware."""

from __future__ import annotations

import math
import numbers

import jax

from autoshard.cost_model.hardware import PRESETS, Hardware
from autoshard.search import candidate_shapes, make_mesh

AXIS_NAMES = ("x", "y", "z")


def default_hardware(devices) -> Hardware:
    """A preset matching the first device: TPU v4/v5e, H100, else the CPU numbers."""
    d = devices[0]
    kind = getattr(d, "device_kind", "").lower()
    if d.platform == "tpu":
        return PRESETS["tpu-v5e"] if "v5" in kind else PRESETS["tpu-v4"]
    if d.platform == "gpu":
        return PRESETS["h100-nvlink"]
    return PRESETS["cpu"]


def candidate_meshes(mesh, devices, hw: Hardware) -> list[jax.sharding.Mesh]:
    """Meshes to plan on, from parallelize's `mesh` argument.

    None: every 1-D, 2-D and 3-D factorisation of the device count (only those with
    as many axes as the hardware gives per-axis numbers for, if it does); a tuple: that
    shape over all devices; a jax Mesh (Explicit or Auto): its devices and axis names,
    used with Auto axes so that autoshard's constraints drive propagation.
    """
    n = len(devices)
    if mesh is None:
        k = hw.per_axis_count()
        shapes = candidate_shapes(n, k, uniform=k is None) or [(n,)]
        return [make_mesh(s, AXIS_NAMES[: len(s)], devices) for s in shapes]
    if isinstance(mesh, jax.sharding.Mesh):
        _check_axes(mesh.devices.shape, hw)
        types = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
        return [jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=types)]
    shape = _mesh_shape(mesh)
    if not shape or any(s < 1 for s in shape) or len(shape) > 3:
        raise ValueError(f"autoshard: mesh={mesh!r}: give 1 to 3 positive axis sizes, e.g. (2, 4).")
    if math.prod(shape) != n:
        raise ValueError(
            f"autoshard: mesh shape {shape} covers {math.prod(shape)} devices but jax sees {n}: "
            f"pass a shape whose product is {n}, or a jax.sharding.Mesh over the devices to use."
        )
    _check_axes(shape, hw)
    return [make_mesh(shape, AXIS_NAMES[: len(shape)], devices)]


def _check_axes(shape, hw: Hardware) -> None:
    k = hw.per_axis_count()
    if k is not None and k != len(shape):
        raise ValueError(
            f"autoshard: hardware '{hw.name}' gives per-axis numbers for {k} mesh axes but the "
            f"mesh {tuple(shape)} has {len(shape)}: give one bandwidth/latency per axis."
        )


def _mesh_shape(mesh) -> tuple[int, ...]:
    """parallelize's mesh= as a shape tuple; anything else says what is expected."""
    expected = (
        "give None (autoshard chooses), a tuple of axis sizes such as (2, 4), or a "
        "jax.sharding.Mesh"
    )
    if isinstance(mesh, str | bytes) or not hasattr(mesh, "__iter__"):
        raise ValueError(f"autoshard: mesh={mesh!r} is not a mesh shape: {expected}.")
    shape = tuple(mesh)
    if not all(isinstance(s, numbers.Integral) and not isinstance(s, bool) for s in shape):
        raise ValueError(f"autoshard: mesh={mesh!r} has a non-integer axis size: {expected}.")
    return tuple(int(s) for s in shape)
