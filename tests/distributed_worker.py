"""One process of the 2-process job in test_distributed.py (not a test module;
test_distributed.py imports its CASES and make_setup, so importing it changes nothing).

    python tests/distributed_worker.py PROCESS_ID PORT OUT_DIR

Joins a jax.distributed job of 2 processes on 127.0.0.1:PORT with 4 CPU devices and,
for each case in CASES, trains an MLP for STEPS steps with the decorated step,
unchanged: first on inputs as built (the state on this process, the whole batch as
numpy), then on global arrays (the state the step returned, the batch built from this
process's rows with jax.make_array_from_process_local_data in the plan's sharding).
Then it trains the tiny MLP as Flax NNX objects (model and optimizer mutated by the
step), and a scanned residual stack with its layers rematerialised. Writes what it
saw to OUT_DIR/process{PROCESS_ID}.json and the fetched outputs to
OUT_DIR/process{PROCESS_ID}_{case}.npz.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

import jax

STEPS = 2
MESH = (2, 4)  # the first axis spans the two processes
# name: ((d_model, d_hidden, n_blocks), batch, per-axis bandwidth or None for the
# default CPU hardware). "data": the batch split over all 8 devices, each process
# feeding its own rows; "hybrid": with a slower first axis (between processes) the
# plan splits the weights across processes and the batch within each.
CASES = {
    "data": ((32, 64, 2), 64, None),
    "hybrid": ((32, 256, 2), 256, (1e9, 1e11)),
}


def make_setup(case: str):
    """The case's (setup, parallelize kwargs), the same in every process."""
    import optax

    import autoshard
    from autoshard.models import mlp

    dims, batch, bandwidth = CASES[case]
    s = mlp.setup(mlp.MLPConfig(*dims), batch_size=batch, tx=optax.sgd(0.1))
    kwargs = {"mesh": MESH}
    if bandwidth is not None:
        kwargs["hardware"] = autoshard.Hardware(
            flops=5e10,
            bandwidth=bandwidth,
            latency=2e-5,
            memory_bandwidth=2e10,
            reduce_scatter=False,
        )
    return s, kwargs


def local_rows(sharding, x):
    """This process's rows of the global batch x (the batch split on dim 0 only)."""
    spans = {
        (idx[0].start or 0, idx[0].stop or x.shape[0])
        for idx in sharding.addressable_devices_indices_map(x.shape).values()
    }
    return x[min(a for a, _ in spans) : max(b for _, b in spans)]


