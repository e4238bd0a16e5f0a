"""What one compiled step costs, read from the compiled program (never from a plan).

Collectives come from the SPMD-partitioned HLO (``autoshard.parse_collectives``), flops
from ``compiled.cost_analysis()`` and memory from ``compiled.memory_analysis()``, all per
device. The estimated step time prices them on one reference ``autoshard.Hardware``:

    flops / peak  +  sum over collectives of (latency + ring factor * bytes / bandwidth)

with ring factors all-reduce 2(n-1)/n; all-gather, reduce-scatter, all-to-all (n-1)/n;
collective-permute 1, for a group of n devices. A second, informational estimate
replaces flops / peak by the roofline max(flops / peak, bytes accessed / memory bandwidth).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import jax

import autoshard

_RING = {"all-reduce": 2.0, "all-gather": 1.0, "reduce-scatter": 1.0, "all-to-all": 1.0}


@dataclass(frozen=True)
class KindStats:
    """The collectives of one kind: how many, bytes per device, group sizes seen."""

    count: int
    nbytes: int
    group_sizes: tuple[int, ...]


@dataclass(frozen=True)
class Measurement:
    """Per-device numbers of one compiled step, and its timings (seconds, bytes)."""

    collectives: dict[str, KindStats]
    flops: float
    memory: float
    compute_time: float
    memory_time: float
    comm_time: float
    compile_time: float
    cpu_step: float
    loss: float

    @property
    def est_time(self) -> float:
        """Estimated step time on the reference hardware."""
        return self.compute_time + self.comm_time

    @property
    def roofline_time(self) -> float:
        """Like est_time, with compute priced as max(flops, memory traffic) time."""
        return max(self.compute_time, self.memory_time) + self.comm_time


def ring_factor(kind: str, n: int) -> float:
    """Fraction of the buffer one device sends in a ring collective over n devices.

    >>> ring_factor("all-reduce", 8), ring_factor("collective-permute", 2)
    (1.75, 1.0)
    """
    if kind == "collective-permute":
        return 1.0
    return _RING[kind] * (n - 1) / n


def collective_time(c: autoshard.Collective, hw: autoshard.Hardware, num_devices: int) -> float:
    """Latency + ring factor * bytes / bandwidth; 0 for a group of one device.

    The reference hardware has one bandwidth and latency for every device (axis 0's).
    """
    n = c.group_size or num_devices  # 0: the group could not be read, assume all devices
    if n <= 1:
        return 0.0
    bw, lat = hw.axis_bandwidth(0), hw.axis_latency(0)
    return lat + ring_factor(c.kind, n) * c.bytes / bw


def by_kind(colls: list[autoshard.Collective]) -> dict[str, KindStats]:
    """Collectives grouped by kind."""
    out: dict[str, KindStats] = {}
    for c in colls:
        prev = out.get(c.kind, KindStats(0, 0, ()))
        sizes = tuple(sorted(set(prev.group_sizes) | {c.group_size}))
        out[c.kind] = KindStats(prev.count + 1, prev.nbytes + c.bytes, sizes)
    return out


def cost_of(compiled) -> tuple[float, float]:
    """Per-device (flops, bytes accessed); ``cost_analysis()`` is a dict in jax 0.10
    (a list of one dict in some older versions)."""
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    cost = cost or {}
    return float(cost.get("flops", 0.0)), float(cost.get("bytes accessed", 0.0))


def memory_of(compiled) -> float:
    """Per-device bytes: the peak if XLA reports one, else argument + output + temp."""
    m = compiled.memory_analysis()
    peak = getattr(m, "peak_memory_in_bytes", 0) or 0
    if peak > 0:
        return float(peak)
    total = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
    return float(total - m.alias_size_in_bytes)


def run_timed(compiled, args, runs: int) -> tuple[float, float]:
    """(median seconds per step after one warm-up call, the loss of the first call).

    Arguments are placed on the compiled input shardings first, so transfers are
    not timed.
    """
    placed = jax.device_put(args, compiled.input_shardings[0])
    out = jax.block_until_ready(compiled(*placed))
    loss = float(out[1]["loss"])
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*placed))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), loss


def measure(lowerable, args, hw: autoshard.Hardware, runs: int = 5) -> Measurement:
    """Lower and compile ``lowerable(*args)`` (a jitted function, or anything with
    ``.lower``), read its costs, and run it ``runs`` times after a warm-up."""
    t0 = time.perf_counter()
    compiled = lowerable.lower(*args).compile()
    compile_time = time.perf_counter() - t0
    text = compiled.as_text()
    colls = autoshard.parse_collectives(text)
    n = jax.device_count()
    flops, nbytes = cost_of(compiled)
    cpu_step, loss = run_timed(compiled, args, runs)
    return Measurement(
        collectives=by_kind(colls),
        flops=flops,
        memory=memory_of(compiled),
        compute_time=flops / hw.flops,
        memory_time=nbytes / hw.memory_bandwidth,
        comm_time=sum(collective_time(c, hw, n) for c in colls),
        compile_time=compile_time,
        cpu_step=cpu_step,
        loss=loss,
    )
