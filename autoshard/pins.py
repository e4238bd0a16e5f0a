"""User pins: layouts the user fixes, which the plan is built around.

Three sources, all spelled as `jax.jit` spells them: `in_shardings=` (a pytree prefix
of the positional arguments), `out_shardings=` (a prefix of the output), with `None`
meaning "choose for me" and leaves that are `PartitionSpec`s (axis names of the
planned mesh) or `NamedSharding`s (only their spec is used); and every
`jax.lax.with_sharding_constraint` inside the step. A pinned value's unit keeps only
the strategies that give it the pinned layout; the ILP chooses everything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
from jax.sharding import NamedSharding, PartitionSpec

from autoshard.boundary import Call, has_nodes
from autoshard.cost_model.resharding import Spec
from autoshard.passes.graph import Lit, OpGraph
from autoshard.passes.trace import Traced


class PinError(ValueError):
    """A pinned layout that cannot hold on the mesh."""


def is_pin(x) -> bool:
    return x is None or isinstance(x, PartitionSpec | NamedSharding)


def flat_pins(prefix, tree, what: str, target: str) -> list:
    """One pin (PartitionSpec, NamedSharding or None) per leaf of tree."""
    if prefix is None:
        return [None] * len(jax.tree_util.tree_leaves(tree))
    try:
        full = jax.tree.broadcast(prefix, tree, is_leaf=is_pin)
    except (ValueError, TypeError) as e:
        raise ValueError(
            f"autoshard: {what} must be a pytree prefix of {target} (None, a "
            f"PartitionSpec or a NamedSharding per subtree): {e}"
        ) from e
    # flatten by the argument's own structure: a None field of the argument (say an
    # optional state left out) holds no array, so it takes no pin
    return jax.tree_util.tree_structure(tree).flatten_up_to(full)


def to_spec(pin, mesh, shape: tuple[int, ...], what: str) -> Spec | None:
    """The pin as mesh-axis indices per dimension; None if it leaves a dimension
    unconstrained. Raises PinError naming the tensor, dimension and axis."""
    pspec = pin.spec if isinstance(pin, NamedSharding) else pin
    if any(d is PartitionSpec.UNCONSTRAINED for d in pspec):
        return None
    names, sizes = tuple(mesh.axis_names), dict(mesh.shape)
    if len(pspec) > len(shape):
        raise PinError(
            f"autoshard: the pin {pspec} on {what} {list(shape)} has {len(pspec)} entries "
            f"for {len(shape)} dimensions: give at most one entry per dimension."
        )
    spec, seen = [], set()
    for d, entry in enumerate((*pspec, *([None] * (len(shape) - len(pspec))))):
        axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
        for a in axes:
            if a not in names:
                raise PinError(
                    f"autoshard: the pin {pspec} on {what} names mesh axis '{a}', but the "
                    f"planned mesh has axes {names}: use those names, or pass mesh= a "
                    f"jax.sharding.Mesh with an axis '{a}'."
                )
            if a in seen:
                raise PinError(f"autoshard: the pin {pspec} on {what} uses axis '{a}' twice.")
            seen.add(a)
        group = math.prod(sizes[a] for a in axes)
        if shape[d] % group:
            raise PinError(
                f"autoshard: the pin {pspec} on {what} {list(shape)} cannot hold: dimension "
                f"{d} (size {shape[d]}) does not divide over mesh axes {axes} ({group} "
                "devices). Pick axes whose size divides it, or leave the dimension None."
            )
        spec.append(tuple(names.index(a) for a in axes))
    return tuple(spec)


@dataclass(frozen=True)
class Pins:
    """Pinned values of one traced step: (value id, what, pin) for inputs and outputs;
    the step's own sharding constraints are read from the graph."""

    inputs: tuple[tuple[int, str, object], ...] = ()
    outputs: tuple[tuple[int, str, object], ...] = ()

    def on_mesh(self, graph: OpGraph, mesh) -> dict[int, Spec]:
        """value id -> spec on this mesh, for every pin (raises PinError)."""
        out: dict[int, Spec] = {}
        pinned = [*self.inputs, *self.outputs]
        # constraints inside the step come last: where one names an output, it holds
        # inside and the output is resharded to its own pin on the way out
        pinned += [
            (n.outputs[0], f"with_sharding_constraint #{k}", n.params["sharding"])
            for k, n in enumerate(x for x in graph.nodes if x.name == "sharding_constraint")
        ]
        for v, what, pin in pinned:
            if pin is None or isinstance(v, Lit):
                continue
            spec = to_spec(pin, mesh, graph.values[v].shape, what)
            if spec is not None:
                out[v] = spec
        return out

    def usable(self, graph: OpGraph, meshes) -> tuple[list, list[dict[int, Spec]]]:
        """The candidate meshes every pin holds on, with their pins; the first
        mesh's error if none."""
        keep, specs, errors = [], [], []
        for mesh in meshes:
            try:
                specs.append(self.on_mesh(graph, mesh))
                keep.append(mesh)
            except PinError as e:
                errors.append(e)
        if not keep:
            raise errors[0]
        return keep, specs


