"""Calibration of the cost model against published training runs, with held-out checks.

The cost model prices a step from spec-sheet numbers: each operation takes
max(flops / peak, bytes / memory bandwidth), each collective latency + bytes / link
bandwidth. Real runs reach a fraction of that. Three factors (`Efficiency`) close
the gap, chosen because each names one thing the model cannot see:

- ``flops``, per chip generation: the fraction of peak the matmuls reach (MXU or
  tensor-core utilisation, pipeline bubbles in the chip, the step's host overhead).
  Chips differ (v5e runs MaxText's dense models at 56-67% MFU, v6e at 44-50%), so
  one factor per generation.
- ``hbm_traffic``, shared: the fraction of the memory traffic the model charges
  (every non-fusible operation reads its operands and writes its result) that
  reaches device memory. XLA fusions and fused attention kernels (MaxText's splash
  attention) keep the rest on chip. A property of the compiler, so shared.
- ``comm``, shared: the share of the modelled collective time left exposed after
  overlap with compute (MaxText enables XLA's async collective fusion, so FSDP's
  all-gathers and reduce-scatters run behind the matmuls) and link efficiency.

A step's time under factors ``e`` is re-priced from what the plan recorded on
spec-sheet hardware (`Priced`: per-operation flops and bytes, and the rest of the
predicted time, which is communication and resharding):
``sum(max(f / (e.flops * peak), e.hbm_traffic * b / bandwidth)) + e.comm * rest``,
exactly what the planner computes with a `Hardware` carrying ``e``.

`fit` finds the factors by least squares (scipy) on the relative MFU error of the
anchors marked "fit" only; the others are predicted. MFU follows MaxText's
definition (`maxtext_flops_per_token`): model flops / (step time x peak x chips).

Example:
  >>> from autoshard.cost_model.hardware import Efficiency, Hardware
  >>> p = Priced(ops=((1e12, 0.0),), rest=0.0, flops=1e12, memory_bandwidth=1e12)
  >>> step_time(p, Efficiency(flops=0.5))
  2.0
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.optimize import least_squares

from autoshard.cost_model.hardware import Efficiency, Hardware

FIT, HELD_OUT = "fit", "held out"
# bounds of every factor in the fit: a chip reaching under 5% of anything is not a
# calibration, it is a modelling error to fix elsewhere
LOW, HIGH = 0.05, 1.0


@dataclass(frozen=True)
class Anchor:
    """One published training run.

    Attributes:
      name: a short label, e.g. "Llama 3.1 8B".
      preset: the `autoshard.PRESETS` name of its hardware, e.g. "tpu-v6e".
      chips: devices it ran on.
      mfu: published model flops utilisation (0.4546 for 45.46%).
      role: FIT (used by `fit`) or HELD_OUT (only predicted).
      source: where the number is published.
    """

    name: str
    preset: str
    chips: int
    mfu: float
    role: str
    source: str


_MAXTEXT_TIERS = "MaxText docs/reference/models/tiering.md (Trillium gold tier)"
_MAXTEXT_V5E = "MaxText MaxText/configs/v5e/README.md (1x v5e-256 row)"
_MAXTEXT_V5P = "MaxText docs runtime performance results, TPU v5p table"
_MEGATRON = "Narayanan et al. 2021, Efficient Large-Scale Language Model Training (SC21), Table 1"

ANCHORS: tuple[Anchor, ...] = (
    Anchor("Llama 3.1 8B, seq 8192", "tpu-v6e", 256, 0.4546, HELD_OUT, _MAXTEXT_TIERS),
    Anchor("Llama 2 70B, seq 4096", "tpu-v6e", 256, 0.438, FIT, _MAXTEXT_TIERS),
    Anchor("Llama 3.1 70B, seq 8192", "tpu-v6e", 256, 0.5033, FIT, _MAXTEXT_TIERS),
    Anchor("MaxText 16B, seq 2048", "tpu-v5e", 256, 0.6110, FIT, _MAXTEXT_V5E),
    Anchor("MaxText 32B, seq 2048", "tpu-v5e", 256, 0.6686, HELD_OUT, _MAXTEXT_V5E),
    Anchor("MaxText 64B, seq 2048", "tpu-v5e", 256, 0.5990, FIT, _MAXTEXT_V5E),
    Anchor("MaxText 128B, seq 2048", "tpu-v5e", 256, 0.5606, HELD_OUT, _MAXTEXT_V5E),
    Anchor("MaxText 32B, seq 2048", "tpu-v5p", 64, 0.7147, FIT, _MAXTEXT_V5P),
    Anchor("MaxText 64B, seq 2048", "tpu-v5p", 64, 0.7031, HELD_OUT, _MAXTEXT_V5P),
    Anchor("MaxText 128B, seq 2048", "tpu-v5p", 128, 0.6868, HELD_OUT, _MAXTEXT_V5P),
    Anchor("Megatron-LM 1T, seq 2048", "a100", 3072, 0.52, HELD_OUT, _MEGATRON),
)


def maxtext_flops_per_token(
    layers: int,
    d_model: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    d_ff: int,
    vocab: int,
    seq: int,
    gated: bool = True,
) -> float:
    """Training flops per token as MaxText counts them for MFU
    (``calculate_tflops_training_per_device`` before its causal-attention change):
    3 x (forward) with forward = 2 x (every matmul weight: q, k, v, o, the MLP's
    up/gate/down, the output head; not the embedding lookup) + attention's two
    ``T x T`` products, 2 x 2 x T x heads x head_dim per layer, not halved for the
    causal mask. Per token: ``6 N + 12 L T H d_head``.

    Example (Llama 3.1 8B at sequence 8192: 57.9 GFLOP per token):
      >>> round(maxtext_flops_per_token(32, 4096, 32, 8, 128, 14336, 128256, 8192) / 1e9, 1)
      57.9
    """
    mlp = (3 if gated else 2) * d_model * d_ff
    attn = d_model * (heads + 2 * kv_heads) * head_dim + heads * head_dim * d_model
    weights = layers * (mlp + attn) + d_model * vocab
    return 6.0 * weights + 12.0 * layers * seq * heads * head_dim


@dataclass(frozen=True)
class Priced:
    """What re-pricing a plan needs, recorded when it was planned on spec-sheet speeds.

    Attributes:
      ops: per operation, (flops, bytes of memory traffic) per device per step
        (`autoshard.Plan.cost.ops`).
      rest: the rest of the predicted step time (collectives, resharding), seconds.
      flops: flops/second the plan was priced with (`Hardware.achieved_flops`; the
        peak for a spec-sheet `Hardware`).
      memory_bandwidth: memory bytes/second it was priced with
        (`Hardware.achieved_memory_bandwidth`).
    """

    ops: tuple[tuple[float, float], ...]
    rest: float
    flops: float
    memory_bandwidth: float

    @classmethod
    def from_cost(cls, cost, hw: Hardware) -> Priced:
        """From a plan's `Cost` (its `time` and `ops`) and the `Hardware` it was planned
        with. `step_time(Priced.from_cost(plan.cost, hw), e)` is then the plan's step
        time with `e` applied on top of `hw`'s own efficiency; to price a plan made on
        spec-sheet speeds with calibrated factors, plan with `hw.uncalibrated()`."""
        return cls.of(cost.time, cost.ops, hw.achieved_flops, hw.achieved_memory_bandwidth)

    @classmethod
    def of(cls, time: float, ops, flops: float, memory_bandwidth: float) -> Priced:
        """From a plan's predicted `time` and `ops`, priced at these speeds."""
        arr = np.asarray(ops, dtype=float).reshape(-1, 2)
        compute = np.maximum(arr[:, 0] / flops, arr[:, 1] / memory_bandwidth).sum()
        return cls(tuple(map(tuple, arr)), max(time - float(compute), 0.0), flops, memory_bandwidth)


