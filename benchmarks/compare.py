"""Compare autoshard's plans with hand-written sharding baselines.

For each workload and mesh, every baseline (data parallel, FSDP, Megatron, 2-D data x
tensor, shard-the-batch-and-propagate) and autoshard are compiled on 8 emulated CPU
devices; collectives, flops and memory are read from the compiled programs and priced
on one reference hardware (see measure.py). Writes results.md, estimated_step_time.png
and plans.txt (autoshard's plan summaries) to --out and prints the table.

    .venv/bin/python benchmarks/compare.py            # full run, a few minutes
    .venv/bin/python benchmarks/compare.py --quick --out /tmp/bench   # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

# 8 emulated CPU devices unless the user asked for something else; before jax starts.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from baselines import AUTOSHARD, Baseline, baselines, jit_baseline  # noqa: E402
from measure import measure  # noqa: E402
from report import AUTO_MESH, Row, plot, render  # noqa: E402

import autoshard  # noqa: E402
from autoshard.models import gpt, mlp  # noqa: E402
from autoshard.models.common import Setup  # noqa: E402

HARDWARE = autoshard.PRESETS["h100-nvlink"].with_(reduce_scatter=False)
MESHES = [(8,), (2, 4), (4, 2), (2, 2, 2)]
QUICK_MESHES = [(8,), (2, 4)]
AXIS_NAMES = ("x", "y", "z")
LOSS_TOL = 1e-5
DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass(frozen=True)
class Workload:
    """A named train step: ``make()`` builds its Setup; ``heads`` for Megatron attention."""

    name: str
    make: Callable[[], Setup]
    heads: int | None = None


GPT_MEDIUM = gpt.GPTConfig(vocab=512, d_model=128, n_heads=4, n_layers=2, seq_len=64, d_ff=512)
WORKLOADS = [
    Workload("MLP data-parallel regime", lambda: mlp.setup(mlp.MLPConfig(32, 64, 2), 4096)),
    Workload("MLP tensor-parallel regime", lambda: mlp.setup(mlp.MLPConfig(64, 2048, 2), 8)),
    Workload("GPT small", lambda: gpt.setup(gpt.tiny(), 8), heads=gpt.tiny().n_heads),
    Workload("GPT medium", lambda: gpt.setup(GPT_MEDIUM, 16), heads=GPT_MEDIUM.n_heads),
]
QUICK_WORKLOADS = [WORKLOADS[0]]


def make_mesh(shape: tuple[int, ...]) -> jax.sharding.Mesh:
    """A Mesh with Auto axes x, y, z over the first prod(shape) devices."""
    devices = np.array(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    names = AXIS_NAMES[: len(shape)]
    return jax.sharding.Mesh(devices, names, axis_types=(jax.sharding.AxisType.Auto,) * len(shape))


def loss_check(loss: float, ref: float) -> str:
    """``ok`` when the first-step loss matches the single-device one."""
    if abs(loss - ref) <= LOSS_TOL:
        return "ok"
    return f"MISMATCH: loss {loss:.7f} vs single device {ref:.7f}"


def _error(e: Exception) -> str:
    text = f"{type(e).__name__}: {e}".splitlines()[0][:160]
    return "ERROR: " + text.replace("|", "/")


def run_baseline(w: Workload, s: Setup, shape, b: Baseline, ref: float, opts) -> Row:
    """Compile, measure and check one hand-written baseline."""
    try:
        jitted = jit_baseline(b, s.train_step, make_mesh(shape), s.state, s.batch)
        m = measure(jitted, (s.state, s.batch), HARDWARE, opts.runs)
    except Exception as e:  # report, do not crash the whole comparison
        return Row(w.name, str(shape), b.name, None, _error(e))
    return Row(w.name, str(shape), b.name, m, loss_check(m.loss, ref))


def run_autoshard(w: Workload, s: Setup, shape, ref: float, opts, plans: list[str]) -> Row:
    """Plan (trace + ILP) with autoshard on ``shape`` (None: its own choice), then measure."""
    label = AUTO_MESH if shape is None else str(shape)
    try:
        step = autoshard.parallelize(
            s.train_step, mesh=shape, hardware=HARDWARE, time_limit=opts.time_limit
        )
        plan = step.plan(s.state, s.batch)
        m = measure(step, (s.state, s.batch), HARDWARE, opts.runs)
    except Exception as e:
        return Row(w.name, label, AUTOSHARD, None, _error(e))
    plans.append(f"## {w.name}, mesh {label}\n\n{plan.summary()}\n")
    chosen = str(tuple(plan.mesh.devices.shape))
    return Row(w.name, label, AUTOSHARD, m, loss_check(m.loss, ref), plan.solver.plan_time, chosen)


def _progress(r: Row) -> None:
    est = f"est {r.m.est_time * 1e6:8.2f} us" if r.m else "failed"
    print(f"  {r.mesh:<10} {r.method:<24} {est}  {r.check}", file=sys.stderr, flush=True)


def run_workload(w: Workload, meshes, opts, plans: list[str]) -> list[Row]:
    """Every baseline and autoshard on every mesh (and autoshard's own mesh choice)."""
    print(f"{w.name}:", file=sys.stderr, flush=True)
    s = w.make()
    ref = float(jax.jit(s.train_step)(s.state, s.batch)[1]["loss"])
    rows = []
    for shape in meshes:
        for b in baselines(make_mesh(shape), w.heads, quick=opts.quick):
            rows.append(run_baseline(w, s, shape, b, ref, opts))
            _progress(rows[-1])
        rows.append(run_autoshard(w, s, shape, ref, opts, plans))
        _progress(rows[-1])
    if not opts.quick:
        rows.append(run_autoshard(w, s, None, ref, opts, plans))
        _progress(rows[-1])
    return rows


def notes_for(rows: list[Row], opts, elapsed: float) -> list[str]:
    """Caveats printed under the table: what was left out, what failed, how long it took."""
    notes = [
        "Data parallel, FSDP, Megatron and shard-batch use all devices of the mesh as one "
        "axis, so on every mesh they run over the same 8 devices; data x tensor puts the "
        "batch on the first axis and Megatron on the second (2-D meshes only).",
        "Megatron splits attention projections by whole heads only (heads % tensor-parallel "
        "size == 0); otherwise q/k/v/o stay replicated and only the MLP is split.",
        "shard batch, propagate: in_shardings=(None, batch shardings), no out_shardings; "
        "with uncommitted inputs jax 0.10 lets the compiler pick the state layout.",
        f"autoshard plans with hardware={HARDWARE.name} (reduce_scatter=False), "
        f"time_limit={opts.time_limit:g} s per mesh; plan = trace + all ILP solves.",
    ]
    bad = [r for r in rows if r.check != "ok"]
    for r in bad:
        notes.append(f"{r.workload}, {r.mesh}, {r.method}: {r.check}")
    if not bad:
        notes.append("Every run's first-step loss matched the single-device step.")
    notes.append(
        f"Run: {elapsed:.0f} s on {os.cpu_count()} CPU cores, jax {jax.__version__}, "
        f"{jax.device_count()} emulated CPU devices, {opts.runs} timed steps per run."
    )
    return notes


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line options (``argv`` None: ``sys.argv[1:]``)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: one MLP, 2 meshes")
    ap.add_argument("--out", default=DEFAULT_OUT, help="directory for results.md and the plot")
    ap.add_argument("--time-limit", type=float, default=30.0, help="ILP seconds per mesh")
    ap.add_argument("--runs", type=int, default=None, help="timed steps per run (CPU)")
    opts = ap.parse_args(argv)
    if opts.runs is None:
        opts.runs = 2 if opts.quick else 5
    return opts


def main(argv=None) -> int:
    """Run the comparison; write results.md, estimated_step_time.png, plans.txt to --out."""
    opts = parse_args(argv)
    t0 = time.perf_counter()
    workloads = QUICK_WORKLOADS if opts.quick else WORKLOADS
    meshes = QUICK_MESHES if opts.quick else MESHES
    rows: list[Row] = []
    plans: list[str] = []
    for w in workloads:
        rows += run_workload(w, meshes, opts, plans)
    labels = [str(m) for m in meshes] + ([] if opts.quick else [AUTO_MESH])
    notes = notes_for(rows, opts, time.perf_counter() - t0)
    text = render(rows, labels, HARDWARE, notes)
    os.makedirs(opts.out, exist_ok=True)
    with open(os.path.join(opts.out, "results.md"), "w") as f:
        f.write(text)
    with open(os.path.join(opts.out, "plans.txt"), "w") as f:
        f.write("\n".join(plans))
    plot(rows, os.path.join(opts.out, "estimated_step_time.png"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