def restrict(units: list, graph: OpGraph, pinned: dict[int, Spec]) -> list:
    """units with each pinned value's producer keeping only strategies that give the
    pinned layout. An output no operation can give that way is left to be resharded
    at the end of the step (by the output sharding)."""
    n_in = len(graph.inputs) + len(graph.consts)
    src = {v: (i, 0) for i, v in enumerate(graph.inputs)}
    for node in graph.nodes:
        src.update({o: (n_in + node.id, k) for k, o in enumerate(node.outputs)})
    units = list(units)
    for v, spec in pinned.items():
        u, k = src[v]
        keep = tuple(s for s in units[u] if s.out_specs[k] == spec)
        if keep:
            units[u] = keep
        elif u < n_in or graph.nodes[u - n_in].name == "sharding_constraint":
            raise PinError(
                f"autoshard: no layout of {graph.values[v].name or 'a value'} "
                f"{list(graph.values[v].shape)} gives the pinned spec {spec} (axes per "
                "dimension, listed in mesh order)."
            )
    return units


def _per_entry(call: Call, in_shardings) -> list:
    """in_shardings (one entry per dynamic positional argument, or one for all) as one
    pin prefix per dynamic entry of the call."""
    nnx_state = call.graphdef is not None
    positional = [k + nnx_state for k, w in enumerate(call.static[2]) if isinstance(w, int)]
    per_entry = [None] * len(call.dyn)
    if in_shardings is None:
        return per_entry
    given = in_shardings
    if is_pin(given) or not isinstance(given, tuple | list):
        given = [given] * len(positional)
    if len(given) != len(positional):
        raise ValueError(
            f"autoshard: in_shardings has {len(given)} entries but the step is called with "
            f"{len(positional)} dynamic positional arguments: give one per argument (None to "
            "let autoshard choose), as for jax.jit."
        )
    for k, pin in zip(positional, given, strict=True):
        if pin is not None and has_nodes(call.dyn[k]):
            raise ValueError(
                f"autoshard: in_shardings pins argument '{call.names[k]}', which holds Flax NNX "
                "objects: pin their layout with jax.lax.with_sharding_constraint inside the "
                "step, or pass None for it."
            )
        per_entry[k] = pin
    return per_entry


def user_pins(call: Call, traced: Traced, graph: OpGraph, in_shardings, out_shardings) -> Pins:
    """The user's in_shardings/out_shardings as (value id, path, pin) per flat leaf.

    Example:
      >>> pins = user_pins(call, traced, graph, (None, P("x")), None)  # doctest: +SKIP
    """
    flat_in = []
    for k, (entry, pin) in enumerate(zip(call.dyn, _per_entry(call, in_shardings), strict=True)):
        flat_in += flat_pins(pin, entry, "in_shardings", f"argument '{call.names[k]}'")
    out_prefix = (out_shardings, None) if call.graphdef is not None else out_shardings
    out_shape = jax.tree_util.tree_unflatten(traced.out_tree, list(traced.out_avals))
    flat_out = flat_pins(out_prefix, out_shape, "out_shardings", "the step's output")
    if len(flat_in) != len(graph.inputs):
        raise ValueError(
            f"autoshard: in_shardings gives {len(flat_in)} leaf pins but the step's arguments "
            f"have {len(graph.inputs)} array leaves: give a pytree prefix of the arguments "
            "(None, a PartitionSpec or a NamedSharding per subtree), e.g. one entry per "
            "argument, rather than a tree built over non-array fields."
        )
    ins = zip(graph.inputs, traced.in_paths, flat_in, strict=True)
    outs = zip(graph.outputs, traced.out_paths, flat_out, strict=True)
    return Pins(tuple(ins), tuple(outs))
