"""Per-device hardware numbers, and the logical mesh they are priced on."""

from __future__ import annotations

import math
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
class Level:
    """One level of a cluster's interconnect: a domain of `devices` devices joined by
    links of `bandwidth` bytes/second per device and `latency` seconds per collective
    (e.g. NVLink within an 8-GPU node, ICI within a TPU slice). `devices=None` for the
    outermost level, which joins the domains below it (InfiniBand, DCN).

    Example:
      >>> Level("nvlink", 8, 450e9, 3e-6).devices
      8
    """

    name: str
    devices: int | None
    bandwidth: float
    latency: float


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
      levels: the cluster's interconnect levels, innermost first (see `Level`). Devices
        are numbered row-major over the mesh, so the last (minor) mesh axes stay inside
        a node and the first (major) ones cross nodes: a mesh axis whose device groups
        fit inside a level's domain gets that level's numbers, else the next level's.
        Empty: `bandwidth` and `latency` apply as given.

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
    levels: tuple[Level, ...] = ()

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

    def axis_levels(self, shape: tuple[int, ...]) -> tuple[Level, ...]:
        """The level each axis of a mesh of this shape runs over: the innermost level
        whose domain holds every group of devices along the axis (an axis whose groups
        straddle domains runs at the speed of the slower level).

        Example:
          >>> hw = Hardware(1e15, 1.0, levels=(Level("nvlink", 8, 4.5e11, 3e-6),
          ...                                   Level("ib", None, 5e10, 1e-5)))
          >>> [lv.name for lv in hw.axis_levels((4, 8))]
          ['ib', 'nvlink']
        """
        out, inner = [], 1
        for size in reversed(shape):
            span = inner * size
            fits = [lv for lv in self.levels if lv.devices is None or lv.devices % span == 0]
            out.append(fits[0] if fits else self.levels[-1])
            inner = span
        return tuple(reversed(out))

    def for_mesh(self, shape: tuple[int, ...]) -> Hardware:
        """This hardware with one bandwidth and latency per axis of a mesh of this
        shape, from its levels (itself when it has none).

        Example:
          >>> hw = Hardware(1e15, 1.0, levels=(Level("nvlink", 8, 4.5e11, 3e-6),
          ...                                   Level("ib", None, 5e10, 1e-5)))
          >>> hw.for_mesh((4, 8)).bandwidth
          (50000000000.0, 450000000000.0)
        """
        if not self.levels:
            return self
        lvs = self.axis_levels(tuple(shape))
        return replace(
            self,
            bandwidth=tuple(lv.bandwidth for lv in lvs),
            latency=tuple(lv.latency for lv in lvs),
            levels=(),
        )

    def per_axis_count(self) -> int | None:
        """Number of mesh axes the per-axis numbers are for (None when uniform or when
        levels give numbers for any mesh)."""
        if self.levels:
            return None
        for v in (self.bandwidth, self.latency):
            if isinstance(v, tuple | list):
                return len(v)
        return None

    def with_(self, **changes) -> Hardware:
        return replace(self, **changes)


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
