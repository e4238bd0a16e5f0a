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
class Efficiency:
    """How far a device's achieved speed falls from its spec sheet, as fitted on
    published training runs (`autoshard.cost_model.calibration`). All 1.0: spec-sheet
    speeds, the cost model as it was.

    Args:
      flops: fraction of peak flops the operations achieve (in (0, 1]).
      hbm_traffic: fraction of the per-operation memory traffic the cost model charges
        that reaches device memory (in (0, 1]); compilers fuse the rest (XLA fusions,
        fused attention kernels keep intermediates on chip).
      comm: multiplies every collective's time (in (0, 1]): the share of its modelled
        time left exposed after overlap with compute and link efficiency.

    Example:
      >>> Efficiency(flops=0.6).hbm_traffic
      1.0
    """

    flops: float = 1.0
    hbm_traffic: float = 1.0
    comm: float = 1.0

    def __post_init__(self) -> None:
        for name in ("flops", "hbm_traffic", "comm"):
            v = getattr(self, name)
            if not isinstance(v, numbers.Real) or isinstance(v, bool) or not 0.0 < v <= 1.0:
                raise ValueError(f"Efficiency.{name}={v!r} must be a fraction in (0, 1].")

    @property
    def neutral(self) -> bool:
        return (self.flops, self.hbm_traffic, self.comm) == (1.0, 1.0, 1.0)


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
      efficiency: achieved fractions of the spec sheet (`Efficiency`). The fields above
        stay spec-sheet numbers; the cost model prices with `achieved_flops`,
        `achieved_memory_bandwidth`, and per-axis bandwidth and latency scaled by
        `efficiency.comm`. The TPU presets carry factors fitted on published runs;
        `uncalibrated()` drops them.
      half_as_f32: whether the compiler computes bfloat16/float16 arithmetic in float32
        and keeps the step's intermediate values as float32, as XLA's CPU compiler does
        (its bf16 matmuls return f32). The memory model then counts 2-byte float
        intermediates at 4 bytes, and an f32 copy of each 2-byte argument a matmul
        reads (from its first matmul to its last); arguments and outputs keep their
        dtype. The `cpu` preset says True, so that predictions hold for the programs
        compiled here; the accelerator presets say False (TPUs and GPUs keep bf16
        intermediates).

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
    levels: tuple[Level, ...] = ()
    efficiency: Efficiency = Efficiency()
    half_as_f32: bool = False

    def __post_init__(self) -> None:
        for field_name in ("flops", "bandwidth", "latency", "memory", "memory_bandwidth"):
            _check_figure(self.name, field_name, getattr(self, field_name))
        if not isinstance(self.efficiency, Efficiency):
            raise ValueError(
                f"Hardware '{self.name}': efficiency={self.efficiency!r} must be an "
                "autoshard.Efficiency(flops=..., hbm_traffic=..., comm=...)."
            )
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
        return self._per_axis(self.bandwidth, axis) / self.efficiency.comm

    def axis_latency(self, axis: int) -> float:
        return self._per_axis(self.latency, axis) * self.efficiency.comm

    @property
    def achieved_flops(self) -> float:
        """Flops per second the cost model prices with: peak times efficiency."""
        return self.flops * self.efficiency.flops

    @property
    def achieved_memory_bandwidth(self) -> float:
        """Memory bytes per second the cost model prices with: the spec sheet's,
        divided by the fraction of modelled traffic that reaches memory."""
        return self.memory_bandwidth / self.efficiency.hbm_traffic

    def uncalibrated(self) -> Hardware:
        """This hardware at its spec-sheet speeds (no fitted efficiency).

        Example:
          >>> hw = Hardware(1e15, 1e11, efficiency=Efficiency(flops=0.5))
          >>> hw.achieved_flops, hw.uncalibrated().achieved_flops
          (500000000000000.0, 1000000000000000.0)
        """
        return replace(self, efficiency=Efficiency())

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


GB = 1e9

