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
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from autoshard.cost_model.resharding import Spec
from autoshard.passes import jax_core
from autoshard.passes.graph import Lit, OpGraph


@dataclass(frozen=True)
class Layout:
    """The plan as layouts: every value's spec, and every operation's operand specs."""

    value_specs: tuple[Spec, ...]
    operand_specs: tuple[tuple[Spec | None, ...], ...]  # per graph node


def partition_spec(spec: Spec, names) -> PartitionSpec:
    """(( 0,), (), (1, 2)) -> P('x', None, ('y', 'z'))."""
    dims = [
        None if not d else names[d[0]] if len(d) == 1 else tuple(names[a] for a in d) for d in spec
    ]
    while dims and dims[-1] is None:
        dims.pop()
    return PartitionSpec(*dims)


def interpreter(graph: OpGraph, layout: Layout, mesh: jax.sharding.Mesh):
    """A function of the flat inputs that evaluates graph under the layout."""
    names = mesh.axis_names

    def constrain(x, spec):
        if spec is None or np.ndim(x) == 0:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, partition_spec(spec, names)))

    def run(*flat_args: Any) -> list[Any]:
        env: dict[int, Any] = dict(zip(graph.inputs, flat_args, strict=True))
        env.update({v: c for v, c in graph.consts})
        read = lambda r: r.value if isinstance(r, Lit) else env[r]
        for node in graph.nodes:
            ins = []
            for r, want in zip(node.inputs, layout.operand_specs[node.id], strict=True):
                x = read(r)
                if not isinstance(r, Lit) and want != layout.value_specs[r]:
                    x = constrain(x, want)
                ins.append(x)
            outs = jax_core.bind(node.primitive, ins, node.params)
            for v, x in zip(node.outputs, outs, strict=True):
                env[v] = constrain(x, layout.value_specs[v])
        return [read(r) for r in graph.outputs]

    return run
