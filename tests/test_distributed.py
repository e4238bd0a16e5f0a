"""Two processes under jax.distributed on 127.0.0.1 (4 CPU devices each) run the
decorated step unchanged on global arrays, agree on one plan, and compute what the
single-device step computes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import distributed_worker
import jax
import numpy as np
import optax
from flax import nnx
from util import assert_close, assert_sharded

import autoshard
from autoshard import boundary, distributed
from autoshard.models import mlp
from autoshard.passes.graph import build_graph
from autoshard.passes.trace import trace

WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in flags if "device_count" not in f)
    return env


def _run_job(out: Path) -> tuple[list[dict], float]:
    """Both processes' reports and the job's wall time. If a process fails, the other
    is killed at once (it would wait for it); both are killed if the job overruns."""
    port, t0 = _free_port(), time.perf_counter()
    logs = [out / f"log{i}.txt" for i in range(2)]
    procs = []
    try:
        for i in range(2):
            with open(logs[i], "w") as log:
                cmd = [sys.executable, str(WORKER), str(i), str(port), str(out)]
                procs.append(subprocess.Popen(cmd, env=_env(), stdout=log, stderr=log))
        deadline = time.monotonic() + TIMEOUT_S
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], f"exit codes {codes} (negative: killed, after the other failed " + (
        f"or past {TIMEOUT_S} s)\n" + "\n".join(log.read_text()[-3000:] for log in logs)
    )
    seconds = time.perf_counter() - t0
    return [json.loads((out / f"process{i}.json").read_text()) for i in range(2)], seconds


def _reference(case: str):
    """The single-device step's state and losses after STEPS steps."""
    s, _ = distributed_worker.make_setup(case)
    step, state, losses = jax.jit(s.train_step), s.state, []
    for _ in range(distributed_worker.STEPS):
        state, metrics = step(state, s.batch)
        losses.append(metrics["loss"])
    return state, losses


def _nnx_reference():
    """The NNX step under nnx.jit: parameters and losses after STEPS steps."""
    step, model, optimizer, batch = distributed_worker.nnx_setup()
    losses = [nnx.jit(step)(model, optimizer, batch) for _ in range(distributed_worker.STEPS)]
    return nnx.state(model, nnx.Param), losses


def _assert_fetched(pattern: Path, ref) -> None:
    """What each process fetched (pattern.format(process)) equals the reference."""
    flat_ref, tree = jax.tree.flatten(ref)
    for i in range(2):
        with np.load(str(pattern).format(i)) as npz:
            out = jax.tree.unflatten(tree, [npz[f"leaf{k}"] for k in range(len(flat_ref))])
        assert_close(out, ref, atol=2e-6)


def test_two_processes_agree_and_match_single_device(tmp_path):
    reports, seconds = _run_job(tmp_path)
    print(f"2-process job: {seconds:.1f} s")
    for case in distributed_worker.CASES:
        got = [r[case] for r in reports]
        # one plan everywhere, planned by process 0 alone
        for key in ("plan", "layout", "mesh_ids", "split"):
            assert got[0][key] == got[1][key], (case, key)
        assert [r["solve_count"] for r in got] == [1, 0]
        assert json.loads(got[0]["plan"])["mesh"]["shape"] == [2, 4]
        # every process fetched the single-device step's results
        _assert_fetched(tmp_path / f"process{{}}_{case}.npz", _reference(case))
    # Flax NNX objects passed to the step: updated in place with global arrays
    nnx_plans = [r["nnx"]["plan"] for r in reports]
    assert nnx_plans[0] == nnx_plans[1]
    assert [r["nnx"]["solve_count"] for r in reports] == [1, 0]
    inputs = json.loads(nnx_plans[0])["inputs"]
    assert any(any(d is not None for d in e["spec"]) for e in inputs), inputs
    _assert_fetched(tmp_path / "process{}_nnx.npz", _nnx_reference())
    # a rematerialised step: the choice travels with the plan and every process runs it
    remat_plans = [json.loads(r["remat"]["plan"]) for r in reports]
    assert remat_plans[0] == remat_plans[1]
    assert remat_plans[0]["remat"]["policy"] == "nothing_saveable"
    assert [r["remat"]["solve_count"] for r in reports] == [1, 0]
    s, _ = distributed_worker.remat_setup()
    state, losses = s.state, []
    for _ in range(distributed_worker.STEPS):
        state, metrics = jax.jit(s.train_step)(state, s.batch)
        losses.append(metrics["loss"])
    _assert_fetched(tmp_path / "process{}_remat.npz", (state, losses))
    # the plans split: the batch over both processes; the weights across them
    data, hybrid = reports[0]["data"]["split"], reports[0]["hybrid"]["split"]
    assert data["batch['x']"] == [["x", "y"]], data
    assert hybrid["batch['x']"] == ["y"], hybrid
    kernels = [spec for path, spec in hybrid.items() if "kernel" in path]
    assert len(kernels) == 4 and all("x" in spec for spec in kernels), hybrid
    # errors reach every process instead of a hang
    own = reports[0]["budget_error"]
    assert own.startswith("autoshard: no plan fits memory_budget"), own
    assert reports[1]["budget_error"] == "autoshard: planning failed on process 0: " + own
    assert "waited 1 s for process 0" in reports[1]["timeout_error"]


def _graph(step, *args):
    call = boundary.split_call(step.fn, step.conventions, args, {})
    return build_graph(trace(call.pure, call.dyn, call.names))


def test_published_plan_decodes_to_the_same_plan():
    """What process 0 publishes rebuilds the plan exactly: specs, layout, mesh, costs."""
    s = mlp.setup(mlp.tiny(), batch_size=64, tx=optax.sgd(0.1))
    step = autoshard.parallelize(s.train_step, mesh=(2, 4))
    plan = step.plan(s.state, s.batch)
    assert_sharded(plan)
    graph = _graph(step, s.state, s.batch)
    again = distributed.decode(distributed.encode(plan), graph)
    assert again.to_json() == plan.to_json()
    assert again.layout == plan.layout
    assert again.mesh == plan.mesh
    assert again.summary(rich=False) == plan.summary(rich=False)
    assert jax.tree.leaves(again.shardings()) == jax.tree.leaves(plan.shardings())
    # the key names the traced step: the same step traced again has the same digest,
    # another batch size another one
    digest = distributed.graph_digest(graph)
    assert distributed.graph_digest(_graph(step, s.state, s.batch)) == digest
    small = jax.tree.map(lambda x: x[:8], s.batch)
    assert distributed.graph_digest(_graph(step, s.state, small)) != digest
