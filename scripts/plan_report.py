"""Plans for the reference workloads: mesh, what is split how, predicted vs compiled
collectives, ILP size and solve time, and the difference from the single-device step.

    .venv/bin/python scripts/plan_report.py
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import autoshard  # noqa: E402
from autoshard.models import gpt, mlp  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

CPU = autoshard.PRESETS["cpu"]
FAST_Y = CPU.with_(bandwidth=(5e8, 5e9), name="cpu, axis y 10x faster")
CASES = [
    ("MLP data-parallel regime", mlp, mlp.MLPConfig(32, 64, 2), 4096, (8,), CPU),
    ("MLP tensor-parallel regime", mlp, mlp.MLPConfig(64, 2048, 2), 8, (8,), CPU),
    ("MLP, slow x / fast y", mlp, mlp.MLPConfig(32, 512, 2), 2048, (2, 4), FAST_Y),
    ("GPT tiny", gpt, gpt.tiny(), 8, (8,), CPU),
    ("GPT tiny", gpt, gpt.tiny(), 8, (2, 4), CPU),
]


def max_diff(a, b) -> float:
    return max(
        float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


def kernels(plan) -> str:
    """Distinct specs of the weight matrices (params only), compactly."""
    seen: dict[str, list[str]] = {}
    for e in plan.inputs:
        if e.path.startswith("state.params") and len(e.shape) == 2:
            name = e.path.split("['")[-2].rstrip("']") if "kernel" in e.path else e.path
            seen.setdefault(str(tuple(e.spec)), []).append(name.split("[")[-1])
    return "; ".join(f"{k}: {sorted(set(v))}" for k, v in seen.items())


def main() -> None:
    for title, model, cfg, batch, mesh, hw in CASES:
        for tx_name, tx in (("adamw", None), ("sgd", optax.sgd(0.1))):
            s = model.setup(cfg, batch_size=batch, tx=tx)
            step = autoshard.parallelize(s.train_step, mesh=mesh, hardware=hw)
            out = step(s.state, s.batch)
            ref = jax.jit(s.train_step)(s.state, s.batch)
            diff = max_diff(out, ref)
            if tx_name == "sgd":
                print(f"  numerics with sgd: max |sharded - single| = {diff:.2e}")
                continue
            plan = step.plan(s.state, s.batch)
            compiled = autoshard.collectives(step.lower(s.state, s.batch).compile())
            sv = plan.solver
            print(f"\n{title}, batch {batch}, mesh {mesh}, hardware '{hw.name}'")
            print(f"  weights: {kernels(plan)}")
            print(f"  batch: {[tuple(e.spec) for e in plan.inputs if e.path.startswith('batch')]}")
            print(
                f"  predicted: { {k: (n, int(b)) for k, (n, b) in plan.cost.collectives.items()} }"
            )
            print(f"  compiled:  {compiled}")
            print(
                f"  ILP: {sv.ilp_nodes} nodes from {sv.graph_nodes} ops, {sv.variables} vars, "
                f"solve {sv.solve_time:.2f} s, plan {sv.plan_time:.2f} s ({sv.status})"
            )
            print(f"  numerics with adamw: max |sharded - single| = {diff:.2e}")


if __name__ == "__main__":
    main()
