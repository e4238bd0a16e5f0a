"""The step's arguments as the planner sees them, and back.

A call `step(*args, **kwargs)` is split the way `jax.jit` and `nnx.jit` split it:

- static arguments (`static_argnums` / `static_argnames`) become part of the cache
  key and are closed over; the rest are *dynamic* entries, traced as arrays;
- Flax NNX objects (modules, optimizers, `nnx.Rngs`; see `is_nnx_object`) anywhere in the
  dynamic arguments are split into one `nnx.State` with `nnx.split`, their structure
  (the `GraphDef`) going into the cache key; the pure step merges them into fresh
  objects, runs the user's step, splits them again and returns the new state, which
  `finish` writes back into the caller's objects with `nnx.update` (parameters,
  optimizer state and step, batch statistics, RNG counts);
- keyword arguments are dynamic entries of their own, after the positional ones.

The signature of a call is its abstract value, as for `jax.jit`: shapes, dtypes and
weak types of the dynamic leaves (a Python scalar is a weakly typed rank-0 array),
plus the static part.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax import nnx
from flax.nnx import graphlib

PY_SCALARS = (bool, int, float, complex)
# Name of the dynamic entry that holds the state of every NNX graph node.
NNX_STATE = ""


@jax.tree_util.register_static
@dataclass(frozen=True)
class NodeRef:
    """Where a graph node sat in an argument (a pytree leaf-less placeholder)."""

    index: int


@dataclass(frozen=True)
class Conventions:
    """How the step is called, resolved against its signature as `jax.jit` does."""

    params: tuple[str, ...]  # positional parameter names
    static_argnums: frozenset[int]
    static_argnames: frozenset[str]
    donate_argnums: frozenset[int]
    donate_argnames: frozenset[str]


def _as_set(x, kind) -> frozenset:
    if x is None:
        return frozenset()
    return frozenset((x,) if isinstance(x, kind) else x)


def conventions(
    fn: Callable, static_argnums=(), static_argnames=(), donate_argnums=(), donate_argnames=()
) -> Conventions:
    """Resolve static/donated argument numbers and names against fn's signature:
    a number names the parameter at that position and the other way round.

    Example:
      >>> c = conventions(lambda state, batch, train: 0, static_argnames="train")
      >>> sorted(c.static_argnums), sorted(c.static_argnames)
      ([2], ['train'])
    """
    try:
        sig = inspect.signature(fn).parameters.values()
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        params = tuple(p.name for p in sig if p.kind in positional)
    except (TypeError, ValueError):
        params = ()

    def both(nums, names):
        nums, names = _as_set(nums, int), _as_set(names, str)
        nums |= {params.index(n) for n in names if n in params}
        names |= {params[i] for i in nums if 0 <= i < len(params)}
        return frozenset(nums), frozenset(names)

    s_nums, s_names = both(static_argnums, static_argnames)
    d_nums, d_names = both(donate_argnums, donate_argnames)
    if s_nums & d_nums or s_names & d_names:
        raise ValueError(
            "autoshard: an argument cannot be both static and donated: "
            f"{sorted(s_names & d_names) or sorted(s_nums & d_nums)}."
        )
    return Conventions(params, s_nums, s_names, d_nums, d_names)


@dataclass(frozen=True, eq=False)
class Call:
    """One call, split.

    static: hashable part of the cache key (static values, keyword names, structure).
    dyn: the dynamic entries, traced as arrays: the NNX state (if any graph node was
      passed), then positional arguments, then keyword values (sorted by name).
    names: a readable name per dynamic entry.
    donated: indices into dyn of donated entries.
    nodes: name -> the caller's graph node, updated after the call.
    """

    static: tuple
    dyn: tuple
    names: tuple[str, ...]
    donated: tuple[int, ...]
    nodes: dict
    graphdef: Any
    pure: Callable

    def signature(self) -> tuple:
        """The abstract value of the call (what a plan is cached under)."""
        leaves, tree = jax.tree_util.tree_flatten(self.dyn)
        return self.static, tree, tuple(abstract_key(x) for x in leaves)

    def finish(self, result):
        """The user's output; NNX updates written back into the caller's objects."""
        if self.graphdef is None:
            return result
        out, state = result
        nnx.update(self.nodes, state)
        return out


def abstract_key(x) -> tuple:
    """(shape, dtype, weak_type) of one leaf as jax.jit abstracts it."""
    if isinstance(x, PY_SCALARS):
        return (), str(jax.dtypes.canonicalize_dtype(type(x))), True
    if isinstance(x, np.generic):
        return (), str(jax.dtypes.canonicalize_dtype(x.dtype)), False
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False))
    return (type(x).__name__,)


def _hashable(value, name: str):
    try:
        hash(value)
    except TypeError as e:
        raise TypeError(
            f"autoshard: static argument '{name}' is a {type(value).__name__}, which is not "
            "hashable; static arguments key the plan cache (pass a tuple, a frozen "
            "dataclass or a number, or make it a dynamic argument)."
        ) from e
    return value


def is_nnx_object(x) -> bool:
    """A Flax NNX graph node that owns state (module, optimizer, Rngs, nnx.Pytree).
    A bare Variable is not one: inside an `nnx.State` it is a pytree of its value, as
    the functional `nnx.split` / `nnx.merge` style passes it (and as jax.jit sees it)."""
    return graphlib.is_graph_node(x) and not isinstance(x, nnx.Variable)


def _extract_nodes(value, name: str, found: dict[int, tuple[int, str, Any]]):
    """value with every graph node replaced by a NodeRef (one index per object)."""
    leaves, tree = jax.tree_util.tree_flatten_with_path(value, is_leaf=is_nnx_object)
    out = []
    for path, leaf in leaves:
        if is_nnx_object(leaf):
            if id(leaf) not in found:
                found[id(leaf)] = (len(found), name + jax.tree_util.keystr(path), leaf)
            leaf = NodeRef(found[id(leaf)][0])
        out.append(leaf)
    return jax.tree_util.tree_unflatten(tree, out)


def split_call(fn: Callable, conv: Conventions, args: tuple, kwargs: dict) -> Call:
    """Split one call into static and dynamic parts (see the module docstring).

    Args:
      fn: the user's step.
      conv: its resolved calling conventions.
      args, kwargs: the call's arguments.

    Returns:
      A Call: `call.pure(*call.dyn)` runs the step on the dynamic entries alone, and
      `call.finish(result)` merges NNX updates back and gives the user's output.

    Example:
      >>> import jax.numpy as jnp
      >>> step = lambda w, x, train: w * x if train else w
      >>> call = split_call(step, conventions(step, static_argnames="train"),
      ...                   (jnp.ones(2),), {"x": 3.0, "train": True})
      >>> call.names, call.pure(*call.dyn).tolist()
      (('w', 'x'), [3.0, 3.0])
    """
    entries, statics = [], []
    for i, a in enumerate(args):
        name = conv.params[i] if i < len(conv.params) else f"arg{i}"
        if i in conv.static_argnums:
            statics.append((i, _hashable(a, name)))
        else:
            entries.append((i, name, a, i in conv.donate_argnums))
    kw_static = []
    for k in sorted(kwargs):
        if k in conv.static_argnames:
            kw_static.append((k, _hashable(kwargs[k], k)))
        else:
            entries.append((k, k, kwargs[k], k in conv.donate_argnames))
    found: dict[int, tuple[int, str, Any]] = {}
    values = [_extract_nodes(v, name, found) for _, name, v, _ in entries]
    holders = [e[3] for e, v in zip(entries, values, strict=True) if has_nodes(v)]
    nodes = {name: node for _, name, node in sorted(found.values(), key=lambda t: t[0])}
    graphdef, dyn, names = None, tuple(values), tuple(e[1] for e in entries)
    donated = [k for k, e in enumerate(entries) if e[3]]
    if nodes:
        graphdef, state = nnx.split(nodes)
        dyn, names = (state, *dyn), (NNX_STATE, *names)
        donated = ([0] if all(holders) else []) + [k + 1 for k in donated]
    where = tuple(e[0] for e in entries)
    static = (tuple(statics), tuple(kw_static), where, len(args), graphdef)
    pure = _pure(fn, static, tuple(nodes))
    return Call(static, dyn, names, tuple(donated), nodes, graphdef, pure)


def has_nodes(value) -> bool:
    """Whether an argument (as split_call leaves it) held NNX objects.

    Example:
      >>> has_nodes({"model": NodeRef(0), "lr": 0.1}), has_nodes({"lr": 0.1})
      (True, False)
    """
    leaves = jax.tree_util.tree_leaves(value, is_leaf=lambda x: isinstance(x, NodeRef))
    return any(isinstance(x, NodeRef) for x in leaves)


def _pure(fn: Callable, static: tuple, node_names: tuple[str, ...]) -> Callable:
    """The step as a function of the dynamic entries only."""
    statics, kw_static, where, nargs, graphdef = static

    def pure(*dyn):
        nodes = None
        if graphdef is not None:
            nodes = nnx.merge(graphdef, dyn[0])
            dyn = dyn[1:]
            objs = [nodes[n] for n in node_names]
            dyn = jax.tree_util.tree_map(
                lambda x: objs[x.index] if isinstance(x, NodeRef) else x,
                dyn,
                is_leaf=lambda x: isinstance(x, NodeRef),
            )
        pos: list = [None] * nargs
        kwargs = dict(kw_static)
        for i, v in statics:
            pos[i] = v
        for w, v in zip(where, dyn, strict=True):
            if isinstance(w, int):
                pos[w] = v
            else:
                kwargs[w] = v
        out = fn(*pos, **kwargs)
        if nodes is None:
            return out
        _check_no_nodes(out)
        new_graphdef, state = nnx.split(nodes)
        if new_graphdef != graphdef:
            raise ValueError(
                "autoshard: the step changed the structure of its NNX objects (added, "
                "removed or replaced a submodule or variable, or set a plain Python "
                "attribute); such a change cannot be carried out of a compiled step. "
                "Create variables before the step and only assign to their values inside it."
            )
        return out, state

    return pure


def _check_no_nodes(out) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(out, is_leaf=is_nnx_object)[0]:
        if is_nnx_object(leaf):
            raise TypeError(
                f"autoshard: the step returns an NNX {type(leaf).__name__} at "
                f"out{jax.tree_util.keystr(path)}; return arrays (or `nnx.state(obj)`) and "
                "keep mutating the objects passed in: their updates are merged back."
            )


def place(dyn: tuple, shardings: list) -> tuple:
    """dyn with every array leaf laid out as planned (shardings: one per leaf).

    Leaves already there are passed as they are (no copy, no dispatch); any other
    placement (uncommitted, one device, another mesh or spec, numpy, Python scalars)
    is put there with `jax.device_put`. Abstract values go through unchanged.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> s = jax.sharding.SingleDeviceSharding(jax.devices()[0])
      >>> place((jnp.ones(2), 1.5), [s, s])[1].weak_type
      True
    """
    leaves, tree = jax.tree_util.tree_flatten(dyn)
    out = []
    for x, s in zip(leaves, shardings, strict=True):
        if isinstance(x, jax.Array):
            if x.sharding != s:
                x = jax.device_put(x, s)
        elif isinstance(x, (np.ndarray, np.generic, *PY_SCALARS)):
            # a Python scalar becomes a weakly typed array laid out like the step's
            # outputs, so that the output fed back next time has the same type
            x = jax.device_put(x, s)
        out.append(x)
    return jax.tree_util.tree_unflatten(tree, out)