# Presets from public spec sheets. Conventions:
# - flops: dense bf16 peak per chip (NVIDIA lists "with sparsity" figures at twice this).
# - memory, memory_bandwidth: per-chip HBM capacity and bandwidth as the source states them.
# - bandwidth: bytes/second one device sends over a mesh axis. GPUs: NVLink's bidirectional
#   figure halved (one direction), and one InfiniBand NIC per GPU between nodes. TPUs: a mesh
#   axis runs over one torus dimension, i.e. two of the chip's ICI ports, and a bidirectional
#   ring sends one way on each; so an axis gets (bidirectional ICI per chip) / (ICI ports).
#   Between slices (DCN): the per-chip share of the data-center network.
# - latency: a collective's fixed cost. Spec sheets do not give it; 10 us (ICI), 5 us
#   (NVLink) and 20 us (DCN, InfiniBand) are modelling assumptions of this project.
# The CPU numbers are an order of magnitude for emulated devices.

# Cloud TPU v4 (https://cloud.google.com/tpu/docs/v4): 275 TFLOPs bf16 per chip, 32 GiB
# HBM2 at 1200 GBps, pods of 4096 chips in a 3D torus (6 ICI ports). ICI: 50 GB/s per link
# and direction (Jouppi et al., "TPU v4: An Optically Reconfigurable Supercomputer", ISCA
# 2023; summarised at https://glennklockwood.com/garden/processors/TPUv4), so an axis gets
# 2 x 50 GB/s. No DCN figure is published for v4: ICI on every axis.
_TPU_V4 = Hardware(
    275e12,
    100 * GB,
    10e-6,
    32 * GiB,
    1200 * GB,
    "tpu-v4",
    levels=(Level("ici", None, 100 * GB, 10e-6),),
)
# Cloud TPU v5e (https://cloud.google.com/tpu/docs/v5e): 197 TFLOPs bf16, 16 GB HBM2 at
# 819 GBps, 400 GBps bidirectional ICI over 4 ports (2D torus), 256-chip pods; data-center
# network 6.4 Tbps per pod = 25 Gbps per chip (2 x 100 Gbps NICs per 8-chip host).
_TPU_V5E = Hardware(
    197e12,
    100 * GB,
    10e-6,
    16 * GB,
    819 * GB,
    "tpu-v5e",
    levels=(Level("ici", 256, 100 * GB, 10e-6), Level("dcn", None, 25e9 / 8, 20e-6)),
)
# Cloud TPU v5p (https://cloud.google.com/tpu/docs/v5p): 459 TFLOPs bf16, 95 GiB HBM2e at
# 2765 GBps, 1200 GBps bidirectional ICI per chip (3D torus, 6 ports), DCN 50 Gbps per chip;
# the largest single slice is 6144 chips.
_TPU_V5P = Hardware(
    459e12,
    200 * GB,
    10e-6,
    95 * GiB,
    2765 * GB,
    "tpu-v5p",
    levels=(Level("ici", 6144, 200 * GB, 10e-6), Level("dcn", None, 50e9 / 8, 20e-6)),
)
# Cloud TPU v6e / Trillium (https://cloud.google.com/tpu/docs/v6e): 918 TFLOPs bf16, 32 GB
# HBM at 1638 GBps, 800 GBps bidirectional ICI over 4 ports (2D torus), 256-chip pods;
# data-center network 25.6 Tbps per pod = 100 Gbps per chip (4 x 200 Gbps NICs per host).
_TPU_V6E = Hardware(
    918e12,
    200 * GB,
    10e-6,
    32 * GB,
    1638 * GB,
    "tpu-v6e",
    levels=(Level("ici", 256, 200 * GB, 10e-6), Level("dcn", None, 100e9 / 8, 20e-6)),
)
# NVIDIA A100 SXM 80GB (datasheet: https://www.nvidia.com/content/dam/en-zz/Solutions/
# Data-Center/a100/pdf/nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf): 312 TFLOPS bf16
# dense, 80 GB HBM2e at 2039 GB/s, NVLink 600 GB/s bidirectional; 8 GPUs per HGX/DGX node,
# one 200 Gb/s HDR InfiniBand ConnectX-6 per GPU (DGX A100 datasheet).
_A100 = Hardware(
    312e12,
    300 * GB,
    5e-6,
    80 * GB,
    2039 * GB,
    "a100",
    levels=(Level("nvlink", 8, 300 * GB, 5e-6), Level("infiniband", None, 200e9 / 8, 20e-6)),
)
# NVIDIA H100 SXM (https://www.nvidia.com/en-us/data-center/h100/): 989 TFLOPS bf16 dense
# (1979 with sparsity), 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s bidirectional; DGX H100:
# 8 GPUs, eight single-port ConnectX-7 at 400 Gb/s (https://docs.nvidia.com/dgx-basepod/
# reference-architecture-infrastructure-foundation-enterprise-ai/latest/core-components.html).
_H100 = Hardware(
    989e12,
    450 * GB,
    5e-6,
    80 * GB,
    3350 * GB,
    "h100",
    levels=(Level("nvlink", 8, 450 * GB, 5e-6), Level("infiniband", None, 400e9 / 8, 20e-6)),
)
# NVIDIA H200 SXM (https://www.nvidia.com/en-us/data-center/h200/): the H100's GH100 die
# (989 TFLOPS bf16 dense), 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s; DGX H200 networking as
# DGX H100 (same NVIDIA BasePOD page: 1,128 GB total GPU memory, eight ConnectX-7 400 Gb/s).
_H200 = Hardware(
    989e12,
    450 * GB,
    5e-6,
    141 * GB,
    4800 * GB,
    "h200",
    levels=(Level("nvlink", 8, 450 * GB, 5e-6), Level("infiniband", None, 400e9 / 8, 20e-6)),
)
# NVIDIA B200 in HGX/DGX B200 (https://www.nvidia.com/en-us/data-center/dgx-b200/, user guide
# https://docs.nvidia.com/dgx/dgxb200-user-guide/introduction-to-dgxb200.html): 1,440 GB and
# 64 TB/s HBM3e over 8 GPUs (180 GB, 8 TB/s each), NVLink 5 at 1.8 TB/s bidirectional, eight
# ConnectX-7 at 400 Gb/s; bf16 dense 2.25 PFLOPS per GPU at 1000 W (HGX B200, NVIDIA
# Blackwell datasheet, tabulated at https://glennklockwood.com/garden/processors/B200).
_B200 = Hardware(
    2250e12,
    900 * GB,
    5e-6,
    180 * GB,
    8000 * GB,
    "b200",
    levels=(Level("nvlink", 8, 900 * GB, 5e-6), Level("infiniband", None, 400e9 / 8, 20e-6)),
)

