"""parallelize: the decorator that plans once per input signature and runs sharded."""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import time
import warnings
from dataclasses import dataclass, replace
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from autoshard import boundary as _boundary
from autoshard import cache as _cache
from autoshard import distributed as _distributed
from autoshard import pipeline as _pipeline
from autoshard import progress as _progress
from autoshard import remat as _remat
from autoshard import search as _search
from autoshard.cost_model.hardware import Hardware
from autoshard.mesh import (
    AbstractTarget,
    candidate_meshes,
    default_hardware,
    is_abstract,
    resolve_devices,
)
from autoshard.passes.annotate import interpreter
from autoshard.passes.graph import Lit, build_graph
from autoshard.passes.trace import trace
from autoshard.pins import user_pins
from autoshard.plan import Cost, Entry, Plan, SolverStats

# Fraction of device memory a default budget leaves free for what the memory model does
# not see: XLA's own buffers, the compiled program, fragmentation.
MEMORY_HEADROOM = 0.1


@dataclass(frozen=True, eq=False)
class _Variant:
    """One form of the step to plan (as traced, or rematerialised) and its inputs."""

    traced: Any
    graph: Any
    meshes: list
    pinned: list
    out_pins: dict
    ctx: _pipeline.Context
    remat: _remat.RematChoice | None = None


