"""Compare autoshard's plans with hand-written sharding at real model sizes.

Part 1, 8 devices, compiled: every workload (GPT-2 small and medium, a 1.3B GPT, a
Llama-7B shape; layers under scan, built from ShapeDtypeStructs) is compiled, never
run, on 8 emulated CPU devices under each hand plan (data parallel, FSDP, Megatron,
DP x TP and MaxText's rules on 2-D meshes) and under autoshard's plan (its own mesh
choice and fixed meshes). Each program is scored from what XLA compiled (matmul
flops, collectives, per-device memory; see measure.py) on the reference hardware.

Part 2, 64 and 256 abstract devices, modelled: the hand plans pin parameters, optimizer
state and batch (``in_shardings=``), autoshard's planner completes the rest, and the
cost model scores them next to autoshard's own plan (see pods.py).

A plan whose memory exceeds the device's is marked and never counts as the best hand
plan. Writes results.md, ratios.png and plans.txt to --out.

    .venv/bin/python benchmarks/compare.py            # full run
    .venv/bin/python benchmarks/compare.py --quick    # GPT-2 small only, fewer meshes
"""

from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("AUTOSHARD_CACHE", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from baselines import AUTOSHARD, HandPlan, hand_plans, specs  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from measure import measure  # noqa: E402
from report import Row, plot, progress, render  # noqa: E402
from workloads import REAL, TINY, Workload, by_name, carry_sharding, fresh  # noqa: E402

import autoshard  # noqa: E402

HARDWARE = autoshard.PRESETS["h100"]
TWO_D = [(2, 4), (4, 2)]
AUTO_MESHES = [None, (8,), (2, 4)]
QUICK_TWO_D = [(2, 4)]
QUICK_AUTO_MESHES = [None, (2, 4)]
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def local_mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> jax.sharding.Mesh:
    """A Mesh with Auto axes over the first prod(shape) local devices."""
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return jax.sharding.Mesh(devices, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def _error(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0][:200]
    return text.replace("|", "/")


def jit_hand(plan: HandPlan, setup):
    """``jax.jit`` of the step with the plan's layouts in and out, state donated."""
    mesh = local_mesh(plan.mesh_shape, plan.axis_names)
    state_specs, batch_specs = specs(plan, setup.state, setup.batch)

    def named(tree):
        return jax.tree.map(lambda p: NamedSharding(mesh, p), tree)

    return jax.jit(
        fresh(setup.train_step),
        in_shardings=(named(state_specs), named(batch_specs)),
        out_shardings=(named(state_specs), NamedSharding(mesh, P())),
        donate_argnums=0,
    )


def run_hand(w: Workload, plan: HandPlan, setup, remat: bool, hw) -> Row:
    """Compile one hand plan and score it."""
    base = Row(w.name, "8", str(plan.mesh_shape), plan.name, remat="full" if remat else "")
    mesh = local_mesh(plan.mesh_shape, plan.axis_names)
    carry = NamedSharding(mesh, P(plan.batch_axis)) if plan.batch_axis else None
    try:
        with carry_sharding(carry):
            m = measure(jit_hand(plan, setup), (setup.state, setup.batch), hw)
    except Exception as e:  # report it, do not stop the comparison
        return base.failed(_error(e))
    return base.scored(m, hw, seconds=m.compile_time)


def run_autoshard(w: Workload, shape, setup, hw, opts, plans: list[str]) -> Row:
    """Plan with autoshard (``shape`` None: its own mesh choice), compile, score."""
    label = "auto" if shape is None else str(shape)
    base = Row(w.name, "8", label, AUTOSHARD)
    try:
        step = autoshard.parallelize(
            fresh(setup.train_step),
            mesh=shape,
            hardware=hw,
            donate_argnums=0,
            time_limit=opts.time_limit,
            cache=False,
            verbose=False,
        )
        t0 = time.perf_counter()
        plan = step.plan(setup.state, setup.batch)
        plan_time = time.perf_counter() - t0
        m = measure(step, (setup.state, setup.batch), hw)
    except Exception as e:
        return base.failed(_error(e))
    plans.append(f"## {w.name}, 8 devices, mesh {label}\n\n{plan.summary()}\n")
    chosen = str(tuple(plan.mesh.devices.shape)) if shape is None else ""
    return base.scored(
        m,
        hw,
        seconds=plan_time + m.compile_time,
        chosen=chosen,
        predicted=plan.cost.time,
        predicted_memory=plan.cost.memory["total"],
        remat=plan.remat.policy if plan.remat else "",
    )


def run_workload(w: Workload, opts, plans: list[str]) -> list[Row]:
    """Every hand plan and autoshard's plans of one workload on 8 devices."""
    print(f"{w.name} (8 devices):", file=sys.stderr, flush=True)
    plain, remat = w.setup(), w.setup(remat=True)
    two_d = QUICK_TWO_D if opts.quick else TWO_D
    rows = []
    for plan in hand_plans(8, two_d, w.heads, w.kv_heads):
        row = None if w.hand_remat else run_hand(w, plan, plain, False, HARDWARE)
        if row is not None:
            rows.append(row)
            progress(row)
        if row is None or (row.ok and not row.fits):  # as a user would: remat, if needed
            rows.append(run_hand(w, plan, remat, True, HARDWARE))
            progress(rows[-1])
    for shape in QUICK_AUTO_MESHES if opts.quick else AUTO_MESHES:
        rows.append(run_autoshard(w, shape, plain, HARDWARE, opts, plans))
        progress(rows[-1])
    return rows


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (``argv`` None: ``sys.argv[1:]``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="GPT-2 small only, fewer meshes")
    ap.add_argument("--tiny", action="store_true", help="tiny models through the same code")
    ap.add_argument("--workloads", help="comma-separated name fragments, e.g. 'small,llama'")
    ap.add_argument("--no-pods", action="store_true", help="skip the 64/256-device part")
    ap.add_argument("--out", default=DEFAULT_OUT, help="directory for results.md and the plot")
    ap.add_argument("--time-limit", type=float, default=60.0, help="ILP seconds per mesh")
    return ap.parse_args(argv)


def select(opts) -> list[Workload]:
    pool = TINY if opts.tiny else REAL
    if opts.workloads:
        return by_name(opts.workloads, pool)
    return pool[:1] if opts.quick else pool


def main(argv=None) -> int:
    """Run the comparison; write results.md, ratios.png and plans.txt to --out."""
    opts = parse_args(argv)
    t0 = time.perf_counter()
    rows: list[Row] = []
    plans: list[str] = []
    workloads = select(opts)
    for w in workloads:
        rows += run_workload(w, opts, plans)
    if not opts.no_pods:
        import pods

        for target in pods.targets(opts.quick):
            for w in workloads:
                rows += pods.run_workload(w, target, opts, plans)
    elapsed = time.perf_counter() - t0
    text = render(rows, HARDWARE, opts, elapsed)
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(opts.out, "plans.txt"), "w") as f:
        f.write("\n".join(plans))
    plot(rows, os.path.join(opts.out, "ratios.png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
