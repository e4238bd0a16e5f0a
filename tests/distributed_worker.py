"""One process of the 2-process job in test_distributed.py (not a test module).

    python tests/distributed_worker.py PROCESS_ID PORT OUT_DIR

Joins a jax.distributed job of 2 processes on 127.0.0.1:PORT with 4 CPU devices,
trains the tiny MLP for STEPS steps with the decorated step, unchanged, on global
arrays (the state laid out by the plan's shardings, the batch built from this
process's rows with jax.make_array_from_process_local_data), and writes what it saw
to OUT_DIR/process{PROCESS_ID}.json and .npz (the fetched outputs).
"""

from __future__ import annotations

import json
import os
import sys
import time

import jax

jax.config.update("jax_num_cpu_devices", 4)
jax.config.update("jax_default_matmul_precision", "highest")

STEPS = 2
BATCH = 64
MESH = (2, 4)


def local_rows(sharding, x):
    """This process's rows of the global batch x (the batch split on dim 0 only)."""
    spans = {
        (idx[0].start or 0, idx[0].stop or x.shape[0])
        for idx in sharding.addressable_devices_indices_map(x.shape).values()
    }
    return x[min(a for a, _ in spans) : max(b for _, b in spans)]


def main(pid: int, port: int, out: str) -> None:
    t0 = time.perf_counter()
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=2, process_id=pid, initialization_timeout=60
    )
    import numpy as np
    import optax
    from jax.experimental import multihost_utils

    import autoshard
    from autoshard import distributed
    from autoshard.models import mlp

    s = mlp.setup(mlp.tiny(), batch_size=BATCH, tx=optax.sgd(0.1))
    step = autoshard.parallelize(s.train_step, mesh=MESH)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), (s.state, s.batch))
    plan = step.plan(*abstract)
    state_sh, batch_sh = plan.shardings()
    for spec in jax.tree.leaves(plan.in_specs[1], is_leaf=lambda p: isinstance(p, jax.P)):
        assert all(d is None for d in spec[1:]), f"batch split beyond dim 0: {spec}"
    state = jax.device_put(s.state, state_sh)  # every process holds the same initial state
    batch = jax.tree.map(
        lambda sh, x: jax.make_array_from_process_local_data(
            sh, local_rows(sh, np.asarray(x)), x.shape
        ),
        batch_sh,
        s.batch,
    )
    assert not batch["x"].is_fully_addressable
    t_run = time.perf_counter()
    losses = []
    for _ in range(STEPS):
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    fetched = multihost_utils.process_allgather((state, losses), tiled=True)
    leaves = {f"leaf{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(fetched))}
    np.savez(os.path.join(out, f"process{pid}.npz"), **leaves)
    run_s = time.perf_counter() - t_run

    # a plan that fails on process 0 fails with the same error on every process
    tight = autoshard.parallelize(lambda w, x: x @ w, mesh=MESH, memory_budget=1.0)
    try:
        tight.plan(
            jax.ShapeDtypeStruct((64, 64), "float32"), jax.ShapeDtypeStruct((8, 64), "float32")
        )
        budget_error = None
    except autoshard.MemoryBudgetError as e:
        budget_error = str(e)
    # a step that only process 1 plans: it gives up waiting with a clear error
    timeout_error = None
    if pid == 1:
        os.environ[distributed.TIMEOUT_ENV] = "1"
        try:
            small = jax.tree.map(
                lambda a: jax.ShapeDtypeStruct((8, *a.shape[1:]), a.dtype), abstract[1]
            )
            step.plan(abstract[0], small)
        except distributed.PlanTimeoutError as e:
            timeout_error = str(e)
    doc = {
        "plan": plan.to_json(),
        "layout": repr(plan.layout),
        "mesh_ids": [int(d.id) for d in plan.mesh.devices.flat],
        "solve_count": step.solve_count,
        "split_values": sum(1 for spec in plan.layout.value_specs if spec and any(spec)),
        "batch_spec": [list(d) if isinstance(d, tuple) else d for d in plan.in_specs[1]["x"]],
        "budget_error": budget_error,
        "timeout_error": timeout_error,
        "run_s": run_s,
        "total_s": time.perf_counter() - t0,
    }
    with open(os.path.join(out, f"process{pid}.json"), "w") as f:
        json.dump(doc, f)


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
