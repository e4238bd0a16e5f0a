"""Plans on disk: re-running the same script loads its plan instead of solving again.

A plan is stored under a key made of everything that decides it: the traced program
(the jaxpr's text), the candidate meshes (shapes, axis names, devices), the hardware
numbers, the planning options (memory budget, solver time limit, donated arguments)
and autoshard's own source (a new version never reads an old plan). The directory is
``$AUTOSHARD_CACHE_DIR``, else ``$XDG_CACHE_HOME/autoshard``, else
``~/.cache/autoshard``; ``parallelize(..., cache_dir=...)`` overrides it, and
``cache=False`` (or ``AUTOSHARD_CACHE=0``) turns the cache off.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import pathlib
import pickle
from dataclasses import dataclass

import jax

logger = logging.getLogger("autoshard")

ENV_DIR = "AUTOSHARD_CACHE_DIR"
ENV_OFF = "AUTOSHARD_CACHE"
# Bumped when the stored record changes shape.
FORMAT = 3


def cache_dir(enabled: bool | None = None, path: str | os.PathLike | None = None):
    """The directory plans are kept in, or None when the cache is off.

    Args:
      enabled: False turns the cache off; None: on if a path is given, else unless
        ``AUTOSHARD_CACHE=0``.
      path: a directory; default ``$AUTOSHARD_CACHE_DIR``, ``$XDG_CACHE_HOME/autoshard``
        or ``~/.cache/autoshard``.

    Returns:
      A pathlib.Path, or None.

    Example:
      >>> cache_dir(False) is None
      True
    """
    if enabled is False:
        return None
    if path is not None:
        return pathlib.Path(path)
    if enabled is None and os.environ.get(ENV_OFF, "1") == "0":
        return None
    if os.environ.get(ENV_DIR):
        return pathlib.Path(os.environ[ENV_DIR])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(base) / "autoshard"


@functools.cache
def _source_hash() -> str:
    """autoshard's own code: a changed planner never reuses an old plan."""
    import autoshard
    from autoshard import cost_model, passes

    h = hashlib.sha256()
    for pkg in (autoshard, passes, cost_model):
        root = pathlib.Path(pkg.__file__).parent
        for f in sorted(root.rglob("*.py")):
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def plan_key(traced, meshes, hardware, **options) -> str:
    """A hex digest of everything a plan depends on.

    Example:
      >>> key = plan_key(traced, meshes, hw, budget=None)  # doctest: +SKIP
    """
    h = hashlib.sha256()
    for part in (
        str(FORMAT),
        _source_hash(),
        str(traced.jaxpr),
        repr(traced.in_paths),
        repr(
            [(tuple(m.devices.shape), m.axis_names, [d.id for d in m.devices.flat]) for m in meshes]
        ),
        repr([d.device_kind for d in meshes[0].devices.flat[:1]]) if meshes else "",
        repr(hardware),
        repr(sorted(options.items())),
    ):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class Stored:
    """What a plan needs besides the traced step: the mesh it chose (by shape and
    names) and everything else of the Plan, with flat spec lists."""

    mesh_shape: tuple[int, ...]
    mesh_names: tuple[str, ...]
    in_flat: list
    out_flat: list
    cost: object
    solver: object
    inputs: tuple
    layout: object
    pipeline: object = None  # PipelineChoice of a pipelined plan
    remat: object = None  # RematChoice of a rematerialised step


def store(directory, key: str, plan) -> None:
    """Write a plan (best effort: a cache that cannot be written only logs it)."""
    from autoshard.plan import _is_spec

    if directory is None:
        return
    rec = Stored(
        tuple(plan.mesh.devices.shape),
        tuple(plan.mesh.axis_names),
        jax.tree_util.tree_leaves(plan.in_specs, is_leaf=_is_spec),
        jax.tree_util.tree_leaves(plan.out_specs, is_leaf=_is_spec),
        plan.cost,
        plan.solver,
        plan.inputs,
        plan.layout,
        plan.pipeline,
        plan.remat,
    )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / f".{key}.{os.getpid()}.tmp"
        tmp.write_bytes(pickle.dumps(rec))
        os.replace(tmp, directory / f"{key}.plan")
    except OSError as e:
        logger.warning("could not write the plan cache in %s: %s", directory, e)


def load(directory, key: str, traced, meshes):
    """The stored plan for key, on the matching candidate mesh, or None."""
    from autoshard.plan import Plan

    if directory is None:
        return None
    path = directory / f"{key}.plan"
    try:
        rec = pickle.loads(path.read_bytes())
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, TypeError):
        return None
    if not isinstance(rec, Stored):
        return None
    mesh = next(
        (
            m
            for m in meshes
            if tuple(m.devices.shape) == rec.mesh_shape and tuple(m.axis_names) == rec.mesh_names
        ),
        None,
    )
    if mesh is None:
        return None
    return Plan(
        mesh,
        jax.tree_util.tree_unflatten(traced.in_tree, rec.in_flat),
        jax.tree_util.tree_unflatten(traced.out_tree, rec.out_flat),
        rec.cost,
        rec.solver,
        rec.inputs,
        rec.layout,
        rec.pipeline,
        rec.remat,
    )
