"""Per-device compute time of one operation: a roofline of flops and memory traffic."""

from __future__ import annotations

from autoshard.cost_model.hardware import Hardware


def compute_time(flops: float, nbytes: float, hw: Hardware) -> float:
    """Seconds for `flops` operations touching `nbytes` bytes on one device."""
    return max(flops / hw.achieved_flops, nbytes / hw.achieved_memory_bandwidth)
