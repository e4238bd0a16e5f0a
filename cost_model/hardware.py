"""Per-device hardware numbers, and the logical mesh they are priced on."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace

GiB = 1024**3


@dataclass(frozen=True)
class MeshDesc:
    """A logical device mesh as numbers: axis sizes and names (no jax devices)."""

    shape: tuple[int, ...]
    names: tuple[str, ...]

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def group(self, axes) -> int:
        """Devices in one group spanned by the given axis indices."""
        return math.prod(self.shape[a] for a in axes)


@dataclass(frozen=True)
class Hardware:
    """What one device can do, for the cost model.

    Args:
      flops: peak floating-point operations per second of one device.
      bandwidth: interconnect bytes/second per device, one number or one per mesh axis
        (e.g. ``(1e10, 1e11)`` on a (2, 4) mesh whose second axis is 10x faster).
      latency: seconds of fixed cost per collective, one number or one per mesh axis.
      memory: bytes of device memory.
      memory_bandwidth: bytes/second between device memory and compute (roofline for
        elementwise work).
      name: a label for summaries.
      reduce_scatter: whether plans may reduce-scatter the partial sums of matmuls and
        sums (ZeRO-2/FSDP gradients). autoshard emits these reduce-scatters itself, since
        XLA's CPU backend never forms one (it keeps the all-reduce and slices). The CPU
        preset says False, which keeps its strategy space small.
      prefetch_overlap: fraction of a parameter's all-gather before a matmul that runs
        hidden behind compute (FSDP prefetches the next layer's parameters while this
        one computes; Zhao et al. 2023, "PyTorch FSDP"). 0 charges it in full, as on
        the CPU backend, whose collectives are synchronous.

    Every figure is checked when the Hardware is made: flops, bandwidth, memory and
    memory_bandwidth must be positive numbers; latency may be 0 (an idealised
    interconnect) but not negative; prefetch_overlap lies in [0, 1]. A bad figure is
    a ValueError naming the field.

    Example:
      >>> from autoshard import Hardware
      >>> hw = Hardware(flops=1e12, bandwidth=(1e9, 1e10), latency=1e-5, memory=16 * 2**30)
      >>> hw.axis_bandwidth(1)
      10000000000.0
    """

    flops: float
    bandwidth: float | tuple[float, ...]
    latency: float | tuple[float, ...] = 1e-5
    memory: float = 16 * GiB
    memory_bandwidth: float = 1e12
    name: str = "custom"
    reduce_scatter: bool = True
    prefetch_overlap: float = 0.0

    def __post_init__(self) -> None:
        for field_name in ("flops", "bandwidth", "latency", "memory", "memory_bandwidth"):
            _check_figure(self.name, field_name, getattr(self, field_name))
        overlap = self.prefetch_overlap
        if not _is_number(overlap) or not 0.0 <= overlap <= 1.0:
            raise ValueError(
                f"Hardware '{self.name}': prefetch_overlap={overlap!r} must be a fraction "
                "in [0, 1]."
            )

    def _per_axis(self, value, axis: int) -> float:
        if isinstance(value, tuple | list):
            if axis >= len(value):
                raise ValueError(
                    f"Hardware '{self.name}' gives {len(value)} per-axis values but the mesh "
                    f"has an axis {axis}: give one value per mesh axis, or a single number."
                )
            return float(value[axis])
        return float(value)

    def axis_bandwidth(self, axis: int) -> float:
        return self._per_axis(self.bandwidth, axis)

    def axis_latency(self, axis: int) -> float:
        return self._per_axis(self.latency, axis)

    def per_axis_count(self) -> int | None:
        """Number of mesh axes the per-axis numbers are for (None when uniform)."""
        for v in (self.bandwidth, self.latency):
            if isinstance(v, tuple | list):
                return len(v)
        return None

    def with_(self, **changes) -> Hardware:
        return replace(self, **changes)


# Figures that may be zero (an idealised link has no fixed cost); the rest must be > 0.
MAY_BE_ZERO = frozenset({"latency"})
MAY_BE_PER_AXIS = frozenset({"bandwidth", "latency"})


def _is_number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)


def _check_figure(name: str, field_name: str, value) -> None:
    """One number, or (bandwidth, latency) one per mesh axis; positive (latency >= 0)."""
    values = value if isinstance(value, tuple | list) else (value,)
    if not values or not all(_is_number(v) for v in values):
        raise ValueError(
            f"Hardware '{name}': {field_name}={value!r} is not a number: give a finite number"
            + (
                " or a tuple with one per mesh axis."
                if field_name in ("bandwidth", "latency")
                else "."
            )
        )
    low_ok = field_name in MAY_BE_ZERO
    if any(v < 0 or (v == 0 and not low_ok) for v in values):
        need = "0 or more" if low_ok else "a positive number"
        raise ValueError(f"Hardware '{name}': {field_name}={value!r} must be {need}.")


# Public spec-sheet numbers (dense bf16 peak, per-chip HBM; interconnect per device and
# direction), rounded. Sources: Google Cloud TPU v4 / v5e system architecture pages,
# NVIDIA H100 SXM datasheet (989 TFLOP/s bf16 dense, 3.35 TB/s HBM3, 900 GB/s NVLink
# bidirectional). The CPU numbers are an order of magnitude for emulated devices.
PRESETS: dict[str, Hardware] = {
    "tpu-v4": Hardware(275e12, 4.5e10, 1e-5, 32 * GiB, 1.2e12, "tpu-v4"),
    "tpu-v5e": Hardware(197e12, 4.5e10, 1e-5, 16 * GiB, 8.2e11, "tpu-v5e"),
    "h100-nvlink": Hardware(989e12, 4.5e11, 5e-6, 80 * GiB, 3.35e12, "h100-nvlink"),
    "cpu": Hardware(5e10, 5e9, 2e-5, 8 * GiB, 2e10, "cpu", reduce_scatter=False),
}
