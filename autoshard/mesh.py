"""The user's mesh argument, the devices, and the default hardware.

A target may be abstract: a `jax.sharding.AbstractMesh`, or `devices=N` (an int)
for N devices this process does not have. Planning needs only axis sizes and names;
running needs devices, so a step planned for an abstract target plans but does not
run (see :class:`AbstractTarget`).
"""

from __future__ import annotations

import math
import numbers

import jax

from autoshard.cost_model.hardware import PRESETS, Hardware
from autoshard.search import candidate_shapes, make_mesh

AXIS_NAMES = ("x", "y", "z")


def resolve_devices(devices):
    """parallelize's `devices`: None (all visible), a sequence of devices, or an int
    count of abstract devices to plan for.

    Example:
      >>> resolve_devices(256)
      256
    """
    if devices is None:
        return jax.devices()
    if isinstance(devices, int):
        if devices < 1:
            raise ValueError(f"autoshard: devices={devices}: give a positive device count.")
        return devices
    return list(devices)


def is_abstract(mesh) -> bool:
    """Whether a mesh has no devices behind it (a jax AbstractMesh)."""
    return isinstance(mesh, jax.sharding.AbstractMesh)


def default_hardware(devices, mesh=None) -> Hardware:
    """A preset matching the first device: TPU v4/v5e, H100, else the CPU numbers.
    An abstract target has no device to look at: it needs `hardware=`."""
    if isinstance(devices, int) or is_abstract(mesh):
        target = f"devices={devices}" if isinstance(devices, int) else f"mesh={mesh}"
        raise ValueError(
            f"autoshard: planning for abstract devices ({target}) needs the hardware they "
            "are: pass hardware=, e.g. autoshard.PRESETS['tpu-v6e'] or "
            "autoshard.PRESETS['h100']."
        )
    d = devices[0]
    kind = getattr(d, "device_kind", "").lower()
    if d.platform == "tpu":
        for gen, preset in (("v6", "tpu-v6e"), ("v5p", "tpu-v5p"), ("v5", "tpu-v5e")):
            if gen in kind and preset in PRESETS:
                return PRESETS[preset]
        return PRESETS["tpu-v4"]
    if d.platform == "gpu":
        for gen, preset in (("b200", "b200"), ("h200", "h200"), ("a100", "a100")):
            if gen in kind and preset in PRESETS:
                return PRESETS[preset]
        return PRESETS["h100-nvlink"]
    return PRESETS["cpu"]


def abstract_mesh(shape, names) -> jax.sharding.AbstractMesh:
    """An AbstractMesh with Auto axes (autoshard's constraints drive propagation).

    Example:
      >>> abstract_mesh((16, 16), ("x", "y")).size
      256
    """
    types = (jax.sharding.AxisType.Auto,) * len(shape)
    return jax.sharding.AbstractMesh(tuple(shape), tuple(names), axis_types=types)


def _mesh(shape, names, devices):
    if isinstance(devices, int):
        return abstract_mesh(shape, names)
    return make_mesh(shape, names, devices)


def _shapes(n: int, hw: Hardware) -> list[tuple[int, ...]]:
    """Candidate shapes over n devices. Two shapes whose axes see the same (size,
    bandwidth, latency) up to order are the same problem relabelled: only the
    first is kept (with uniform hardware, the sorted shape)."""
    k = hw.per_axis_count()
    if not hw.levels:
        return candidate_shapes(n, k, uniform=k is None) or [(n,)]
    seen, out = set(), []
    for s in candidate_shapes(n, k):
        on = hw.for_mesh(s)
        key = tuple(sorted((s[a], on.axis_bandwidth(a), on.axis_latency(a)) for a in range(len(s))))
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


def candidate_meshes(mesh, devices, hw: Hardware) -> list:
    """Meshes to plan on, from parallelize's `mesh` and `devices` arguments.

    None: every 1-D, 2-D and 3-D factorisation of the device count (only those with
    as many axes as the hardware gives per-axis numbers for, if it does); a tuple: that
    shape over all devices; a jax Mesh (Explicit or Auto): its devices and axis names,
    used with Auto axes so that autoshard's constraints drive propagation; a jax
    AbstractMesh: its axis sizes and names, planned without devices. With
    `devices=N` (an int) the meshes are AbstractMeshes over N devices.

    Example:
      >>> [m.axis_sizes for m in candidate_meshes((16, 16), 256, PRESETS["tpu-v4"])]
      [(16, 16)]
    """
    n = devices if isinstance(devices, int) else len(devices)
    if mesh is None:
        return [_mesh(s, AXIS_NAMES[: len(s)], devices) for s in _shapes(n, hw)]
    if is_abstract(mesh):
        _check_axes(mesh.axis_sizes, hw)
        _check_count(mesh.axis_sizes, devices)
        return [abstract_mesh(mesh.axis_sizes, mesh.axis_names)]
    if isinstance(mesh, jax.sharding.Mesh):
        _check_axes(mesh.devices.shape, hw)
        types = (jax.sharding.AxisType.Auto,) * len(mesh.axis_names)
        return [jax.sharding.Mesh(mesh.devices, mesh.axis_names, axis_types=types)]
    shape = _mesh_shape(mesh)
    if not shape or any(s < 1 for s in shape) or len(shape) > 3:
        raise ValueError(f"autoshard: mesh={mesh!r}: give 1 to 3 positive axis sizes, e.g. (2, 4).")
    if math.prod(shape) != n:
        raise ValueError(
            f"autoshard: mesh shape {shape} covers {math.prod(shape)} devices but "
            f"{'devices=' if isinstance(devices, int) else 'jax sees '}{n}: "
            f"pass a shape whose product is {n}, or a jax.sharding.Mesh over the devices to use."
        )
    _check_axes(shape, hw)
    return [_mesh(shape, AXIS_NAMES[: len(shape)], devices)]


def _check_count(shape, devices) -> None:
    if isinstance(devices, int) and math.prod(shape) != devices:
        raise ValueError(
            f"autoshard: the AbstractMesh {tuple(shape)} has {math.prod(shape)} devices but "
            f"devices={devices}: give one of them, or make them agree."
        )


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


class AbstractTarget:
    """Stands in for the compiled step of a plan made for devices this process does
    not have: `.plan()` works, running or lowering raises a clear error."""

    def __init__(self, plan):
        self.plan = plan

    def _error(self, what: str) -> RuntimeError:
        shape = dict(self.plan.mesh.shape)
        return RuntimeError(
            f"autoshard: cannot {what} this step: its plan is for an abstract mesh {shape} "
            f"({self.plan.mesh.size} devices) that this process does not have (it sees "
            f"{jax.device_count()}). Use .plan() to inspect it (plan.summary(), plan.save(), "
            "autoshard.export), or parallelize with a mesh of local devices to run."
        )

    def __call__(self, *args):
        raise self._error("run")

    def lower(self, *args):
        raise self._error("lower")
