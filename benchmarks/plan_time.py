"""How long planning takes at real sizes, and where the time goes.

Builds abstract inputs (jax.ShapeDtypeStruct, nothing is allocated) for a GPT-2-small
shape at several depths, a 1.3B GPT shape and a Llama-7B shape, and plans each with
`step.plan(...)` on 8 emulated CPU devices for a fixed 1-D mesh, a fixed 2-D mesh and
`mesh=None` (every candidate mesh). Prints per case the plan time split into trace /
graph / strategies / ILP build / solve, the ILP size and the chosen mesh.

    .venv/bin/python benchmarks/plan_time.py --quick          # GPT-2-small shape, 12 layers
    .venv/bin/python benchmarks/plan_time.py --cases gpt12:none,gpt24:none,gpt48:none
    .venv/bin/python benchmarks/plan_time.py                  # every case

A case is `model:mesh` with model in gpt12, gpt24, gpt48, gpt1.3b, llama7b, llama7b-bf16
(parameters, optimizer state and compute in bfloat16; the fp32 Llama-7B shape fits 80 GB
devices on 8 only with its state donated, `+donate` below) and mesh in
8, 2x4, none (any shape such as 2x2x2 works); `model:mesh+cache` plans once into a fresh
plan cache and reports the second planning (traced again, then loaded from disk);
`model:mesh+donate` donates the state (`donate_argnums=0`, as a training loop does:
the new state reuses its buffers);
`model:mesh@N` plans for N abstract devices (`devices=N`) with the h100 preset's
levels (8 devices per NVLink domain, InfiniBand between), e.g. `gpt12:none@64`.
Each case runs in its own process (so a case that runs past --timeout is reported as
"> N s" and the next one starts clean). Hardware: the h100-nvlink preset.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager

MODELS = ("gpt12", "gpt24", "gpt48", "gpt1.3b", "llama7b", "llama7b-bf16")
MESHES = ("8", "2x4", "none")
QUICK = ("gpt12:8", "gpt12:2x4", "gpt12:none")
PHASES = ("trace", "graph", "strategies", "build", "solve")
# own: the total less trace (autoshard's own time); trace: jax tracing; graph: jaxpr ->
# OpGraph; strategies: operation infos, enumeration
# and follower merging; build: the ILP request; solve: HiGHS (the LP bounds included);
# other: the rest (colours of repeated layers, liveness, layout and accounting).


def _config(name: str):
    from autoshard.models import gpt, llama

    if name.startswith("gpt") and name[3:].isdigit():
        cfg = gpt.GPTConfig(
            vocab=8192, d_model=768, n_heads=12, n_layers=int(name[3:]), seq_len=256, d_ff=3072
        )
        return gpt.GPT, gpt.loss_fn, cfg, 16
    if name == "gpt1.3b":
        cfg = gpt.GPTConfig(
            vocab=50257, d_model=2048, n_heads=16, n_layers=24, seq_len=2048, d_ff=8192
        )
        return gpt.GPT, gpt.loss_fn, cfg, 16
    if name in ("llama7b", "llama7b-bf16"):
        dtype = "bfloat16" if name.endswith("bf16") else "float32"
        cfg = llama.LlamaConfig(
            n_layers=32, d_model=4096, d_ff=11008, vocab=32000, seq_len=2048, dtype=dtype
        )
        return llama.Llama, llama.loss_fn, cfg, 8
    raise SystemExit(f"unknown model {name!r}: one of {', '.join(MODELS)}")


def abstract_setup(name: str):
    """(train_step, abstract state, abstract batch) of a named model shape."""
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from autoshard.models.common import init_state, make_train_step

    model_cls, loss_fn, cfg, batch = _config(name)
    tx = optax.adamw(1e-3)
    abstract_model = nnx.eval_shape(lambda: model_cls(cfg, nnx.Rngs(0)))
    state = jax.eval_shape(lambda: init_state(model_cls(cfg, nnx.Rngs(0)), tx)[1])
    graphdef = nnx.split(abstract_model, nnx.Param, nnx.BatchStat, ...)[0]
    tokens = jax.ShapeDtypeStruct((batch, cfg.seq_len + 1), jnp.int32)
    return make_train_step(graphdef, tx, loss_fn), state, {"tokens": tokens}


class _Timer:
    """Accumulates seconds per phase by wrapping the planner's module functions."""

    def __init__(self):
        self.t = dict.fromkeys(PHASES, 0.0)

    def wrap(self, module, attr: str, phase: str):
        fn = getattr(module, attr)

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t[phase] += time.perf_counter() - t0

        setattr(module, attr, timed)


def _instrument(timer: _Timer) -> None:
    from autoshard import api, search
    from autoshard.cost_model import ilp

    timer.wrap(api, "trace", "trace")
    timer.wrap(api, "build_graph", "graph")
    for attr, phase in _SEARCH_HOOKS:
        if hasattr(search, attr):
            timer.wrap(search, attr, phase)
    timer.wrap(ilp, "milp", "solve")


# Functions of autoshard.search (as imported there) and the phase they belong to.
_SEARCH_HOOKS = (
    ("source_strategies", "strategies"),
    ("enumerate_strategies", "strategies"),
    ("merge_followers", "strategies"),
    ("build_request", "build"),
    # the same work done once per class of repeated layers (passes/classes.py)
    ("op_infos", "strategies"),
    ("skeleton", "strategies"),
    ("on_mesh", "strategies"),
    ("class_problem", "build"),
)