def step_time(p: Priced, e: Efficiency) -> float:
    """Predicted seconds per step of a priced plan under efficiency factors `e`."""
    arr = np.asarray(p.ops, dtype=float).reshape(-1, 2)
    flops_t = arr[:, 0] / (e.flops * p.flops)
    bytes_t = e.hbm_traffic * arr[:, 1] / p.memory_bandwidth
    return float(np.maximum(flops_t, bytes_t).sum()) + e.comm * p.rest


def mfu(model_flops: float, time: float, peak: float) -> float:
    """Model flops utilisation of one device: its model flops per step over what its
    peak could do in the step's time."""
    return model_flops / (time * peak)


@dataclass(frozen=True)
class Observation:
    """An anchor as planned: the priced plan and the model flops per device per step."""

    anchor: Anchor
    priced: Priced
    model_flops: float

    def predicted_mfu(self, e: Efficiency) -> float:
        return mfu(self.model_flops, step_time(self.priced, e), self.priced.flops)


def _unpack(x, families) -> dict[str, Efficiency]:
    hbm, comm = x[-2], x[-1]
    return {f: Efficiency(float(x[i]), float(hbm), float(comm)) for i, f in enumerate(families)}


def fit(observations: list[Observation]) -> dict[str, Efficiency]:
    """Least-squares efficiency factors from the observations whose anchor is FIT:
    one ``flops`` factor per preset among them, ``hbm_traffic`` and ``comm`` shared,
    minimising the relative errors of predicted against published MFU. HELD_OUT
    observations are never read.

    Args:
      observations: planned anchors (`Observation`).

    Returns:
      preset name -> `Efficiency`, for every preset with at least one FIT anchor.

    Example:
      >>> a = Anchor("x", "tpu-v6e", 1, 0.5, FIT, "")
      >>> p = Priced(((1e12, 1e9),), 0.1, 1e12, 1e12)
      >>> e = fit([Observation(a, p, 1e12)])["tpu-v6e"]
      >>> round(Observation(a, p, 1e12).predicted_mfu(e), 3)
      0.5
    """
    used = [o for o in observations if o.anchor.role == FIT]
    if not used:
        raise ValueError("calibration.fit: no observation is marked FIT; nothing to fit on.")
    families = sorted({o.anchor.preset for o in used})

    def residuals(x):
        eff = _unpack(x, families)
        return [o.predicted_mfu(eff[o.anchor.preset]) / o.anchor.mfu - 1.0 for o in used]

    x0 = np.array([0.6] * len(families) + [0.5, 0.5])
    sol = least_squares(residuals, x0, bounds=(LOW, HIGH))
    return _unpack(sol.x, families)


def relative_errors(observations: list[Observation], eff: dict[str, Efficiency]) -> list[float]:
    """Per observation, predicted / published MFU - 1 under `eff` (spec-sheet speeds
    for a preset `eff` does not name)."""
    return [
        o.predicted_mfu(eff.get(o.anchor.preset, Efficiency())) / o.anchor.mfu - 1.0
        for o in observations
    ]
