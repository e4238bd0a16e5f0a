"""Hand-written sharding baselines, written as a JAX user would write them.

Each baseline is plain ``jax.sharding.NamedSharding`` / ``PartitionSpec`` on a
``jax.sharding.Mesh`` with Auto axes, passed to ``jax.jit(train_step, in_shardings=...,
out_shardings=...)``. Rules read the pytree path of each TrainState leaf, e.g.
``.params['blocks'][0]['mlp']['w1']['kernel'].value``; the optimizer moments
(``.opt_state[0].mu[...]``, ``.nu[...]``) carry the same path fragments, so they are
laid out like their parameters. A dimension that does not divide is left unsplit.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

Axis = str | tuple[str, ...] | None
StateRule = Callable[[str, tuple[int, ...]], P]

# Megatron: column-parallel layers split their output dim (kernel dim 1, bias dim 0),
# row-parallel layers their input dim (kernel dim 0; their bias stays replicated).
_COLUMN = re.compile(r"\['(w1|q|k|v)'\]\['(kernel|bias)'\]")
_ROW = re.compile(r"\['(w2|o)'\]\['kernel'\]")
_ATTENTION = {"q", "k", "v", "o"}

DP, FSDP, MEGATRON, DP_TP, SHARD_BATCH = (
    "data parallel",
    "FSDP (ZeRO-3)",
    "Megatron TP",
    "data x tensor (2-D)",
    "shard batch, propagate",
)
AUTOSHARD = "autoshard"


@dataclass(frozen=True)
class Baseline:
    """One hand-written layout.

    Attributes:
      name: the method's name in the table.
      state_rule: ``(path, shape) -> PartitionSpec`` for every TrainState leaf; None
        leaves the state's input layout and every output layout to the compiler.
      batch_axis: mesh axis (or tuple of axes) for the batch dim of every batch leaf.
    """

    name: str
    state_rule: StateRule | None
    batch_axis: Axis


def axis_size(mesh: jax.sharding.Mesh, axis: Axis) -> int:
    """Devices spanned by ``axis`` (a name, a tuple of names, or None)."""
    if axis is None:
        return 1
    names = axis if isinstance(axis, tuple) else (axis,)
    return math.prod(mesh.shape[n] for n in names)


def split_dim(shape: tuple[int, ...], dim: int, axis: Axis, n: int) -> P:
    """``axis`` on ``dim`` when it divides by ``n``, else replicated."""
    if axis is None or dim >= len(shape) or shape[dim] % n:
        return P()
    return P(*([None] * dim), axis)


def replicated(path: str, shape: tuple[int, ...]) -> P:
    """Every state leaf replicated."""
    return P()


def fsdp_rule(axis: Axis, n: int) -> StateRule:
    """ZeRO-3: each leaf split over ``axis`` on its largest dim that divides by ``n``."""

    def rule(path: str, shape: tuple[int, ...]) -> P:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % n == 0:
                return split_dim(shape, dim, axis, n)
        return P()

    return rule


def megatron_rule(axis: Axis, n: int, heads: int | None) -> StateRule:
    """Column-parallel ``w1``/``q``/``k``/``v``, row-parallel ``w2``/``o``.

    Attention projections are split by whole heads only: with ``heads`` not divisible
    by ``n`` they stay replicated (cutting a head in two is not Megatron).
    """

    def rule(path: str, shape: tuple[int, ...]) -> P:
        col, row = _COLUMN.search(path), _ROW.search(path)
        match = col or row
        if match is None:
            return P()
        if match.group(1) in _ATTENTION and heads is not None and heads % n:
            return P()
        return split_dim(shape, len(shape) - 1 if col else 0, axis, n)

    return rule


def all_axes(mesh: jax.sharding.Mesh) -> Axis:
    """The whole mesh as one axis: its name on a 1-D mesh, else the tuple of names."""
    names = tuple(mesh.axis_names)
    return names[0] if len(names) == 1 else names


def baselines(mesh: jax.sharding.Mesh, heads: int | None, quick: bool = False) -> list[Baseline]:
    """The baselines that make sense on ``mesh``.

    Data parallel, FSDP, Megatron and shard-batch treat all devices of the mesh as one
    axis (on a 1-D mesh, its only axis); data x tensor needs a 2-D mesh (batch on the
    first axis, Megatron on the second). ``quick``: data parallel and Megatron only.
    """
    every = all_axes(mesh)
    n = axis_size(mesh, every)
    out = [
        Baseline(DP, replicated, every),
        Baseline(FSDP, fsdp_rule(every, n), every),
        Baseline(MEGATRON, megatron_rule(every, n, heads), None),
    ]
    names = tuple(mesh.axis_names)
    if len(names) == 2:
        tp = names[1]
        out.append(Baseline(DP_TP, megatron_rule(tp, mesh.shape[tp], heads), names[0]))
    out.append(Baseline(SHARD_BATCH, None, every))
    if quick:
        out = [b for b in out if b.name in (DP, MEGATRON)]
    return out


def _shardings(mesh, tree, rule: StateRule):
    def one(path, leaf):
        return NamedSharding(mesh, rule(jax.tree_util.keystr(path), tuple(leaf.shape)))

    return jax.tree_util.tree_map_with_path(one, tree)


def jit_baseline(baseline: Baseline, train_step, mesh: jax.sharding.Mesh, state, batch):
    """``jax.jit(train_step, in_shardings=..., out_shardings=...)`` for one baseline.

    State flows in and out with one layout; metrics come out replicated. Without a
    state rule the state's in_shardings entry is None and out_shardings is not given:
    the compiler picks both (for uncommitted inputs, jax 0.10 lets Shardy propagate
    a layout onto the parameter).
    """
    n = axis_size(mesh, baseline.batch_axis)
    batch_sh = _shardings(mesh, batch, lambda p, s: split_dim(s, 0, baseline.batch_axis, n))
    if baseline.state_rule is None:
        return jax.jit(train_step, in_shardings=(None, batch_sh))
    state_sh = _shardings(mesh, state, baseline.state_rule)
    return jax.jit(
        train_step,
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, NamedSharding(mesh, P())),
    )