def train(case: str, pid: int, out: str) -> dict:
    """Train one case; the fetched outputs go to an npz, the rest into the report."""
    import numpy as np
    from jax.experimental import multihost_utils

    import autoshard

    s, kwargs = make_setup(case)
    step = autoshard.parallelize(s.train_step, **kwargs)
    t0 = time.perf_counter()
    batch_shape = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), s.batch)
    plan = step.plan(s.state, batch_shape)
    _, batch_sh = plan.shardings()
    for spec in jax.tree.leaves(plan.in_specs[1], is_leaf=lambda p: isinstance(p, jax.P)):
        assert all(d is None for d in spec[1:]), f"batch split beyond dim 0: {spec}"
    state, metrics = step(s.state, jax.tree.map(np.asarray, s.batch))
    losses = [metrics["loss"]]
    batch = jax.tree.map(
        lambda sh, x: jax.make_array_from_process_local_data(
            sh, local_rows(sh, np.asarray(x)), x.shape
        ),
        batch_sh,
        s.batch,
    )
    assert not batch["x"].is_fully_addressable
    for _ in range(STEPS - 1):
        state, metrics = step(state, batch)
        losses.append(metrics["loss"])
    assert step.trace_count == 1
    fetched = multihost_utils.process_allgather((state, losses), tiled=True)
    leaves = {f"leaf{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(fetched))}
    np.savez(os.path.join(out, f"process{pid}_{case}.npz"), **leaves)
    return {
        "plan": plan.to_json(),
        "layout": repr(plan.layout),
        "mesh_ids": [int(d.id) for d in plan.mesh.devices.flat],
        "solve_count": step.solve_count,
        "split": {
            e.path: [list(d) if isinstance(d, tuple) else d for d in e.spec]
            for e in plan.inputs
            if any(d is not None for d in e.spec)
        },
        "run_s": time.perf_counter() - t0,
    }


def nnx_setup():
    """(step, model, optimizer, batch): the tiny MLP as Flax NNX objects, the same in
    every process, and a step that updates them in place (run as `nnx.jit` would)."""
    import optax
    from flax import nnx

    from autoshard.models import mlp

    model = mlp.MLP(mlp.tiny(), nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    batch = mlp.synthetic_batch(mlp.tiny(), 64, jax.random.key(1))

    def step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(mlp.loss_fn)(model, batch)
        optimizer.update(model, grads)
        return loss

    return step, model, optimizer, batch


def train_nnx(pid: int, out: str) -> dict:
    """The NNX step on objects built in every process; their variables come back as
    global arrays, written into the objects passed in."""
    import numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils

    import autoshard

    step, model, optimizer, batch = nnx_setup()
    sharded = autoshard.parallelize(step, mesh=MESH)
    losses = [sharded(model, optimizer, batch) for _ in range(STEPS)]
    params = nnx.state(model, nnx.Param)
    assert not any(x.is_fully_addressable for x in jax.tree.leaves(params))
    fetched = multihost_utils.process_allgather((params, losses), tiled=True)
    leaves = {f"leaf{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(fetched))}
    np.savez(os.path.join(out, f"process{pid}_nnx.npz"), **leaves)
    plan = sharded.plan(model, optimizer, batch)
    return {"plan": plan.to_json(), "solve_count": sharded.solve_count}


def remat_setup():
    """(setup, parallelize kwargs): a scanned residual stack planned with its layers
    rematerialised, the same in every process."""
    from autoshard.models import residual_stack as rs

    s = rs.setup(rs.StackConfig(32, 64, 4), batch_size=64)
    return s, {"mesh": MESH, "remat": "layers"}


def train_remat(pid: int, out: str) -> dict:
    """The rematerialised stack: every process runs the step process 0 chose, remat
    included (its layout belongs to the rematerialised step's graph)."""
    import numpy as np
    from jax.experimental import multihost_utils

    import autoshard

    s, kwargs = remat_setup()
    step = autoshard.parallelize(s.train_step, **kwargs)
    state, losses = s.state, []
    for _ in range(STEPS):
        state, metrics = step(state, s.batch)
        losses.append(metrics["loss"])
    fetched = multihost_utils.process_allgather((state, losses), tiled=True)
    leaves = {f"leaf{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(fetched))}
    np.savez(os.path.join(out, f"process{pid}_remat.npz"), **leaves)
    plan = step.plan(s.state, s.batch)
    return {"plan": plan.to_json(), "solve_count": step.solve_count}


def errors(pid: int) -> dict:
    """What each process raises when planning fails or process 0 never plans."""
    import autoshard
    from autoshard import distributed

    x = jax.ShapeDtypeStruct((8, 64), "float32")
    w = jax.ShapeDtypeStruct((64, 64), "float32")
    budget_error = timeout_error = None
    # a plan that fails on process 0 fails with the same error on every process
    tight = autoshard.parallelize(lambda w, x: x @ w, mesh=MESH, memory_budget=1.0)
    try:
        tight.plan(w, x)
    except autoshard.MemoryBudgetError as e:
        budget_error = str(e)
    # a step that only process 1 plans: it gives up waiting with a clear error
    if pid == 1:
        os.environ[distributed.TIMEOUT_ENV] = "1"
        try:
            autoshard.parallelize(lambda w, x: x @ w.T, mesh=MESH).plan(w, x)
        except distributed.PlanTimeoutError as e:
            timeout_error = str(e)
    return {"budget_error": budget_error, "timeout_error": timeout_error}


def main(pid: int, port: int, out: str) -> None:
    t0 = time.perf_counter()
    jax.config.update("jax_num_cpu_devices", 4)
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(
        f"127.0.0.1:{port}", num_processes=2, process_id=pid, initialization_timeout=60
    )
    doc = {case: train(case, pid, out) for case in CASES}
    doc["nnx"] = train_nnx(pid, out)
    doc["remat"] = train_remat(pid, out)
    doc.update(errors(pid), total_s=time.perf_counter() - t0)
    with open(os.path.join(out, f"process{pid}.json"), "w") as f:
        json.dump(doc, f)


if __name__ == "__main__":
    try:
        main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
    except BaseException:
        # exit now: a normal exit would wait at jax.distributed's shutdown barrier for
        # the other process, which may itself be waiting for this one
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)
