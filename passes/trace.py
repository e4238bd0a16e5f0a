"""Trace a training step to a closed jaxpr, with named, validated inputs."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

_SCALARS = (bool, int, float, complex, np.generic)


@dataclass(frozen=True)
class Traced:
    """A traced step: its jaxpr and the flat leaves on both sides, with readable paths."""

    jaxpr: Any  # ClosedJaxpr
    in_tree: Any
    out_tree: Any
    in_paths: tuple[str, ...]
    out_paths: tuple[str, ...]
    in_avals: tuple[jax.ShapeDtypeStruct, ...]
    out_avals: tuple[jax.ShapeDtypeStruct, ...]


def arg_names(fn: Any, nargs: int) -> list[str]:
    """Names of the first `nargs` positional parameters of fn (arg{i} where unknown)."""
    try:
        params = [
            p.name
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"arg{i}" for i in range(nargs)]


def leaf_paths(args: tuple, names: list[str]) -> list[str]:
    """Readable path of every leaf, rooted at the argument's name: state.params['w']."""
    paths = []
    for path, _ in jax.tree_util.tree_flatten_with_path(args)[0]:
        head, rest = path[0], path[1:]
        paths.append(names[head.idx] + jax.tree_util.keystr(rest))
    return paths


def to_abstract(leaf: Any, path: str) -> Any:
    """Check one input leaf. Arrays become plain ShapeDtypeStructs (their current
    shardings must not leak into the single-device jaxpr); Python numbers stay."""
    if isinstance(leaf, _SCALARS):
        return leaf
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
        weak = bool(getattr(leaf, "weak_type", False))
        return jax.ShapeDtypeStruct(tuple(leaf.shape), leaf.dtype, weak_type=weak)
    raise TypeError(
        f"autoshard: input leaf {path} is a {type(leaf).__name__}, not an array. Every leaf "
        "of the step's arguments is traced as an array: pass arrays, jax.ShapeDtypeStruct or "
        "Python numbers, and close over other values (e.g. with functools.partial)."
    )


def trace(fn: Any, args: tuple, names: tuple[str, ...] | None = None) -> Traced:
    """Trace fn(*args) to a closed jaxpr.

    Args:
      fn: the single-device step.
      args: its positional arguments (arrays or ShapeDtypeStructs, any pytree).
      names: a name per argument for the leaf paths (default: fn's parameter names).

    Returns:
      A Traced record with the jaxpr and the flat input/output paths and avals.

    Example:
      >>> import jax.numpy as jnp
      >>> t = trace(lambda w, x: x @ w, (jnp.ones((4, 2)), jnp.ones((3, 4))))
      >>> t.in_paths, t.out_avals[0].shape
      (('w', 'x'), (3, 2))
    """
    names = list(names) if names is not None else arg_names(fn, len(args))
    leaves, in_tree = jax.tree_util.tree_flatten(args)
    paths = leaf_paths(args, names)
    leaves = [to_abstract(x, p) for x, p in zip(leaves, paths, strict=True)]
    args = jax.tree_util.tree_unflatten(in_tree, leaves)
    closed, out_shape = jax.make_jaxpr(fn, return_shape=True)(*args)
    out_flat, out_tree = jax.tree_util.tree_flatten_with_path(out_shape)
    out_paths = tuple("out" + jax.tree_util.keystr(p) for p, _ in out_flat)
    in_avals = tuple(jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars)
    out_avals = tuple(jax.ShapeDtypeStruct(s.shape, s.dtype) for _, s in out_flat)
    return Traced(closed, in_tree, out_tree, tuple(paths), out_paths, in_avals, out_avals)
