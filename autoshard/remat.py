"""Rematerialisation of layer stacks as a planning choice (see docs/pods.md).

When the memory budget binds, the planner may plan the step again with its layer
stacks rematerialised (`passes/remat.py`: the forward scan saves less, the
backward scan recomputes the rest) and keep the cheapest plan that fits. The
choice is recorded as `plan.remat`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from autoshard.passes import remat as _rewrite
from autoshard.passes.graph import OpGraph
from autoshard.passes.liveness import live_bytes, structure  # cached: Liveness reuses it
from autoshard.passes.trace import Traced

AUTO, LAYERS = "auto", "layers"
NOTHING, DOTS = _rewrite.NOTHING, _rewrite.DOTS
# What the remat= argument of parallelize takes besides None.
OPTIONS = (AUTO, LAYERS, NOTHING, DOTS)


@dataclass(frozen=True)
class RematChoice:
    """The rematerialisation a plan runs with.

    Attributes:
      policy: "nothing_saveable" (each layer saves its carry in; the backward pass
        reruns the layer) or "dots_saveable" (it also saves its matmul results).
      layers: per rematerialised layer stack, its number of layers.
      saved_before, saved_after: bytes the stacks save for the backward pass
        without and with remat (whole arrays, before sharding).
      time_without: predicted step seconds of the best plan without remat that
        fits the budget, or None when none fits.
    """

    policy: str
    layers: tuple[int, ...]
    saved_before: int
    saved_after: int
    time_without: float | None = None


def policies(option) -> tuple[str, ...]:
    """The policies to plan for a remat= option, cheapest recompute first.

    Example:
      >>> policies("auto")
      ('dots_saveable', 'nothing_saveable')
    """
    if option is None:
        return ()
    if option == AUTO:
        return _rewrite.POLICIES
    if option == LAYERS:
        return (NOTHING,)
    if option in (NOTHING, DOTS):
        return (option,)
    raise ValueError(
        f"autoshard: remat={option!r}: use 'auto' (when the memory budget binds), None "
        f"(never), 'layers' (always, saving each layer's input), {NOTHING!r} or {DOTS!r}."
    )


def variant(traced: Traced, policy: str) -> tuple[Traced, RematChoice] | None:
    """The traced step with its layer stacks rematerialised under policy, or None
    when it has no layer stack whose saved residuals the policy shrinks.

    Args:
      traced: the step as traced (after AD).
      policy: NOTHING or DOTS.

    Returns:
      (Traced with the rewritten jaxpr, RematChoice without time_without), or None.

    Example:
      >>> v = variant(trace(step, (state, batch)), NOTHING)      # doctest: +SKIP
    """
    out = _rewrite.rematerialize(traced.jaxpr, policy)
    if out is None:
        return None
    closed, info = out
    choice = RematChoice(info.policy, info.layers, info.saved_before, info.saved_after)
    return dataclasses.replace(traced, jaxpr=closed), choice


def memory_floor(graph: OpGraph, donated: frozenset[int], devices: int) -> float:
    """A lower bound on the per-device memory of every plan of graph on any mesh of
    `devices` devices: the memory model's peak (arguments plus live intermediates,
    in the step's order) with every value split `devices` ways, as far as any plan
    splits it. No mesh needs to be built: when it exceeds the budget, the step's form
    (as traced, or under a remat policy that saves more) cannot fit, whatever plan.

    Args:
      graph: the step's operation graph (`passes.graph.build_graph`).
      donated: flat indices of donated step arguments.
      devices: the device count of the largest candidate mesh.

    Returns:
      Bytes per device.

    Example:
      >>> memory_floor(build_graph(traced), frozenset({0}), 256)   # doctest: +SKIP
    """
    _, order, (first, last) = structure(graph, donated)
    nbytes = np.array([float(v.nbytes) for v in graph.values])
    args = float(nbytes[list(graph.inputs)].sum())
    peak = float(live_bytes(first, last, nbytes, len(order)).max(initial=0.0))
    return (args + peak) / devices


def floor_message(ctx, devices: int) -> str:
    """MemoryBudgetError's message when a step's `memory_floor` is above the budget
    (ctx: the step's planning context, with its graph, donated leaves and budget):
    no mesh needs to be searched."""
    floor = memory_floor(ctx.graph, ctx.donated, devices)
    fixes = [] if ctx.donated else ["donate the training state (donate_argnums=0)"]
    fixes += [
        "put the layers under lax.scan or nnx.scan so that remat can shrink what they "
        "save for the backward pass",
        "raise memory_budget (or Hardware(memory=...))",
        "use more devices",
        "shrink the model or batch",
    ]
    fix = ", ".join(fixes[:-1]) + ", or " + fixes[-1]
    return (
        f"autoshard: no plan fits memory_budget={_size(ctx.budget)} per device on "
        f"{devices} devices: the step needs at least {_size(floor)} per device on any "
        f"mesh (its arguments and what is alive at its peak, all split {devices} ways). "
        f"{fix[0].upper()}{fix[1:]}."
    )

def text(r: RematChoice) -> str:
    """One summary line for a plan's remat choice."""
    n = len(r.layers)
    without = (
        "no plan without it fits"
        if r.time_without is None
        else f"best plan without it {r.time_without * 1e3:.3f} ms"
    )
    return (
        f"remat: {r.policy} on {n} layer stack{'s' * (n > 1)} "
        f"({', '.join(map(str, r.layers))} layers); residuals saved for the backward pass "
        f"{_size(r.saved_before)} -> {_size(r.saved_after)} (unsharded); {without}"
    )


def _size(nbytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"