def run_case(case: str) -> dict:
    """Plan one case in this process; returns its numbers."""
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jax

    import autoshard

    model, mesh = case.split(":")
    mesh, _, count = mesh.partition("@")
    hw = autoshard.PRESETS["h100" if count else "h100-nvlink"]
    step_fn, state, batch = abstract_setup(model)
    timer = _Timer()
    _instrument(timer)
    donated = "+donate" in mesh  # the state's buffers are reused for the new state
    mesh = mesh.replace("+donate", "")
    cached = mesh.endswith("+cache")  # plan once into a fresh cache, time the second
    mesh = mesh.removesuffix("+cache")
    shape = None if mesh == "none" else tuple(int(x) for x in mesh.split("x"))
    kwargs = {"cache": False} if "cache" in _parallelize_args() else {}
    if cached:
        kwargs = {"cache_dir": tempfile.mkdtemp(prefix="plan_time_")}
    if count:
        kwargs["devices"] = int(count)
    if donated:
        kwargs["donate_argnums"] = 0
    if cached:
        autoshard.parallelize(step_fn, mesh=shape, hardware=hw, **kwargs).plan(state, batch)
        timer.t = dict.fromkeys(PHASES, 0.0)
    step = autoshard.parallelize(step_fn, mesh=shape, hardware=hw, **kwargs)
    t0 = time.perf_counter()
    try:
        plan = step.plan(state, batch)
    except autoshard.MemoryBudgetError as e:  # an answer too: how long it took to know
        total = time.perf_counter() - t0
        msg = str(e)
        least = msg.split("The least memory found for any plan is ")[-1].split(";")[0]
        if "needs at least" in msg:  # the memory floor: no mesh searched
            least = "needs at least " + msg.split("needs at least ")[1].split(" (")[0]
        return {"case": case, "error": f"{total:.2f} s: no plan fits ({least[:60]})"}
    total = time.perf_counter() - t0
    s = plan.solver
    timer.t["other"] = total - sum(timer.t.values())
    return {
        "case": case,
        "total": total,
        **timer.t,
        "variables": s.variables,
        "constraints": s.constraints,
        "nodes": s.ilp_nodes,
        "graph_nodes": s.graph_nodes,
        "mesh": "x".join(map(str, s.mesh_shape)),
        "objective_ms": plan.cost.time * 1e3,
        "status": s.status,
        "meshes": len(s.candidates),
        "devices": int(count) if count else len(jax.devices()),
    }


def _parallelize_args():
    import inspect

    import autoshard

    return inspect.signature(autoshard.parallelize).parameters


HEADER = (
    f"{'case':<16}{'total s':>9}{'own':>7}{'trace':>7}{'graph':>7}{'strat':>7}{'build':>7}"
    f"{'solve':>7}{'other':>7}"
    f"{'vars':>9}{'cons':>9}{'nodes':>7}  {'mesh':<7}{'obj ms':>9}  status"
)


def fmt(r: dict) -> str:
    if "error" in r:
        return f"{r['case']:<16}{r['error']}"
    ph = "".join(f"{r[p]:>7.1f}" for p in (*PHASES, "other"))
    return (
        f"{r['case']:<16}{r['total']:>9.2f}{r['total'] - r['trace']:>7.2f}{ph}"
        f"{r['variables']:>9}{r['constraints']:>9}"
        f"{r['nodes']:>7}  {r['mesh']:<7}{r['objective_ms']:>9.3f}  {r['status']}"
    )


@contextmanager
def _quiet_env():
    env = dict(os.environ)
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    yield env


def _depth_ratios(rows) -> None:
    """Plan time of 24 and 48 layers over 12 layers, per mesh mode (same run): the
    total, and autoshard's own time (total less jax's trace of the step, which plain
    `jax.jit` of the step pays too and which grows with depth whatever the planner does)."""
    done = {r["case"]: r for r in rows if "error" not in r}
    for mesh in MESHES:
        base = done.get(f"gpt12:{mesh}")
        for depth in (24, 48):
            r = done.get(f"gpt{depth}:{mesh}")
            if base and r:
                total = r["total"] / base["total"]
                own = (r["total"] - r["trace"]) / (base["total"] - base["trace"])
                print(
                    f"gpt{depth}:{mesh} / gpt12:{mesh} plan time: {total:.2f}x total, "
                    f"{own:.2f}x own (less trace)"
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--cases", help="comma-separated model:mesh cases (see above)")
    ap.add_argument("--timeout", type=float, default=180.0, help="seconds per case")
    ap.add_argument("--json", help="also write the rows to this JSON file")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # run one case in this process
    opts = ap.parse_args()
    if opts.one:
        print(json.dumps(run_case(opts.one)))
        return
    if opts.cases:
        cases = opts.cases.split(",")
    elif opts.quick:
        cases = list(QUICK)
    else:
        cases = [f"{m}:{k}" for m in MODELS for k in MESHES]
    print(HEADER, flush=True)
    rows = []
    for case in cases:
        with _quiet_env() as env:
            try:
                out = subprocess.run(
                    [sys.executable, os.path.abspath(__file__), "--one", case],
                    capture_output=True,
                    text=True,
                    timeout=opts.timeout,
                    env=env,
                )
                lines = out.stdout.strip().splitlines()
                if out.returncode or not lines:
                    err = (out.stderr.strip().splitlines() or ["?"])[-1][:100]
                    row = {"case": case, "error": f"failed: {err}"}
                else:
                    row = json.loads(lines[-1])
            except subprocess.TimeoutExpired:
                row = {"case": case, "error": f"> {opts.timeout:.0f} s (stopped)"}
        rows.append(row)
        print(fmt(row), flush=True)
    _depth_ratios(rows)
    if opts.json:
        with open(opts.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
