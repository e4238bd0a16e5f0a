"""Plan -> a function that runs the same operations with the planned shardings.

The graph is re-interpreted operation by operation (jax's "custom interpreter"
loop): operands whose planned layout differs from the one the operation was planned
to take are constrained first (the resharding the plan paid for), and every result
is constrained to its planned layout. Numerics are those of the original step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from autoshard.cost_model.resharding import Spec
from autoshard.passes import jax_core
from autoshard.passes.graph import Lit, OpGraph
from autoshard.passes.rules.families import SCATTERABLE


@dataclass(frozen=True)
class Layout:
    """The plan as layouts: every value's spec, and every operation's operand specs.

    scatters: per graph node, (output dim, mesh axes) when its partial sums are
    reduce-scattered onto that dim, else None.
    """

    value_specs: tuple[Spec, ...]
    operand_specs: tuple[tuple[Spec | None, ...], ...]  # per graph node
    scatters: tuple[tuple[int, tuple[int, ...]] | None, ...] = ()


def partition_spec(spec: Spec, names) -> PartitionSpec:
    """(( 0,), (), (1, 2)) -> P('x', None, ('y', 'z'))."""
    dims = [
        None if not d else names[d[0]] if len(d) == 1 else tuple(names[a] for a in d) for d in spec
    ]
    while dims and dims[-1] is None:
        dims.pop()
    return PartitionSpec(*dims)


def interpreter(graph: OpGraph, layout: Layout, mesh: jax.sharding.Mesh, runners=None):
    """A function of the flat inputs that evaluates graph under the layout. A scan
    planned through its body runs as `jax.lax.scan` over the same body operations,
    with the body's values constrained to their planned layouts; a loop id in
    `runners` runs as runners[id](operands) -> results instead (pipeline stages), or
    runners[id](operands, env) if the runner has a true `reads_env` attribute (it
    reads values computed before the loop)."""
    runners = runners or {}
    names = mesh.axis_names
    specs = layout.value_specs
    regions: dict[int, list] = {}
    for node in graph.nodes:
        regions.setdefault(node.region, []).append(node)

    def constrain(x, spec):
        if spec is None or np.ndim(x) == 0:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, partition_spec(spec, names)))

    def read(env, r):
        return r.value if isinstance(r, Lit) else env[r]

    def as_array(x, info, shape):
        """A literal where the loop needs an array (a carry, a stacked result)."""
        return jnp.full(shape, x, info.dtype) if np.ndim(x) < len(shape) or np.isscalar(x) else x

    def operand(env, node, pos):
        """Operand pos of node, resharded to the layout the node was planned to take."""
        r, want = node.inputs[pos], layout.operand_specs[node.id][pos]
        x = read(env, r)
        if not isinstance(r, Lit) and want != specs[r]:
            x = constrain(x, want)
        return x

    def run_loop(env, loop) -> None:
        enter = [graph.nodes[i] for i in loop.enter]
        exits = [graph.nodes[i] for i in loop.exit]
        body_in = [n.outputs[0] for n in enter]
        outer = [operand(env, n, 0) for n in enter]
        nc, nk = loop.num_consts, loop.num_carry
        values = graph.values
        if loop.id in runners:
            outer = [
                as_array(x, values[v], values[v].shape) if i < nc + nk else x
                for i, (x, v) in enumerate(zip(outer, body_in, strict=True))
            ]
            run = runners[loop.id]
            res = run(outer, env) if getattr(run, "reads_env", False) else run(outer)
            for n, x in zip(exits, res, strict=True):
                env[n.outputs[0]] = constrain(x, specs[n.outputs[0]])
            return
        carry_in = body_in[nc : nc + nk]

        def carry(x, v):
            return constrain(as_array(x, values[v], values[v].shape), specs[v])

        def body(carries, xs):
            inner = dict(env)
            for v, x in zip(body_in, [*outer[:nc], *carries, *xs], strict=True):
                inner[v] = constrain(x, specs[v])
            run_region(inner, loop.id)
            # carries keep the layout they entered with (the plan ties them)
            new = [
                carry(read(inner, n.inputs[0]), v)
                for n, v in zip(exits[:nk], carry_in, strict=True)
            ]
            ys = [
                as_array(operand(inner, n, 0), values[n.outputs[0]], values[n.outputs[0]].shape[1:])
                for n in exits[nk:]
            ]
            return new, ys

        init = [carry(x, v) for x, v in zip(outer[nc : nc + nk], carry_in, strict=True)]
        p = loop.params
        final, ys = jax.lax.scan(
            body, init, outer[nc + nk :], p["length"], reverse=p["reverse"], unroll=p["unroll"]
        )
        for n, x in zip(exits, [*final, *ys], strict=True):
            env[n.outputs[0]] = constrain(x, specs[n.outputs[0]])

    def scattered(node, ins):
        """node's result, each device computing its partial sum and reduce-scattering."""
        dim, axes = layout.scatters[node.id]
        arrays = [p for p, r in enumerate(node.inputs) if not isinstance(r, Lit)]

        def local(*xs):
            full = list(ins)
            for p, x in zip(arrays, xs, strict=True):
                full[p] = x
            y = jax_core.bind(node.primitive, full, node.params)[0]
            return jax.lax.psum_scatter(
                y, tuple(names[a] for a in axes), scatter_dimension=dim, tiled=True
            )

        in_specs = tuple(partition_spec(layout.operand_specs[node.id][p], names) for p in arrays)
        out_spec = partition_spec(specs[node.outputs[0]], names)
        return [
            jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_spec, check_vma=False)(
                *(ins[p] for p in arrays)
            )
        ]

    def run_region(env, region: int) -> None:
        done: set[int] = set()
        for node in regions.get(region, ()):
            if node.boundary >= 0:
                if node.boundary not in done:
                    done.add(node.boundary)
                    run_loop(env, graph.loops[node.boundary])
                continue
            ins = [operand(env, node, pos) for pos in range(len(node.inputs))]
            if layout.scatters and layout.scatters[node.id] and node.name in SCATTERABLE:
                outs = scattered(node, ins)
            elif node.name == "sharding_constraint":
                # a user pin: the plan gives this value the pinned layout (autoshard.pins),
                # applied below on the planned mesh rather than the step's own
                outs = ins
            else:
                outs = jax_core.bind(node.primitive, ins, node.params)
            for v, x in zip(node.outputs, outs, strict=True):
                env[v] = constrain(x, specs[v])

    def run(*flat_args: Any) -> list[Any]:
        env: dict[int, Any] = dict(zip(graph.inputs, flat_args, strict=True))
        env.update({v: c for v, c in graph.consts})
        run_region(env, -1)
        return [read(env, r) for r in graph.outputs]

    return run