class Parallelized:
    """A step wrapped by `parallelize`; call it like the original step."""

    def __init__(
        self,
        fn,
        mesh=None,
        hardware=None,
        donate_argnums=(),
        time_limit=60.0,
        devices=None,
        memory_budget=None,
        *,
        static_argnums=(),
        static_argnames=(),
        donate_argnames=(),
        in_shardings=None,
        out_shardings=None,
        pipeline=_pipeline.AUTO,
        verbose=True,
        cache=None,
        cache_dir=None,
        remat=_remat.AUTO,
    ):
        functools.update_wrapper(self, fn)
        self.verbose = verbose
        self.cache_dir = _cache.cache_dir(cache, cache_dir)
        self._last_args = None
        self._progress = None  # of the planning under way
        self.fn = fn
        self.mesh = mesh
        self.devices = resolve_devices(devices)
        self.hardware = hardware or default_hardware(self.devices, mesh)
        if not isinstance(self.hardware, Hardware):
            raise TypeError(
                f"autoshard: hardware must be an autoshard.Hardware, got {type(hardware).__name__}"
            )
        if mesh is not None:  # a bad mesh is an error here, not at the first call
            candidate_meshes(mesh, self.devices, self.hardware)
        self.conventions = _boundary.conventions(
            fn, static_argnums, static_argnames, donate_argnums, donate_argnames
        )
        self.donate_argnums = tuple(sorted(self.conventions.donate_argnums))
        self.in_shardings, self.out_shardings = in_shardings, out_shardings
        self.time_limit = time_limit
        if memory_budget is not None and not memory_budget > 0:
            raise ValueError(
                f"autoshard: memory_budget={memory_budget!r} must be a positive number of bytes "
                "per device (or None for the hardware's memory less headroom)."
            )
        self.memory_budget = memory_budget
        if not (
            pipeline is None
            or pipeline == _pipeline.AUTO
            or isinstance(pipeline, _pipeline.Pipeline)
        ):
            raise TypeError(
                f"autoshard: pipeline={pipeline!r}: use 'auto', None, or autoshard.Pipeline(...)."
            )
        self.pipeline = pipeline
        _remat.policies(remat)  # a bad option is an error here
        self.remat = remat
        self._cache: dict = {}
        self.trace_count = 0
        self.solve_count = 0

    def _entry(self, args, kwargs=None):
        """(call, (plan, jitted, flat input shardings)) for these arguments."""
        call = _boundary.split_call(self.fn, self.conventions, args, kwargs or {})
        sig = call.signature()
        if sig not in self._cache:
            t0 = time.perf_counter()
            self._cache[sig] = self._plan_and_build(call)
            if self._last_args is not None:
                changes = _progress.changed_inputs(self._last_args, call.dyn)
                _progress.replanned(self._name(), changes, time.perf_counter() - t0, self.verbose)
            self._last_args = jax.tree_util.tree_map(_abstract, call.dyn)
        return call, self._cache[sig]

    def _name(self) -> str:
        return getattr(self.fn, "__name__", "step")

    def _plan_and_build(self, call):
        t0 = time.perf_counter()
        traced = trace(call.pure, call.dyn, call.names)
        self.trace_count += 1
        with _collector_paused():
            return self._plan_traced(call, traced, t0)

    def _plan_traced(self, call, traced, t0):
        base = self._variant(call, traced)
        abstract = any(is_abstract(m) for m in base.meshes)
        key = None if abstract or self.cache_dir is None else self._cache_key(base)
        plan = _cache.load(self.cache_dir, key, traced, base.meshes) if key else None
        if plan is not None:
            chosen = self._rematerialised(call, base, plan.remat)
        elif abstract or {d.process_index for d in self.devices} == {jax.process_index()}:
            plan, chosen = self._planned(lambda: self._solve_remat(call, base, t0))
            if abstract:  # no devices, no other process to agree with
                return plan, AbstractTarget(plan), None
            if key:
                _cache.store(self.cache_dir, key, plan)
        else:  # under jax.distributed, process 0 plans and every process runs its plan
            forms = {}

            def graph_for(choice):
                forms["chosen"] = self._rematerialised(call, base, choice)
                return forms["chosen"].graph

            solve = lambda: self._planned(lambda: self._solve_remat(call, base, t0))[0]
            plan = _distributed.agree(solve, base.graph, self.devices, graph_for)
            chosen = forms["chosen"]
        return (plan, *self._build(call, chosen, plan))

    def _planned(self, solve):
        """solve() with progress reported on the "autoshard" logger."""
        self.solve_count += 1
        self._progress = _progress.Progress(self._name(), self.verbose)
        plan, chosen = solve()
        self._progress.done(plan.solver.mesh_shape)
        return plan, chosen

    def _cache_key(self, base: _Variant) -> str:
        """Everything the plan depends on besides autoshard's code and the meshes."""
        ctx = base.ctx
        return _cache.plan_key(
            base.traced,
            base.meshes,
            self.hardware,
            budget=ctx.budget,
            time_limit=self.time_limit,
            donated=sorted(ctx.donated),
            pins=repr(base.pinned),
            out_pins=repr(sorted(base.out_pins.items())),
            pipeline=repr(self.pipeline),
            remat=repr(self.remat),
        )

    def _rematerialised(self, call, base: _Variant, choice) -> _Variant:
        """The form of the step a loaded plan runs: as traced, or rematerialised."""
        if choice is None:
            return base
        traced, _ = _remat.variant(base.traced, choice.policy)
        return self._variant(call, traced, choice)

    def _variant(self, call, traced, remat=None) -> _Variant:
        """What planning needs for one traced form of the step."""
        graph = build_graph(traced)
        pins = user_pins(call, traced, graph, self.in_shardings, self.out_shardings)
        meshes = candidate_meshes(self.mesh, self.devices, self.hardware)
        meshes, pinned = pins.usable(graph, meshes)
        budget = self.memory_budget
        if budget is None:
            budget = self.hardware.memory * (1 - MEMORY_HEADROOM)
        ctx = _pipeline.Context(
            call.pure,
            call.dyn,
            traced,
            graph,
            self.hardware,
            () if isinstance(self.devices, int) else tuple(self.devices),
            self.time_limit,
            _donated_leaves(traced, call.donated),
            budget,
        )
        out_pins = {v: p for v, _, p in pins.outputs if p is not None}
        return _Variant(traced, graph, meshes, pinned, out_pins, ctx, remat)

    def _build(self, call, chosen: _Variant, plan: Plan):
        """(jitted step, flat input shardings) running plan on chosen's graph."""
        traced = chosen.traced
        if plan.pipeline is not None:
            run = _pipeline.runner(chosen.ctx, plan)
        else:
            run = interpreter(chosen.graph, plan.layout, plan.mesh)
        flat_in = [
            NamedSharding(plan.mesh, s)
            for s in jax.tree_util.tree_leaves(plan.in_specs, is_leaf=_is_p)
        ]
        flat_out = [NamedSharding(plan.mesh, s) for s in _flat_out_specs(plan)]

        def step(*a):
            outs = run(*jax.tree_util.tree_leaves(a))
            return jax.tree_util.tree_unflatten(traced.out_tree, outs)

        in_sh = jax.tree_util.tree_unflatten(traced.in_tree, flat_in)
        out_sh = jax.tree_util.tree_unflatten(traced.out_tree, flat_out)
        jitted = jax.jit(
            step,
            in_shardings=tuple(in_sh),
            out_shardings=out_sh,
            donate_argnums=call.donated,
        )
        return jitted, flat_in

    def _solve_remat(self, call, base: _Variant, t0) -> tuple[Plan, _Variant]:
        """The plan, and the form of the step it runs: as traced, or with its layer
        stacks rematerialised when remat= allows it and (for "auto") the budget binds
        on the plan without it. The cheapest plan within the budget wins. A form
        whose mesh-independent memory floor (`remat.memory_floor`) exceeds the budget
        is not planned while a form that saves less is still to come."""
        forced_pipe = isinstance(self.pipeline, _pipeline.Pipeline)
        policies = () if forced_pipe else _remat.policies(self.remat)
        forced = bool(policies) and self.remat != _remat.AUTO
        best, err, binds = None, None, bool(policies)
        variants = None
        if not forced:
            beyond = self._beyond_budget(base)
            if policies and beyond:
                variants = list(self._remat_variants(call, base, policies, None))
            if not variants and beyond:  # no form of the step can fit: no search
                err = _search.MemoryBudgetError(_remat.floor_message(base.ctx, _devices(base)))
            elif not variants:  # the floor binds on no remat form, or there is none
                try:
                    best, binds = self._solve(base, t0)
                except _search.MemoryBudgetError as e:
                    err = e
        if best is not None and not binds:
            return best, base
        without = best.cost.time if best is not None else None
        if variants is None:
            variants = list(self._remat_variants(call, base, policies, without))
        chosen = base
        for k, var in enumerate(variants):
            if not forced and k < len(variants) - 1 and self._beyond_budget(var):
                continue
            try:
                plan, _ = self._solve(var, t0)
            except _search.MemoryBudgetError as e:
                err = err or e
                continue
            if best is None or forced or plan.cost.time < best.cost.time:
                best, chosen = replace(plan, remat=var.remat), var
            if forced:
                break
        if best is None and err is None:  # forced, but nothing to rematerialise
            warnings.warn(
                f"autoshard: remat={self.remat!r}: the step has no lax.scan/nnx.scan layer "
                "stack whose saved residuals remat would shrink; planning it as traced.",
                stacklevel=4,
            )
            return self._solve(base, t0)[0], base
        if best is None:
            raise err
        return best, chosen

    def _beyond_budget(self, var: _Variant) -> bool:
        """No plan of this form of the step fits the budget on any candidate mesh."""
        ctx = var.ctx
        floor = _remat.memory_floor(ctx.graph, ctx.donated, _devices(var))
        if floor <= ctx.budget * (1 + _search.FIT_TOLERANCE):
            return False
        if self._progress is not None:
            what = "as traced" if var.remat is None else f"under remat {var.remat.policy}"
            self._progress.note(
                f"the step {what} needs at least {floor / 2**30:.2f} GiB per device on any "
                f"mesh (budget {ctx.budget / 2**30:.2f} GiB): not planned"
            )
        return True

    def _remat_variants(self, call, base: _Variant, policies, without):
        """The step rematerialised under each policy that shrinks what it saves."""
        for policy in policies:
            v = _remat.variant(base.traced, policy)
            if v is not None:
                yield self._variant(call, v[0], replace(v[1], time_without=without))

    def _solve(self, var: _Variant, t0) -> tuple[Plan, bool]:
        """The plan on this process for one form of the step (forced pipeline, or the
        mesh search, then an automatic pipeline if one is predicted faster), and
        whether the memory budget bound the winning mesh's plan."""
        ctx, meshes, pinned = var.ctx, var.meshes, var.pinned
        if isinstance(self.pipeline, _pipeline.Pipeline):
            if any(is_abstract(m) for m in meshes):
                raise ValueError(
                    "autoshard: a forced pipeline runs on devices this process has; plan an "
                    "abstract mesh with pipeline='auto' or None."
                )
            if any(pinned):
                raise ValueError(
                    "autoshard: a forced pipeline does not take pinned layouts (in_shardings, "
                    "out_shardings or with_sharding_constraint in the step): drop the pins, or "
                    "use pipeline='auto' to plan around them without stages."
                )
            return _pipeline.forced(ctx, self.pipeline, meshes)[0], False
        graph = ctx.graph
        mp, tried = _search.search(
            graph,
            meshes,
            self.hardware,
            self.time_limit,
            ctx.budget,
            ctx.donated,
            pinned,
            progress=self._progress,
        )
        plan = _make_plan(mp, graph, tried, time.perf_counter() - t0, var.out_pins)
        binds = bool(mp.request.memory)
        # a pipeline would ignore the user's pins, and an abstract mesh has no devices;
        # a rematerialised step is not split into stages
        pipe = self.pipeline == _pipeline.AUTO and var.remat is None
        if pipe and not any(pinned) and not is_abstract(plan.mesh):
            piped = _pipeline.auto(ctx, meshes, plan.cost.time)
            plan = piped[0] if piped else plan
        return plan, binds

    def plan(self, *args, **kwargs) -> Plan:
        """The plan for these arguments (arrays or ShapeDtypeStructs), without running."""
        return self._entry(args, kwargs)[1][0]

    def lower(self, *args, **kwargs):
        """jax Lowered of the sharded step: `.compile().as_text()` shows the collectives."""
        call, (_, jitted, _) = self._entry(args, kwargs)
        return jitted.lower(*call.dyn)

    def __call__(self, *args, **kwargs):
        call, (_, jitted, shardings) = self._entry(args, kwargs)
        if isinstance(jitted, AbstractTarget):
            jitted()  # raises: the plan is for devices this process does not have
        return call.finish(jitted(*_boundary.place(call.dyn, shardings)))


