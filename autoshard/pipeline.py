"""Pipeline parallelism: layer-stack loops run as stages over one mesh axis.

The step's forward and backward scans over stacked layers (found by
`passes.stages`) run as `shard_map`s over the pipeline axis: each stage holds
L/p layers (the stacked weights, their optimizer state and the residuals are
split on their layer dimension), microbatches stream through the stages, and
stage boundaries move to the next stage with `ppermute`. GPipe order: every
microbatch's forward, then (in the backward scan) every microbatch's backward.
The 1F1B schedule fuses both loops and the loss head into one (`pipeline_1f1b`).
The remaining mesh axes keep the intra-operator plan the ILP finds for them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from autoshard.cost_model import pipeline as cm
from autoshard.cost_model.hardware import Hardware
from autoshard.cost_model.resharding import per_device_bytes
from autoshard.passes import jax_core
from autoshard.passes.annotate import Layout, interpreter
from autoshard.passes.graph import Lit, OpGraph, build_graph
from autoshard.passes.stages import BATCH, SUM, StackLoop, stack_loops, stacked_values
from autoshard.passes.trace import trace

AUTO = "auto"


@dataclass(frozen=True)
class Pipeline:
    """Force pipeline parallelism in `parallelize(..., pipeline=Pipeline(...))`.

    Args:
      stages: p, pipeline stages; the mesh needs an axis of this size (or `axis`).
      microbatches: m; the batch (leading dimension of the step's last argument)
        must divide by it.
      schedule: "gpipe" (all forward microbatches, then all backward) or "1f1b"
        (each stage alternates forwards and backwards: at most p microbatches'
        residuals live; needs a loss head that treats batch rows independently).
      axis: name of the mesh axis for the stages (default: the first of size p).

    Example:
      >>> import autoshard
      >>> autoshard.Pipeline(stages=4, microbatches=8).schedule
      'gpipe'
    """

    stages: int
    microbatches: int
    schedule: str = cm.GPIPE
    axis: str | None = None

    def __post_init__(self):
        if self.schedule not in cm.SCHEDULES:
            raise ValueError(
                f"autoshard: Pipeline(schedule={self.schedule!r}): use one of {cm.SCHEDULES}."
            )
        if self.stages < 1 or self.microbatches < 1:
            raise ValueError(
                f"autoshard: Pipeline(stages={self.stages}, microbatches={self.microbatches}): "
                "both must be positive."
            )


class PipelineError(ValueError):
    """A forced pipeline that cannot be run on this step and mesh."""


def batch_size(args) -> int:
    """Leading dimension of the step's last argument (the batch)."""
    leaves = [x for x in jax.tree_util.tree_leaves(args[-1]) if getattr(x, "ndim", 0) > 0]
    sizes = {int(x.shape[0]) for x in leaves}
    if len(sizes) != 1:
        raise PipelineError(
            "autoshard: pipelining splits the step's last argument (the batch) into "
            f"microbatches on its leading dimension, but its arrays have leading sizes "
            f"{sorted(sizes)}: give every batch array the same leading (batch) dimension."
        )
    return sizes.pop()


def micro_args(args, microbatches: int):
    """args with every array of the last argument cut to batch / microbatches rows."""
    b = batch_size(args)
    if b % microbatches:
        raise PipelineError(
            f"autoshard: batch {b} does not divide into {microbatches} microbatches: choose "
            f"microbatches among the divisors of {b}, or change the batch."
        )

    def cut(x):
        if getattr(x, "ndim", 0) == 0:
            return x
        return jax.ShapeDtypeStruct((b // microbatches, *x.shape[1:]), x.dtype)

    return (*args[:-1], jax.tree_util.tree_map(cut, args[-1]))


# --------------------------------------------------------------------------- execution


def _split(x, dim, m):
    """[.., B, ..] -> [.., m, B/m, ..] at dim."""
    if dim is None:
        return x
    s = x.shape
    return x.reshape(*s[:dim], m, s[dim] // m, *s[dim + 1 :])


def _merge(x, dim):
    if dim is None:
        return x
    s = x.shape
    return x.reshape(*s[:dim], s[dim] * s[dim + 1], *s[dim + 2 :])


def _take(x, dim, i):
    return x if dim is None else jax.lax.dynamic_index_in_dim(x, i, dim, keepdims=False)


def _put(acc, dim, i, y, ok):
    old = jax.lax.dynamic_index_in_dim(acc, i, dim, keepdims=False)
    return jax.lax.dynamic_update_index_in_dim(acc, jnp.where(ok, y, old), i, dim)


def _body_fn(loop_params, nc, nk):
    body = loop_params["jaxpr"]

    def step(consts, carry, xs):
        outs = jax_core.eval_jaxpr(body, *consts, *carry, *xs)
        return list(outs[:nk]), list(outs[nk:])

    return step


def _stage_program(info: StackLoop, params, axis: str, p: int, m: int):
    """The per-device program of one pipelined loop (GPipe order over m + p - 1 ticks)."""
    nc, nk = params["num_consts"], params["num_carry"]
    body = _body_fn(params, nc, nk)
    cdims, kdims = info.in_dims[:nc], info.in_dims[nc : nc + nk]
    xdims, ydims = info.in_dims[nc + nk :], info.out_dims[nk:]
    kinds = info.out_kinds[nk:]
    rev = info.reverse
    perm = [(s, s - 1) for s in range(1, p)] if rev else [(s, s + 1) for s in range(p - 1)]

    avals = [v.aval for v in params["jaxpr"].jaxpr.outvars]
    ys0 = [
        ((info.length // p, *a.shape), a.dtype, d) for a, d in zip(avals[nk:], ydims, strict=True)
    ]
    outs0 = [(a.shape, a.dtype, d) for a, d in zip(avals[:nk], info.out_dims[:nk], strict=True)]

    def zeros(shape, dtype, dim):
        """A buffer for every microbatch: shape (one microbatch's) with m at dim."""
        return jnp.zeros(shape if dim is None else (*shape[:dim], m, *shape[dim:]), dtype)

    def program(consts, carries, xs):
        s = jax.lax.axis_index(axis)
        pos = p - 1 - s if rev else s  # place in the data flow

        def tick(state, t):
            buf, ys, outs = state
            i = t - pos
            ok = (i >= 0) & (i < m)
            ic = jnp.clip(i, 0, m - 1)
            first = [_take(c, d, ic) for c, d in zip(carries, kdims, strict=True)]
            cin = [jnp.where(pos == 0, a, b) for a, b in zip(first, buf, strict=True)]
            cs = [_take(c, d, ic) for c, d in zip(consts, cdims, strict=True)]
            xl = [_take(x, d, ic) for x, d in zip(xs, xdims, strict=True)]
            cout, yl = jax.lax.scan(lambda c, x: body(cs, c, x), cin, xl, reverse=rev)
            ys = [
                _collect(a, y, d, k, ic, ok)
                for a, y, d, k in zip(ys, yl, ydims, kinds, strict=True)
            ]
            last = ok & (pos == p - 1)
            outs = [_put(o, d, ic, c, last) for o, c, d in zip(outs, cout, kdims, strict=True)]
            buf = [jax.lax.ppermute(c, axis, perm) for c in cout]
            return (buf, ys, outs), None

        buf0 = [jnp.zeros_like(_take(c, d, 0)) for c, d in zip(carries, kdims, strict=True)]
        init = (buf0, [zeros(*z) for z in ys0], [zeros(*z) for z in outs0])
        (_, ys, outs), _ = jax.lax.scan(tick, init, jnp.arange(m + p - 1))
        return [jax.lax.psum(o, axis) for o in outs], ys

    return program


def _collect(acc, y, dim, kind, i, ok):
    if kind == BATCH:
        return _put(acc, dim, i, y, ok)
    if kind == SUM:
        return acc + jnp.where(ok, y, jnp.zeros_like(y))
    return jnp.where(ok, y, acc)


def loop_runner(info: StackLoop, mesh, axis: str, m: int):
    """A function of the loop's operands (constants, carries, scanned) that returns
    its results (carries, stacked), computed as pipeline stages over mesh axis
    `axis` with m microbatches (info.micro must be traced at batch / m)."""
    p, params = mesh.shape[axis], info.micro
    nc, nk = params["num_consts"], params["num_carry"]
    program = _stage_program(info, params, axis, p, m)

    def run(outer):
        split = [_split(x, d, m) for x, d in zip(outer, info.in_dims, strict=True)]
        rep, stk = P(), P(axis)
        in_specs = (
            [rep] * nc,
            [rep] * nk,
            [stk] * (len(outer) - nc - nk),
        )
        f = jax.shard_map(
            program,
            mesh=mesh,
            in_specs=in_specs,
            out_specs=([rep] * nk, [stk] * (len(info.out_dims) - nk)),
            axis_names=frozenset({axis}),
            check_vma=False,
        )
        outs, ys = f(split[:nc], split[nc : nc + nk], split[nc + nk :])
        return [_merge(x, d) for x, d in zip([*outs, *ys], info.out_dims, strict=True)]

    return run


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class Context:
    """What planning a step needs: the step, its arguments, trace and graph."""

    fn: object
    args: tuple
    traced: object
    graph: OpGraph
    hardware: Hardware
    devices: tuple
    time_limit: float
    donated: frozenset
    budget: float | None = None  # bytes per device a pipelined plan must fit


def _hw(ctx: Context, mesh) -> Hardware:
    """The hardware's numbers per axis of this mesh (from its levels, if it has them)."""
    return ctx.hardware.for_mesh(tuple(mesh.axis_sizes))


def _pipe_axis(mesh, stages: int, axis: str | None) -> str | None:
    if axis is not None:
        return axis if mesh.shape.get(axis) == stages else None
    return next((a for a in mesh.axis_names if mesh.shape[a] == stages), None)


def _per_axis(value, keep: list[int]):
    return tuple(value[i] for i in keep) if isinstance(value, tuple | list) else value


def _sub_problem(ctx: Context, mesh, axis: str):
    """(sub-mesh of the remaining axes, its hardware). With no axis left, a one-device
    axis stands in (every value replicated but for the stage split)."""
    from autoshard.search import make_mesh

    keep = [i for i, a in enumerate(mesh.axis_names) if a != axis]
    names = tuple(mesh.axis_names[i] for i in keep) or ("_stage",)
    shape = tuple(mesh.devices.shape[i] for i in keep) or (1,)
    hw = _hw(ctx, mesh)
    if keep:
        hw = hw.with_(bandwidth=_per_axis(hw.bandwidth, keep), latency=_per_axis(hw.latency, keep))
    else:
        idx = list(mesh.axis_names).index(axis)
        hw = hw.with_(
            bandwidth=_per_axis(hw.bandwidth, [idx]), latency=_per_axis(hw.latency, [idx])
        )
    return make_mesh(shape, names, list(ctx.devices)), hw


def _remap(spec, amap: dict[int, int]):
    if spec is None:
        return None
    return tuple(tuple(amap[a] for a in d if a in amap) for d in spec)


def _stage_split(spec, shape, pipe: int, p: int, sizes):
    """spec with the pipeline axis on dim 0 (in front of what the plan had there,
    if the layers still divide)."""
    if spec is None or not shape:
        return spec
    rest = spec[0]
    if shape[0] % (p * math.prod(sizes[a] for a in rest)):
        rest = ()
    return ((pipe, *rest), *spec[1:])


def remap_layout(layout: Layout, graph: OpGraph, sub_names, mesh, axis: str, stacked) -> Layout:
    """The sub-mesh plan on the full mesh: axes renumbered, and stacked values split
    over the pipeline axis on their layer dimension."""
    full = list(mesh.axis_names)
    amap = {i: full.index(n) for i, n in enumerate(sub_names) if n in full}
    pipe, p, sizes = full.index(axis), mesh.shape[axis], mesh.devices.shape

    def value(v, spec):
        spec = _remap(spec, amap)
        if v in stacked:
            spec = _stage_split(spec, graph.values[v].shape, pipe, p, sizes)
        return spec

    specs = tuple(value(v, s) for v, s in enumerate(layout.value_specs))
    operands = tuple(
        tuple(
            None if isinstance(r, Lit) else value(r, s)
            for r, s in zip(n.inputs, layout.operand_specs[n.id], strict=True)
        )
        for n in graph.nodes
    )
    scatters = tuple(
        None if sc is None else (sc[0], tuple(amap[a] for a in sc[1] if a in amap))
        for sc in layout.scatters
    )
    scatters = tuple(None if sc is None or not sc[1] else sc for sc in scatters)
    return Layout(specs, operands, scatters)


def _node_time(mp, n) -> float:
    p = mp.problem
    return n.weight * p.units[p.node_unit(n.id)][mp.picks[p.node_unit(n.id)]].cost


def _serial_time(mp, loop_id: int) -> float:
    """Seconds the sub-mesh plan spends in one loop's body (all iterations)."""
    return sum(_node_time(mp, n) for n in mp.problem.graph.nodes if n.region == loop_id)


def _stacked_time(mp, stacked) -> float:
    """Seconds of step-level operations on stacked values (the optimizer update of
    the layer weights), which each stage runs on its own layers only."""
    return sum(
        _node_time(mp, n)
        for n in mp.problem.graph.nodes
        if n.region == -1 and n.boundary < 0 and any(v in stacked for v in n.outputs)
    )


@dataclass(frozen=True)
class _Bytes:
    boundary: tuple[float, ...]  # per loop: its carries per device, whole batch
    gathered: tuple[float, ...]  # per loop: the final carries the step reads
    gathered_count: int
    residuals: float  # stacked per-layer activations handed to the backward loop
    stacked_args: float  # stacked inputs (layer weights, their optimizer state)


def _bytes(mp, graph: OpGraph, loops, stacked) -> _Bytes:
    specs = mp.layout().value_specs
    desc = mp.problem.mesh

    def dev(v):
        return per_device_bytes(graph.values[v].nbytes, specs[v], desc)

    read = {r for n in graph.nodes for r in n.inputs if not isinstance(r, Lit)}
    read |= {r for r in graph.outputs if not isinstance(r, Lit)}
    boundary, gathered, count, residuals = [], [], 0, 0.0
    for s in loops:
        lp = graph.loops[s.loop]
        nk = lp.num_carry
        outs = [graph.nodes[i].outputs[0] for i in lp.exit[:nk]]
        boundary.append(sum(dev(v) for v in outs))
        gathered.append(sum(dev(v) for v in outs if v in read))
        count += sum(v in read for v in outs)
        residuals += sum(
            dev(graph.nodes[i].outputs[0])
            for i, k in zip(lp.exit[nk:], s.out_kinds[nk:], strict=True)
            if k == BATCH
        )
    args = sum(dev(v) for v in graph.inputs if v in stacked)
    return _Bytes(tuple(boundary), tuple(gathered), count, residuals, args)


def predict(mp, graph, loops, stacked, hw: Hardware, mesh, axis: str, m: int, schedule: str):
    """The pipelined step's PipelineChoice (time, bubble, per-stage memory) from the
    sub-mesh plan mp: its loops' time is spread over p stages with the bubble, the
    rest of the step keeps mp's time."""
    p, ai = mesh.shape[axis], list(mesh.axis_names).index(axis)
    serial = {s.loop: _serial_time(mp, s.loop) for s in loops}
    split = _stacked_time(mp, stacked)
    rest = max(mp.result.objective - sum(serial.values()) - split * (1 - 1 / p), 0.0)
    piped = sum(cm.loop_time(t, p, m) for t in serial.values())
    b = _bytes(mp, graph, loops, stacked)
    # a final carry nothing reads (the gradient of the batch input) is never gathered
    moved = sum(cm.transfer_time(x, p, m, hw, ai) for x in b.boundary)
    moved += sum(cm.gather_time(x, p, hw, ai) for x in b.gathered)
    mem = mp.memory()
    args = mem["arguments"] - b.stacked_args * (1 - 1 / p)
    acts = mem["activations_peak"] - b.residuals
    acts += cm.activation_memory(b.residuals, p, m, schedule)
    memory = {"arguments": args, "activations_peak": acts, "total": args + acts}
    return cm.PipelineChoice(
        p,
        m,
        schedule,
        axis,
        loops[0].length,
        cm.bubble_fraction(p, m),
        memory,
        rest + piped + moved,
        piped,
        moved,
    )


def find_loops(ctx: Context, m: int) -> tuple[StackLoop, ...]:
    """The step's layer-stack loops, found by tracing it again at batch / m."""
    micro = build_graph(trace(ctx.fn, micro_args(ctx.args, m)))
    return stack_loops(ctx.graph, micro)


def _check_layers(loops, stages: int) -> str | None:
    lengths = sorted({s.length for s in loops})
    if len(lengths) > 1:
        return f"the layer-stack loops have different lengths {lengths}"
    if stages > lengths[0]:
        n = lengths[0]
        return f"{stages} stages but the layer stack has {n} layers: use at most {n} stages"
    if lengths[0] % stages:
        return (
            f"{lengths[0]} layers do not divide into {stages} stages: use a divisor of {lengths[0]}"
        )
    return None


def _sub_plan(ctx: Context, mesh, axis: str):
    from autoshard.search import solve_on_mesh

    sub, hw = _sub_problem(ctx, mesh, axis)
    return solve_on_mesh(ctx.graph, sub, hw, ctx.time_limit, None, ctx.donated)


def _collectives(mp, piped: set[int], m: int) -> dict[str, tuple[int, float]]:
    """{kind: (count, bytes)} of the sub-mesh plan's collectives; those inside a
    pipelined loop move one microbatch at a time."""
    from autoshard.search import combine, predicted_collectives

    g = mp.problem.graph
    preds = [
        (nid, dataclasses.replace(c, nbytes=c.nbytes / m) if g.nodes[nid].region in piped else c)
        for nid, c in predicted_collectives(mp, mp.layout())
    ]
    out: dict[str, tuple[int, float]] = {}
    for _, c in combine(mp, preds):
        n0, b0 = out.get(c.kind, (0, 0.0))
        out[c.kind] = (n0 + 1, b0 + c.nbytes)
    return out


def build(ctx: Context, mesh, axis: str, m: int, schedule: str, loops, mp, t0: float):
    """(Plan, run) of the pipelined step from the sub-mesh plan mp."""
    from autoshard.api import _make_plan as make_plan
    from autoshard.search import specs_of

    g, traced = ctx.graph, ctx.traced
    stacked = stacked_values(g, loops)
    choice = predict(mp, g, loops, stacked, _hw(ctx, mesh), mesh, axis, m, schedule)
    base = make_plan(mp, g, {}, time.perf_counter() - t0)
    layout = remap_layout(mp.layout(), g, mp.mesh.axis_names, mesh, axis, stacked)
    names = mesh.axis_names
    ins = specs_of(g.inputs, layout, names)
    outs = [s if s is not None else P() for s in specs_of(g.outputs, layout, names)]
    nk = [g.loops[s.loop].num_carry for s in loops]
    colls = _collectives(mp, {s.loop for s in loops}, m)
    b = _bytes(mp, g, loops, stacked)
    colls["collective-permute"] = (sum(nk), sum(b.boundary) / m)
    # the last stage's final carries, summed over the pipeline axis (one per carry read)
    if b.gathered_count:
        n0, b0 = colls.get("all-reduce", (0, 0.0))
        colls["all-reduce"] = (n0 + b.gathered_count, b0 + sum(b.gathered))
    cost = dataclasses.replace(
        base.cost,
        time=choice.time,
        comm_time=base.cost.comm_time + choice.transfer_time,
        compute_time=max(choice.time - base.cost.comm_time - choice.transfer_time, 0.0),
        collectives=colls,
        memory=choice.stage_memory,
    )
    plan = dataclasses.replace(
        base,
        mesh=mesh,
        in_specs=jax.tree_util.tree_unflatten(traced.in_tree, ins),
        out_specs=jax.tree_util.tree_unflatten(traced.out_tree, outs),
        cost=cost,
        inputs=tuple(dataclasses.replace(e, spec=s) for e, s in zip(base.inputs, ins, strict=True)),
        layout=layout,
        pipeline=choice,
    )
    return plan, interpreter(g, layout, mesh, _runners(ctx, loops, mesh, axis, m, schedule))


def _runners(ctx: Context, loops, mesh, axis: str, m: int, schedule: str) -> dict:
    from autoshard import pipeline_1f1b

    if schedule == cm.ONE_F_ONE_B:
        return pipeline_1f1b.runners(ctx, loops, mesh, axis, m)
    return {s.loop: loop_runner(s, mesh, axis, m) for s in loops}


def forced(ctx: Context, pipe: Pipeline, meshes):
    """(Plan, run) for a forced Pipeline: on the candidate mesh axis of its size with
    the least bandwidth (the first such on uniform hardware)."""
    t0 = time.perf_counter()
    found = [(mesh, _pipe_axis(mesh, pipe.stages, pipe.axis)) for mesh in meshes]
    found = [(mesh, a) for mesh, a in found if a is not None]
    if not found:
        shapes = [dict(mesh.shape) for mesh in meshes]
        raise PipelineError(
            f"autoshard: Pipeline(stages={pipe.stages}) needs a mesh axis of size {pipe.stages}"
            f"{f' named {pipe.axis!r}' if pipe.axis else ''}; the mesh is {shapes}. Pass "
            f"mesh=... with such an axis, or stages equal to an axis size."
        )
    # the stages go where links are slowest: only boundaries cross the pipeline axis
    mesh, axis = min(
        found, key=lambda f: _hw(ctx, f[0]).axis_bandwidth(f[0].axis_names.index(f[1]))
    )
    loops = find_loops(ctx, pipe.microbatches)
    if not loops:
        raise PipelineError(
            "autoshard: pipeline=Pipeline(...) found no layer stack to split into stages: "
            "write the repeated layers as jax.lax.scan (or nnx.scan) over stacked weights "
            "whose carry holds the batch, with layers that treat the examples of a batch "
            "independently (no batch statistics)."
        )
    problem = _check_layers(loops, pipe.stages)
    if problem:
        raise PipelineError(f"autoshard: Pipeline(stages={pipe.stages}): {problem}.")
    if pipe.schedule == cm.ONE_F_ONE_B:
        from autoshard.pipeline_1f1b import check

        check(ctx, loops, pipe.microbatches)
    mp = _sub_plan(ctx, mesh, axis)
    return build(ctx, mesh, axis, pipe.microbatches, pipe.schedule, loops, mp, t0)


def hierarchical(hw: Hardware) -> bool:
    """Whether the mesh axes differ in bandwidth or latency (hosts joined by a slower
    network than their devices): the case pipelines are for, and the only one the
    automatic search prices them on."""
    return any(isinstance(v, tuple | list) and len(set(v)) > 1 for v in (hw.bandwidth, hw.latency))


def auto(ctx: Context, meshes, best: float):
    """(Plan, run) of the cheapest pipelined plan over every mesh axis of size >= 2
    of every candidate mesh with two or more axes, if it beats `best` seconds; else
    None. Only on hierarchical hardware (see `hierarchical`), and only plans whose
    per-stage memory fits ctx.budget (1F1B where only it fits). Batches and layer
    counts a pipeline cannot split are never chosen."""
    t0 = time.perf_counter()
    if not any(hierarchical(_hw(ctx, mesh)) for mesh in meshes):
        return None
    try:
        b = batch_size(ctx.args)
    except PipelineError:
        return None
    m0 = next((m for m in range(2, b + 1) if b % m == 0), None)
    loops = find_loops(ctx, m0) if m0 else ()
    if not loops:
        return None
    from autoshard.pipeline_1f1b import runs

    choice, one_f_one_b = None, functools.cache(lambda: runs(ctx, loops, m0))

    for mesh in meshes:
        for axis in mesh.axis_names if len(mesh.axis_names) > 1 else ():
            p = mesh.shape[axis]
            ms = cm.microbatch_candidates(b, p)
            if _check_layers(loops, p) or not ms:
                continue
            mp = _sub_plan(ctx, mesh, axis)
            g = ctx.graph
            stacked = stacked_values(g, loops)
            for m in ms:
                for sched in (cm.GPIPE, cm.ONE_F_ONE_B):
                    if sched == cm.ONE_F_ONE_B and not one_f_one_b():
                        break
                    c = predict(mp, g, loops, stacked, _hw(ctx, mesh), mesh, axis, m, sched)
                    fits = ctx.budget is None or c.stage_memory["total"] <= ctx.budget
                    if fits and c.time < best and (choice is None or c.time < choice[0].time):
                        choice = (c, mesh, axis, m, mp)
                    if fits:
                        break  # 1F1B only where GPipe's residuals do not fit
    if choice is None:
        return None
    c, mesh, axis, m, mp = choice
    # each stage runs the loop body traced at this microbatch size
    return build(ctx, mesh, axis, m, c.schedule, find_loops(ctx, m), mp, t0)


def runner(ctx: Context, plan):
    """The function that runs a pipelined plan: the interpreter with each stacked
    loop run as stages. Built from `plan.pipeline` alone, so a plan planned on another
    process (autoshard.distributed) runs the same way."""
    p = plan.pipeline
    loops = find_loops(ctx, p.microbatches)
    runners = _runners(ctx, loops, plan.mesh, p.axis, p.microbatches, p.schedule)
    return interpreter(ctx.graph, plan.layout, plan.mesh, runners)
