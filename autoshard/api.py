"""parallelize: the decorator that plans once per input signature and runs sharded."""

from __future__ import annotations

import functools
import time
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding

from autoshard import cache as _cache
from autoshard import progress as _progress
from autoshard import search as _search
from autoshard.cost_model.hardware import Hardware
from autoshard.mesh import candidate_meshes, default_hardware
from autoshard.passes.annotate import interpreter
from autoshard.passes.graph import build_graph
from autoshard.passes.trace import trace
from autoshard.plan import Cost, Entry, Plan, SolverStats

# Fraction of device memory a default budget leaves free for what the memory model does
# not see: XLA's own buffers, the compiled program, fragmentation.
MEMORY_HEADROOM = 0.1


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
        verbose=True,
        cache=None,
        cache_dir=None,
    ):
        functools.update_wrapper(self, fn)
        self.verbose = verbose
        self.cache_dir = _cache.cache_dir(cache, cache_dir)
        self._last_args = None
        self.fn = fn
        self.mesh = mesh
        self.devices = list(devices) if devices is not None else jax.devices()
        self.hardware = hardware or default_hardware(self.devices)
        if not isinstance(self.hardware, Hardware):
            raise TypeError(
                f"autoshard: hardware must be an autoshard.Hardware, got {type(hardware).__name__}"
            )
        self.donate_argnums = (
            (donate_argnums,) if isinstance(donate_argnums, int) else tuple(donate_argnums)
        )
        self.time_limit = time_limit
        if memory_budget is not None and not memory_budget > 0:
            raise ValueError(
                f"autoshard: memory_budget={memory_budget!r} must be a positive number of bytes "
                "per device (or None for the hardware's memory less headroom)."
            )
        self.memory_budget = memory_budget
        self._cache: dict = {}
        self.trace_count = 0
        self.solve_count = 0

    def _signature(self, args) -> tuple:
        leaves, tree = jax.tree_util.tree_flatten(args)
        key = []
        for x in leaves:
            if hasattr(x, "shape") and hasattr(x, "dtype"):
                key.append(
                    (tuple(x.shape), str(np.dtype(x.dtype)), bool(getattr(x, "weak_type", False)))
                )
            else:
                key.append((type(x).__name__,))
        return tree, tuple(key)

    def _entry(self, args):
        sig = self._signature(args)
        if sig not in self._cache:
            t0 = time.perf_counter()
            self._cache[sig] = self._plan_and_build(args)
            if self._last_args is not None:
                changes = _progress.changed_inputs(self._last_args, args)
                _progress.replanned(self._name(), changes, time.perf_counter() - t0, self.verbose)
            self._last_args = jax.tree_util.tree_map(_abstract, args)
        return self._cache[sig]

    def _name(self) -> str:
        return getattr(self.fn, "__name__", "step")

    def _plan_and_build(self, args):
        t0 = time.perf_counter()
        traced = trace(self.fn, args)
        self.trace_count += 1
        graph = build_graph(traced)
        meshes = candidate_meshes(self.mesh, self.devices, self.hardware)
        donated = _donated_leaves(traced, self.donate_argnums)
        budget = self.memory_budget
        if budget is None:
            budget = self.hardware.memory * (1 - MEMORY_HEADROOM)
        key = None
        if self.cache_dir is not None:
            key = _cache.plan_key(
                traced,
                meshes,
                self.hardware,
                budget=budget,
                time_limit=self.time_limit,
                donated=sorted(donated),
            )
        plan = _cache.load(self.cache_dir, key, traced, meshes) if key else None
        if plan is None:
            progress = _progress.Progress(self._name(), self.verbose)
            mp, tried = _search.search(
                graph, meshes, self.hardware, self.time_limit, budget, donated, progress=progress
            )
            self.solve_count += 1
            plan = _make_plan(mp, graph, tried, time.perf_counter() - t0)
            progress.done(plan.solver.mesh_shape)
            _cache.store(self.cache_dir, key, plan)
        run = interpreter(graph, plan.layout, plan.mesh)
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
            donate_argnums=self.donate_argnums,
        )
        return plan, jitted

    def plan(self, *args) -> Plan:
        """The plan for these arguments (arrays or ShapeDtypeStructs), without running."""
        return self._entry(args)[0]

    def lower(self, *args):
        """jax Lowered of the sharded step: `.compile().as_text()` shows the collectives."""
        return self._entry(args)[1].lower(*args)

    def __call__(self, *args):
        return self._entry(args)[1](*args)


