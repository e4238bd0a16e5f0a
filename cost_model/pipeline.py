"""Pipeline parallelism as numbers: bubble, stage-boundary transfers, activation memory.

p stages each run L/p layers; m microbatches stream through them. GPipe (Huang et
al. 2019) runs every forward microbatch, then every backward one: each pass takes
m + p - 1 ticks of one microbatch's stage time, so a fraction (p-1)/(m+p-1) of the
pass is bubble, and a stage holds the residuals of all m microbatches until their
backward runs. 1F1B (PipeDream-Flush, Narayanan et al. 2021) has the same bubble
but starts each microbatch's backward as soon as it can, so a stage holds at most
about p microbatches' residuals.
"""

from __future__ import annotations

from dataclasses import dataclass

from autoshard.cost_model.hardware import Hardware

GPIPE, ONE_F_ONE_B = "gpipe", "1f1b"
SCHEDULES = (GPIPE, ONE_F_ONE_B)


@dataclass(frozen=True)
class PipelineChoice:
    """What the planner chose for pipeline parallelism (`plan.pipeline`).

    Attributes:
      stages: p, the number of pipeline stages (the size of the pipeline mesh axis).
      microbatches: m.
      schedule: "gpipe" or "1f1b".
      axis: name of the mesh axis the stages are laid along.
      layers: trip count of the layer-stack loop; each stage runs layers / stages.
      bubble: fraction of the pipelined loops' time spent idle, (p-1)/(m+p-1).
      stage_memory: predicted bytes per device (arguments, activations, total).
      time: predicted step seconds.
      loop_time: seconds of the pipelined loops (bubble included).
      transfer_time: seconds of stage-boundary transfers.
    """

    stages: int
    microbatches: int
    schedule: str
    axis: str
    layers: int
    bubble: float
    stage_memory: dict[str, float]
    time: float
    loop_time: float
    transfer_time: float


def bubble_fraction(stages: int, microbatches: int) -> float:
    """(p-1)/(m+p-1): the idle fraction of a pipelined pass.

    Example:
      >>> bubble_fraction(4, 8)
      0.2727272727272727
    """
    return (stages - 1) / (microbatches + stages - 1)


def ticks(stages: int, microbatches: int) -> int:
    """Steps of one pipelined pass: m + p - 1 microbatch stage times."""
    return microbatches + stages - 1


def loop_time(serial: float, stages: int, microbatches: int) -> float:
    """Seconds of a pipelined loop that takes `serial` seconds on one stage group.

    Each stage runs 1/p of the layers on 1/m of the batch per tick, for m + p - 1
    ticks: serial / p / (1 - bubble).

    Example:
      >>> round(loop_time(8.0, 4, 8), 3)
      2.75
    """
    return serial / stages * ticks(stages, microbatches) / microbatches


def transfer_time(
    boundary_bytes: float, stages: int, microbatches: int, hw: Hardware, axis: int
) -> float:
    """Seconds to pass stage boundaries in one pipelined pass: every tick each stage
    sends one microbatch's boundary (boundary_bytes is the whole batch's, per
    device) to its neighbour, point to point over the pipeline axis."""
    if stages <= 1:
        return 0.0
    per_tick = hw.axis_latency(axis) + boundary_bytes / microbatches / hw.axis_bandwidth(axis)
    return ticks(stages, microbatches) * per_tick


def gather_time(nbytes: float, stages: int, hw: Hardware, axis: int) -> float:
    """Seconds to hand the last stage's outputs (nbytes per device) to every stage:
    one all-reduce over the pipeline axis (ring: 2(p-1)/p of the bytes)."""
    if stages <= 1 or nbytes == 0:
        return 0.0
    return hw.axis_latency(axis) + 2 * (stages - 1) / stages * nbytes / hw.axis_bandwidth(axis)


def activation_memory(
    residual_bytes: float, stages: int, microbatches: int, schedule: str
) -> float:
    """Bytes of layer residuals one stage holds at its peak.

    residual_bytes: the residuals of every layer for the whole batch (per device of
    the remaining axes). A stage holds its 1/p of the layers; GPipe keeps all m
    microbatches live until the backward pass, 1F1B at most min(p, m).

    Example:
      >>> activation_memory(64.0, 4, 8, "gpipe"), activation_memory(64.0, 4, 8, "1f1b")
      (16.0, 8.0)
    """
    per_stage = residual_bytes / stages
    if schedule == ONE_F_ONE_B:
        return per_stage * min(stages, microbatches) / microbatches
    return per_stage


def microbatch_candidates(batch: int, stages: int) -> list[int]:
    """Microbatch counts worth trying: divisors m of the batch with m >= p (the
    bubble shrinks with m; beyond 4p the per-tick latency dominates), smallest first.

    Example:
      >>> microbatch_candidates(64, 4)
      [4, 8, 16]
    """
    return [m for m in range(stages, 4 * stages + 1) if batch % m == 0]