@contextlib.contextmanager
def _collector_paused():
    """Python's cyclic garbage collector paused while a traced step is planned.

    Planning allocates many small objects that live until the plan is made, next to
    the traced program's: every full collection on the way walks all of them again
    (on a 48-layer GPT, three full collections, half a second). Garbage without
    cycles is freed as usual; the rest waits for the collector's next run after."""
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _abstract(x):
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x


def _donated_leaves(traced, donate_argnums) -> frozenset[int]:
    """Flat input indices of the leaves of the donated (dynamic) arguments."""
    counts = [t.num_leaves for t in traced.in_tree.children()]
    starts = np.cumsum([0, *counts])
    return frozenset(
        i for a in donate_argnums if a < len(counts) for i in range(starts[a], starts[a + 1])
    )


def _is_p(x) -> bool:
    return isinstance(x, jax.sharding.PartitionSpec)



def _devices(var: _Variant) -> int:
    """The device count of the largest candidate mesh."""
    return max(math.prod(m.axis_sizes) for m in var.meshes)


def _flat_out_specs(plan: Plan):
    return jax.tree_util.tree_leaves(plan.out_specs, is_leaf=_is_p)


def _make_plan(mp: _search.MeshPlan, graph, tried, plan_time, out_pins=None) -> Plan:
    layout = mp.layout()
    names = mp.mesh.axis_names
    traced = graph.traced
    in_flat = _search.specs_of(graph.inputs, layout, names)
    out_flat = [
        s if s is not None else jax.sharding.PartitionSpec()
        for s in _search.specs_of(graph.outputs, layout, names)
    ]
    for k, v in enumerate(graph.outputs):  # a pinned output is resharded to its pin
        pin = (out_pins or {}).get(v) if not isinstance(v, Lit) else None
        if pin is not None:
            out_flat[k] = pin.spec if isinstance(pin, NamedSharding) else pin
    preds = _search.predicted_collectives(mp, layout)
    collectives: dict[str, tuple[int, float]] = {}
    comm_bytes: dict[str, float] = {}
    combined = _search.combine(mp, preds)
    for _, c in combined:
        n0, b0 = collectives.get(c.kind, (0, 0.0))
        collectives[c.kind] = (n0 + 1, b0 + c.nbytes)
        comm_bytes[c.kind] = comm_bytes.get(c.kind, 0.0) + c.nbytes
    compute, comm = _search.times(mp, combined)
    memory = mp.liveness.report(layout.value_specs, layout.operand_specs)
    by_kind = _search.comm_time_by_kind(mp, combined)
    ops = _search.roofline(mp)
    cost = Cost(mp.result.objective, compute, comm, comm_bytes, collectives, memory, by_kind, ops)
    r = mp.result
    stats = SolverStats(
        tuple(mp.mesh.axis_sizes),
        len(mp.problem.roots),
        len(graph.nodes),
        r.num_variables,
        r.num_constraints,
        r.solve_time,
        plan_time,
        r.status,
        tried,
    )
    entries = tuple(
        Entry(p, tuple(a.shape), str(a.dtype), s)
        for p, a, s in zip(traced.in_paths, traced.in_avals, in_flat, strict=True)
    )
    return Plan(
        mp.mesh,
        jax.tree_util.tree_unflatten(traced.in_tree, in_flat),
        jax.tree_util.tree_unflatten(traced.out_tree, out_flat),
        cost,
        stats,
        entries,
        layout,
    )


