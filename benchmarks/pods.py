"""Hand plans and autoshard on 64 and 256 abstract devices, scored by the cost model.

Nothing here compiles: the devices do not exist. A hand plan pins the parameters, the
optimizer state and the batch with ``in_shardings=`` (and the state's output layout with
``out_shardings=``) on a ``jax.sharding.AbstractMesh``, and the residual stream at each
layer's input to its batch axis (``jax.lax.with_sharding_constraint``, a pin too);
autoshard's planner completes the rest (activations, collectives) and its cost model
prices the result, with no
memory budget (so a plan that does not fit is still priced, then marked) and without
pipelining or rematerialisation of its own. autoshard's plan is planned as a user
would: ``devices=N`` (its mesh search) and a fixed mesh, default options. A hand plan
that does not fit is scored again with every layer rematerialised (``jax.checkpoint``,
nothing saved), as its user would do next.

The presets are used as they are; calibrated efficiency factors (flops and
interconnect efficiency fitted to published runs) plug in through the ``hardware=``
argument, i.e. ``TARGETS`` below, with no other change.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import jax
from baselines import AUTOSHARD, HandPlan, hand_plans, specs
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from report import Row, progress
from workloads import carry_sharding, fresh

import autoshard


@dataclass(frozen=True)
class Target:
    """A pod: a label, its device count, a hardware preset and the 2-D hand-plan mesh."""

    label: str
    devices: int
    preset: str
    two_d: tuple[int, int]

    @property
    def hardware(self) -> autoshard.Hardware:
        return autoshard.PRESETS[self.preset]


TARGETS = [
    Target("64 x h100", 64, "h100", (8, 8)),
    Target("256 x tpu-v6e", 256, "tpu-v6e", (32, 8)),
]


def targets(quick: bool) -> list[Target]:
    """The pods to score (``quick``: 64 devices only)."""
    return TARGETS[:1] if quick else TARGETS


def _plan_row(base: Row, plan, seconds: float, hw, chosen: str = "") -> Row:
    mem = plan.cost.memory["total"]
    return Row(
        **{
            **base.__dict__,
            "est": plan.cost.time,
            "memory": mem,
            "capacity": hw.memory,
            "predicted": plan.cost.time,
            "predicted_memory": mem,
            "seconds": seconds,
            "chosen": chosen,
            "remat": base.remat or (plan.remat.policy if plan.remat else ""),
        }
    )


def run_hand(w, t: Target, plan: HandPlan, setup, remat: bool, opts) -> Row:
    """Pin one hand plan's inputs on an abstract mesh and let the planner price it."""
    base = Row(w.name, t.label, str(plan.mesh_shape), plan.name, remat="full" if remat else "")
    mesh = jax.sharding.AbstractMesh(plan.mesh_shape, plan.axis_names)
    state_specs, batch_specs = specs(plan, setup.state, setup.batch)
    try:
        step = autoshard.parallelize(
            fresh(setup.train_step),
            mesh=mesh,
            hardware=t.hardware,
            donate_argnums=0,
            in_shardings=(state_specs, batch_specs),
            out_shardings=(state_specs, None),
            memory_budget=1e18,
            pipeline=None,
            remat=None,
            time_limit=opts.time_limit,
            cache=False,
            verbose=False,
        )
        carry = NamedSharding(mesh, P(plan.batch_axis)) if plan.batch_axis else None
        t0 = time.perf_counter()
        with carry_sharding(carry):
            planned = step.plan(setup.state, setup.batch)
    except Exception as e:
        return base.failed(f"{type(e).__name__}: {e}".splitlines()[0][:200])
    return _plan_row(base, planned, time.perf_counter() - t0, t.hardware)


def run_autoshard(w, t: Target, shape, setup, opts, plans: list[str]) -> Row:
    """autoshard's own plan: ``devices=N`` (shape None) or a fixed AbstractMesh."""
    label = "auto" if shape is None else str(shape)
    base = Row(w.name, t.label, label, AUTOSHARD)
    if shape is None:
        where = {"devices": t.devices}
    else:
        where = {"mesh": jax.sharding.AbstractMesh(shape, ("data", "model"))}
    try:
        step = autoshard.parallelize(
            fresh(setup.train_step),
            hardware=t.hardware,
            donate_argnums=0,
            time_limit=opts.time_limit,
            cache=False,
            verbose=False,
            **where,
        )
        t0 = time.perf_counter()
        planned = step.plan(setup.state, setup.batch)
    except Exception as e:
        return base.failed(f"{type(e).__name__}: {e}".splitlines()[0][:200])
    seconds = time.perf_counter() - t0
    plans.append(f"## {w.name}, {t.label}, mesh {label}\n\n{planned.summary()}\n")
    chosen = "x".join(map(str, planned.solver.mesh_shape)) if shape is None else ""
    return _plan_row(base, planned, seconds, t.hardware, f"({chosen})" if chosen else "")


def run_workload(w, t: Target, opts, plans: list[str]) -> list[Row]:
    """Every hand plan and autoshard's plans of one workload on one pod."""
    print(f"{w.name} ({t.label}):", file=sys.stderr, flush=True)
    plain = w.setup(devices=t.devices)
    remat = w.setup(remat=True, devices=t.devices)
    rows = []
    for plan in hand_plans(t.devices, [t.two_d], w.heads, w.kv_heads):
        row = None if w.hand_remat else run_hand(w, t, plan, plain, False, opts)
        if row is not None:
            rows.append(row)
            progress(row)
        if row is None or (row.ok and not row.fits):  # as a user would: remat, if needed
            rows.append(run_hand(w, t, plan, remat, True, opts))
            progress(rows[-1])
    for shape in (None, t.two_d):
        rows.append(run_autoshard(w, t, shape, plain, opts, plans))
        progress(rows[-1])
    return rows