def _abstract(x):
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x


def _donated_leaves(traced, donate_argnums) -> frozenset[int]:
    """Flat input indices of the leaves of the donated arguments."""
    counts = [t.num_leaves for t in traced.in_tree.children()]
    starts = np.cumsum([0, *counts])
    return frozenset(
        i for a in donate_argnums if a < len(counts) for i in range(starts[a], starts[a + 1])
    )


def _is_p(x) -> bool:
    return isinstance(x, jax.sharding.PartitionSpec)


def _flat_out_specs(plan: Plan):
    return jax.tree_util.tree_leaves(plan.out_specs, is_leaf=_is_p)


def _make_plan(mp: _search.MeshPlan, graph, tried, plan_time) -> Plan:
    layout = mp.layout()
    names = mp.mesh.axis_names
    traced = graph.traced
    in_flat = _search.specs_of(graph.inputs, layout, names)
    out_flat = [
        s if s is not None else jax.sharding.PartitionSpec()
        for s in _search.specs_of(graph.outputs, layout, names)
    ]
    preds = _search.predicted_collectives(mp, layout)
    collectives: dict[str, tuple[int, float]] = {}
    comm_bytes: dict[str, float] = {}
    combined = _search.combine(mp, preds)
    for _, c in combined:
        n0, b0 = collectives.get(c.kind, (0, 0.0))
        collectives[c.kind] = (n0 + 1, b0 + c.nbytes)
        comm_bytes[c.kind] = comm_bytes.get(c.kind, 0.0) + c.nbytes
    compute, comm = _search.times(mp, combined)
    memory = mp.memory()
    cost = Cost(mp.result.objective, compute, comm, comm_bytes, collectives, memory)
    r = mp.result
    stats = SolverStats(
        tuple(mp.mesh.devices.shape),
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
        Entry(p, tuple(a.shape), str(np.dtype(a.dtype)), s)
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
    verbose: bool = True,
    cache: bool | None = None,
    cache_dir: str | None = None,
) -> Any:
    """Run a single-device training step sharded over all visible devices.

    The step is traced once per input signature; autoshard enumerates how every
    tensor can be split, solves an ILP over communication and compute costs for
    each candidate mesh, and runs the cheapest plan with `jax.jit` shardings.

    Args:
      fn: the step, e.g. `train_step(state, batch) -> (state, metrics)`.
      mesh: None (try every 1-D/2-D/3-D mesh of the devices), a shape tuple such as
        (2, 4), or a `jax.sharding.Mesh` (its devices and axis names are kept).
      hardware: `autoshard.Hardware` to price plans with; default from the devices.
      donate_argnums: arguments whose buffers the step may reuse (e.g. 0 for state).
      time_limit: seconds the ILP solver may spend per mesh before its best answer.
      devices: devices to use (default `jax.devices()`).
      memory_budget: bytes per device no plan may exceed (arguments, outputs that do
        not reuse a donated buffer, and the peak of live intermediates, as
        `plan.cost.memory["total"]` reports it). Default: the hardware's memory less
        `MEMORY_HEADROOM` (10%) for what the model does not see (XLA's own buffers,
        fragmentation). Under a tight budget the plan splits parameters and
        optimizer state over the data axis (ZeRO/FSDP); if no plan fits,
        `autoshard.MemoryBudgetError` names the least memory reachable and what
        dominates it.
      verbose: planning that takes more than about 2 s reports its progress (and a
        re-plan for new input shapes one line) on the "autoshard" logger; False
        keeps it quiet.
      cache: keep plans on disk and reuse them when the same step is planned again
        with the same meshes, hardware and options (default on unless
        `AUTOSHARD_CACHE=0`); False turns it off.
      cache_dir: where plans are kept (default `$AUTOSHARD_CACHE_DIR`, else
        `$XDG_CACHE_HOME/autoshard` or `~/.cache/autoshard`).

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
    if fn is None:
        return lambda f: parallelize(
            f,
            mesh=mesh,
            hardware=hardware,
            donate_argnums=donate_argnums,
            time_limit=time_limit,
            devices=devices,
            memory_budget=memory_budget,
            verbose=verbose,
            cache=cache,
            cache_dir=cache_dir,
        )
    return Parallelized(
        fn,
        mesh,
        hardware,
        donate_argnums,
        time_limit,
        devices,
        memory_budget,
        verbose,
        cache,
        cache_dir,
    )