def parallelize(
    fn=None,
    *,
    mesh=None,
    hardware: Hardware | None = None,
    donate_argnums=(),
    time_limit: float = 60.0,
    devices=None,
    memory_budget: float | None = None,
    static_argnums=(),
    static_argnames=(),
    donate_argnames=(),
    in_shardings=None,
    out_shardings=None,
    pipeline: Any = "auto",
    verbose: bool = True,
    cache: bool | None = None,
    cache_dir: str | None = None,
    remat: str | None = "auto",
) -> Any:
    """Run a single-device training step sharded over all visible devices.

    The step is traced once per input signature; autoshard enumerates how every
    tensor can be split, solves an ILP over communication and compute costs for
    each candidate mesh, and runs the cheapest plan with `jax.jit` shardings.

    Args:
      fn: the step, e.g. `train_step(state, batch) -> (state, metrics)`.
      mesh: None (try every 1-D/2-D/3-D mesh of the devices), a shape tuple such as
        (2, 4), a `jax.sharding.Mesh` (its devices and axis names are kept), or a
        `jax.sharding.AbstractMesh` (plan for a mesh of any size, without devices).
      hardware: `autoshard.Hardware` to price plans with; default from the devices.
      donate_argnums: arguments whose buffers the step may reuse (e.g. 0 for state).
      time_limit: seconds the ILP solver may spend per mesh before its best answer.
      devices: devices to use (default `jax.devices()`), or an int: plan for that many
        devices this process does not have (an abstract target; needs `hardware`).
        With `mesh=jax.sharding.AbstractMesh(...)` too, the plan is abstract:
        `.plan()` works from ShapeDtypeStructs, calling or lowering raises.
      memory_budget: bytes per device no plan may exceed (arguments, outputs that do
        not reuse a donated buffer, and the peak of live intermediates, as
        `plan.cost.memory["total"]` reports it). Default: the hardware's memory less
        `MEMORY_HEADROOM` (10%) for what the model does not see (XLA's own buffers,
        fragmentation). Under a tight budget the plan splits parameters and
        optimizer state over the data axis (ZeRO/FSDP); if no plan fits,
        `autoshard.MemoryBudgetError` names the least memory reachable and what
        dominates it.
      pipeline: "auto" (the planner may split a `lax.scan` layer stack into stages
        over a mesh axis when that is predicted faster), None (never), or
        `autoshard.Pipeline(stages, microbatches)` to force it. See docs/pipeline.md.
      remat: rematerialisation of `lax.scan`/`nnx.scan` layer stacks, as
        `jax.checkpoint` on the layer would do it. "auto": when the memory budget
        binds, the step is planned again with each stack's forward pass saving only
        its matmul results ("dots_saveable") or only each layer's input
        ("nothing_saveable"), the backward pass recomputing the rest; the cheapest
        plan within the budget wins and `plan.remat` says which. None: never.
        "layers" (= "nothing_saveable"), "nothing_saveable" or "dots_saveable": always
        that policy. Not combined with a forced pipeline; under jax.distributed
        with several processes the step is planned as traced. See docs/pods.md.
      static_argnums, static_argnames: arguments that are Python values, not arrays
        (flags, configs): part of the cache key and closed over, as for `jax.jit`
        (they must be hashable). Numbers and names are resolved against each other.
      donate_argnames: donated arguments by name (with donate_argnums, as for `jax.jit`).
      in_shardings: layouts the user fixes for inputs, as `jax.jit` spells them: one
        entry per dynamic positional argument (or one for all), each a pytree prefix
        of that argument with `None` ("choose for me"), a `PartitionSpec` over the
        planned mesh's axis names, or a `NamedSharding` (its spec is used). The plan
        is built around them; a pin that cannot hold is a ValueError naming the
        tensor, dimension and axis. `jax.lax.with_sharding_constraint` inside the
        step is kept as a pin too.
      out_shardings: the same for the step's output (a prefix of it).

      verbose: planning that takes more than about 2 s reports its progress (and a
        re-plan for new input shapes one line) on the "autoshard" logger; False
        keeps it quiet.
      cache: keep plans on disk and reuse them when the same step is planned again
        with the same meshes, hardware and options (default on unless
        `AUTOSHARD_CACHE=0`); False turns it off.
      cache_dir: where plans are kept (default `$AUTOSHARD_CACHE_DIR`, else
        `$XDG_CACHE_HOME/autoshard` or `~/.cache/autoshard`).

    Flax NNX modules, optimizers and `nnx.Rngs` may be passed and mutated as under
    `nnx.jit`: their state is split off, planned and run like any array, and every
    update is merged back into the objects passed in (see docs/steps.md). Inputs may
    come in any placement (uncommitted, on one device, sharded on another mesh):
    they are resharded to the plan's layout on entry, and outputs come back in the
    layout the next call takes, so the steady state compiles nothing.

    Returns:
      A callable with `.plan(*args)` and `.lower(*args)`.

    Example:
      >>> import jax, jax.numpy as jnp, autoshard
      >>> @autoshard.parallelize
      ... def step(w, x):
      ...     return w - 0.1 * jax.grad(lambda w: jnp.sum((x @ w) ** 2))(w)
      >>> w = step(jnp.ones((8, 4)), jnp.ones((16, 8)))
      >>> w.shape
      (8, 4)
    """
    options = dict(
        mesh=mesh,
        hardware=hardware,
        donate_argnums=donate_argnums,
        time_limit=time_limit,
        devices=devices,
        memory_budget=memory_budget,
        static_argnums=static_argnums,
        static_argnames=static_argnames,
        donate_argnames=donate_argnames,
        in_shardings=in_shardings,
        out_shardings=out_shardings,
        pipeline=pipeline,
        verbose=verbose,
        cache=cache,
        cache_dir=cache_dir,
        remat=remat,
    )
    if fn is None:  # used as @parallelize(...)
        return lambda f: Parallelized(f, **options)
    return Parallelized(fn, **options)
