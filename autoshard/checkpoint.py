"""Checkpoints that outlive a plan: save a sharded train state with orbax, restore it
under another plan (another mesh shape, another device count).

Orbax writes each array with its global shape, so a checkpoint does not remember how
it was split. Restoring reads each array straight into the layout the new plan gives
it: `restore_target(plan)` is that layout as a pytree of `jax.ShapeDtypeStruct` with
`NamedSharding`s, which is what orbax takes as a restore target. Needs
`orbax-checkpoint` (`pip install "autoshard[checkpoint]"`).

    step = autoshard.parallelize(train_step)
    state, _ = step(state, batch)
    autoshard.checkpoint.save("/ckpt/100", state)
    ...  # later, on another mesh or machine
    step = autoshard.parallelize(train_step, mesh=(2, 4))
    plan = step.plan(abstract_state, abstract_batch)
    state = autoshard.checkpoint.restore("/ckpt/100", plan)
"""

from __future__ import annotations

import os
from typing import Any

import jax

from autoshard.plan import Plan


def _orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "autoshard.checkpoint needs orbax-checkpoint: pip install 'autoshard[checkpoint]'"
        ) from e
    return ocp


def restore_target(plan: Plan, argnum: int = 0) -> Any:
    """The plan's layout of one argument as an orbax restore target.

    Args:
      plan: a plan from `step.plan(...)` (a `Plan.load`ed plan has lost the argument
        pytree structure, so plan again, with ShapeDtypeStructs if you like).
      argnum: which argument of the step (0: the train state).

    Returns:
      A pytree shaped like the argument, of `jax.ShapeDtypeStruct(shape, dtype,
      sharding=NamedSharding(plan.mesh, spec))`.

    Example:
      >>> target = restore_target(step.plan(state, batch))    # doctest: +SKIP
      >>> ocp.StandardCheckpointer().restore(path, target)    # doctest: +SKIP
    """
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)
    if not isinstance(plan.in_specs, tuple):
        raise ValueError(
            "autoshard: this plan has no argument structure (it was read with Plan.load); "
            "plan the step again with step.plan(*args) to restore into its layout"
        )
    sizes = [len(jax.tree_util.tree_leaves(a, is_leaf=is_spec)) for a in plan.in_specs]
    if not 0 <= argnum < len(sizes):
        raise ValueError(f"autoshard: argnum={argnum}, but the step takes {len(sizes)} arguments")
    start = sum(sizes[:argnum])
    entries = iter(plan.inputs[start : start + sizes[argnum]])

    def leaf(spec):
        e = next(entries)
        sharding = jax.sharding.NamedSharding(plan.mesh, spec)
        return jax.ShapeDtypeStruct(e.shape, e.dtype, sharding=sharding)

    return jax.tree_util.tree_map(leaf, plan.in_specs[argnum], is_leaf=is_spec)


def save(directory: str | os.PathLike, tree: Any, force: bool = False) -> None:
    """Save a (sharded) pytree of arrays with orbax and wait until it is written.

    Args:
      directory: a new directory (absolute path, or made absolute here).
      tree: the train state, as the step returns it.
      force: overwrite an existing checkpoint.

    Returns:
      None.

    Example:
      >>> save("/tmp/ckpt/1", state)                          # doctest: +SKIP
    """
    ocp = _orbax()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(directory), tree, force=force)
        ckptr.wait_until_finished()


def restore(directory: str | os.PathLike, plan: Plan, argnum: int = 0) -> Any:
    """Read a checkpoint straight into the layout `plan` gives argument `argnum`.

    Args:
      directory: what `save` wrote (under any plan, mesh or device count).
      plan: the plan to run with next.
      argnum: which argument of the step the checkpoint holds (0: the train state).

    Returns:
      The pytree, every array sharded as the plan wants it (so the step runs with no
      resharding on entry).

    Example:
      >>> state = restore("/tmp/ckpt/1", step.plan(state, batch))   # doctest: +SKIP
    """
    ocp = _orbax()
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.abspath(directory), restore_target(plan, argnum))