# Efficiency factors fitted on published MaxText runs by benchmarks/calibration.py
# (autoshard.cost_model.calibration; table in benchmarks/results/calibration.md): per
# generation the fraction of peak flops reached; shared, the fraction of the charged memory
# traffic that reaches HBM (at the fit's lower bound, 0.05: fused kernels keep nearly all of
# it on chip) and the exposed share of collective time. No published run anchors tpu-v4 or
# the GPUs here: they keep spec-sheet speeds.
FITTED: dict[str, Efficiency] = {
    "tpu-v5e": Efficiency(flops=0.831, hbm_traffic=0.05, comm=0.587),
    "tpu-v5p": Efficiency(flops=0.763, hbm_traffic=0.05, comm=0.587),
    "tpu-v6e": Efficiency(flops=0.624, hbm_traffic=0.05, comm=0.587),
}

PRESETS: dict[str, Hardware] = {
    "tpu-v4": _TPU_V4,
    "tpu-v5e": _TPU_V5E.with_(efficiency=FITTED["tpu-v5e"]),
    "tpu-v5p": _TPU_V5P.with_(efficiency=FITTED["tpu-v5p"]),
    "tpu-v6e": _TPU_V6E.with_(efficiency=FITTED["tpu-v6e"]),
    "a100": _A100,
    "h100": _H100,
    "h200": _H200,
    "b200": _B200,
    # one 8-GPU node: NVLink on every axis (the H100 numbers without the InfiniBand level)
    "h100-nvlink": Hardware(989e12, 450 * GB, 5e-6, 80 * GB, 3350 * GB, "h100-nvlink"),
    # XLA's CPU compiler computes bf16 in f32 (half_as_f32)
    "cpu": Hardware(5e10, 5e9, 2e-5, 8 * GiB, 2e10, "cpu", reduce_scatter=False, half_as_f32=True),
}
