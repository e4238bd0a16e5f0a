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

import jax
import numpy as np
import optax
import pytest
from util import assert_close, assert_sharded

import autoshard
from autoshard import boundary, distributed
from autoshard.models import mlp
from autoshard.passes.graph import build_graph
from autoshard.passes.trace import trace

WORKER = Path(__file__).with_name("distributed_worker.py")
TIMEOUT_S = 120
STEPS, BATCH = 2, 64  # as in the worker


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
    """Both processes' reports and the job's wall time; the processes are killed if
    the job fails or overruns."""
    port, t0 = _free_port(), time.perf_counter()
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(i), str(port), str(out)],
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [""] * 2
    try:
        deadline = time.monotonic() + TIMEOUT_S
        for i, p in enumerate(procs):
            logs[i], _ = p.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the 2-process job did not finish in {TIMEOUT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"process {i} failed:\n{logs[i][-4000:]}"
    seconds = time.perf_counter() - t0
    return [json.loads((out / f"process{i}.json").read_text()) for i in range(2)], seconds


def _reference():
    s = mlp.setup(mlp.tiny(), batch_size=BATCH, tx=optax.sgd(0.1))
    step, state, losses = jax.jit(s.train_step), s.state, []
    for _ in range(STEPS):
        state, metrics = step(state, s.batch)
        losses.append(metrics["loss"])
    return state, losses


def test_two_processes_agree_and_match_single_device(tmp_path):
    reports, seconds = _run_job(tmp_path)
    print(f"2-process job: {seconds:.1f} s", [round(r["run_s"], 2) for r in reports])
    # one plan everywhere, planned by process 0 alone
    assert reports[0]["plan"] == reports[1]["plan"]
    assert reports[0]["layout"] == reports[1]["layout"]
    assert reports[0]["mesh_ids"] == reports[1]["mesh_ids"]
    assert [r["solve_count"] for r in reports] == [1, 0]
    plan = json.loads(reports[0]["plan"])
    assert plan["mesh"]["shape"] == [2, 4]
    assert reports[0]["split_values"] > 0  # the plan splits tensors across both processes
    assert reports[0]["batch_spec"] == [["x", "y"]], reports[0]["batch_spec"]
    # every process fetched the single-device step's results
    ref = _reference()
    flat_ref, tree = jax.tree.flatten(ref)
    for i in range(2):
        with np.load(tmp_path / f"process{i}.npz") as got:
            out = jax.tree.unflatten(tree, [got[f"leaf{k}"] for k in range(len(flat_ref))])
        assert_close(out, ref, atol=2e-6)
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
    s = mlp.setup(mlp.tiny(), batch_size=BATCH, tx=optax.sgd(0.1))
    step = autoshard.parallelize(s.train_step, mesh=(2, 4))
    plan = step.plan(s.state, s.batch)
    assert_sharded(plan)
    graph = _graph(step, s.state, s.batch)
    again = distributed.decode(distributed.encode(plan), graph)
    assert again.to_json() == plan.to_json()
    assert again.layout == plan.layout
    assert again.mesh == plan.mesh
    assert jax.tree.leaves(again.shardings()) == jax.tree.leaves(plan.shardings())
    # the key names the traced step: the same step traced again has the same digest,
    # another batch size another one
    digest = distributed.graph_digest(graph)
    assert distributed.graph_digest(_graph(step, s.state, s.batch)) == digest
    small = jax.tree.map(lambda x: x[:8], s.batch)
    assert distributed.graph_digest(_graph(step, s.state, small)) != digest
