"""Hand-written sharding plans, written as a JAX user would write them.

Each plan gives every TrainState leaf and every batch leaf a ``PartitionSpec`` from its
pytree path, e.g. ``.params['blocks']['mlp']['w1']['kernel'].value`` (the optimizer
moments ``.opt_state[0].mu[...]``, ``.nu[...]`` carry the same path fragments, so they
are laid out like their parameters). On local devices the specs go to
``jax.jit(step, in_shardings=..., out_shardings=...)``; on an abstract mesh they pin
autoshard's planner (``in_shardings=``), which completes the rest.

A parameter's dimensions get logical names from its module (MaxText's vocabulary):
``q`` (embed, heads), ``k``/``v`` (embed, kv_heads), ``o`` (heads, embed), ``w1``/
``w_up``/``w_gate`` (embed, mlp), ``w2``/``w_down`` (mlp, embed), ``head`` (embed,
vocab), a token embedding (vocab, embed), a position embedding (None, embed), a norm's
scale or bias (norm,), a bias its kernel's output name; a stacked (scanned) block
parameter has a leading ``layers`` dimension. A plan maps names to mesh axes; a
dimension that does not divide over its axes, or a head split that would cut a head,
stays whole.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from jax.sharding import PartitionSpec as P

Axis = str | tuple[str, ...] | None
Rule = Callable[[str, tuple[int, ...]], P]

DP, FSDP, MEGATRON, DP_TP, MAXTEXT = (
    "data parallel",
    "FSDP (ZeRO-3)",
    "Megatron TP",
    "DP x TP",
    "MaxText rules",
)
HAND = (DP, FSDP, MEGATRON, DP_TP, MAXTEXT)
AUTOSHARD = "autoshard"

_KERNELS = {
    ("embed", "heads"): {"q"},
    ("embed", "kv_heads"): {"k", "v"},
    ("heads", "embed"): {"o"},
    ("embed", "mlp"): {"w1", "w_up", "w_gate"},
    ("mlp", "embed"): {"w2", "w_down"},
    ("embed", "vocab"): {"head"},
}
_ROLE = {module: names for names, modules in _KERNELS.items() for module in modules}
_KEY = re.compile(r"\['([^']+)'\]")

# MaxText base.yml logical_axis_rules (AI-Hypercomputer/maxtext, MaxText/configs/base.yml)
# with its mesh reduced to (fsdp, tensor): embed -> fsdp; mlp, heads, kv_heads, vocab and
# norm -> tensor; activation_batch -> (data, fsdp).
MAXTEXT_RULES = {
    "embed": "fsdp",
    "mlp": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "vocab": "tensor",
    "norm": "tensor",
}


def logical_names(path: str, ndim: int) -> tuple[str | None, ...] | None:
    """Logical names of a parameter's dimensions from its path; None if unknown.

    >>> logical_names(".params['blocks']['attn']['q']['kernel'].value", 3)
    ('layers', 'embed', 'heads')
    >>> logical_names(".opt_state[0].mu['head']['bias'].value", 1)
    ('vocab',)
    """
    keys = _KEY.findall(path)
    if len(keys) < 2:
        return None
    module, leaf = keys[-2], keys[-1]
    if leaf == "embedding":
        base = ("vocab", "embed") if module in ("tok_embed", "embed") else (None, "embed")
    elif leaf == "kernel" and module in _ROLE:
        base = _ROLE[module]
    elif leaf == "bias" and module in _ROLE:
        base = _ROLE[module][-1:]
    elif leaf in ("scale", "bias"):
        base = ("norm",)
    else:
        return None
    extra = ndim - len(base)
    if extra not in (0, 1):
        return None
    return ("layers",) * extra + base


def axis_size(sizes: dict[str, int], axis: Axis) -> int:
    """Devices spanned by ``axis`` (a name, a tuple of names, or None)."""
    if axis is None:
        return 1
    return math.prod(sizes[a] for a in (axis if isinstance(axis, tuple) else (axis,)))


def _split(n: int, size: int, heads: int | None) -> bool:
    """Whether a dimension of ``size`` splits over ``n`` devices (whole heads only)."""
    if n <= 1 or size % n:
        return False
    return heads is None or heads % n == 0


def named_rule(
    rules: dict[str, Axis], sizes: dict[str, int], heads: int, kv_heads: int
) -> Rule:
    """A rule that maps each logical name through ``rules`` (unlisted names: whole)."""
    per_name_heads = {"heads": heads, "kv_heads": kv_heads}

    def rule(path: str, shape: tuple[int, ...]) -> P:
        names = logical_names(path, len(shape))
        if names is None:
            return P()
        spec, used = [], set()
        for name, size in zip(names, shape, strict=True):
            axis = rules.get(name) if name else None
            n = axis_size(sizes, axis)
            if axis is None or axis in used or not _split(n, size, per_name_heads.get(name)):
                spec.append(None)
            else:
                spec.append(axis)
                used.add(axis)
        return P(*spec)

    return rule


def fsdp_rule(axis: Axis, sizes: dict[str, int]) -> Rule:
    """ZeRO-3: each leaf split over ``axis`` on its largest dimension that divides."""
    n = axis_size(sizes, axis)

    def rule(path: str, shape: tuple[int, ...]) -> P:
        for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
            if shape[dim] % n == 0:
                return P(*([None] * dim), axis)
        return P()

    return rule


def replicated(path: str, shape: tuple[int, ...]) -> P:
    """Every state leaf whole on every device."""
    return P()


@dataclass(frozen=True)
class HandPlan:
    """One hand-written layout on one mesh.

    Attributes:
      name: the method's name in the tables.
      mesh_shape: the mesh it runs on; ``axis_names`` its axis names.
      rule: ``(path, shape) -> PartitionSpec`` for every TrainState leaf.
      batch_axis: mesh axis (or axes) of every batch leaf's first dimension.
    """

    name: str
    mesh_shape: tuple[int, ...]
    axis_names: tuple[str, ...]
    rule: Rule
    batch_axis: Axis


def hand_plans(n: int, two_d: list[tuple[int, int]], heads: int, kv_heads: int):
    """The hand plans over ``n`` devices: data parallel, FSDP and Megatron over all of
    them as one axis, and on every 2-D shape ``(a, b)`` in ``two_d`` DP x TP (batch on
    the first axis, Megatron on the second) and MaxText's rules (FSDP on the first,
    tensor parallel on the second)."""
    one = {"x": n}
    megatron = {"heads": "x", "kv_heads": "x", "mlp": "x", "vocab": "x"}
    out = [
        HandPlan(DP, (n,), ("x",), replicated, "x"),
        HandPlan(FSDP, (n,), ("x",), fsdp_rule("x", one), "x"),
        HandPlan(MEGATRON, (n,), ("x",), named_rule(megatron, one, heads, kv_heads), None),
    ]
    for a, b in two_d:
        sizes = {"data": a, "tensor": b}
        tp = {k: "tensor" for k in megatron}
        rule = named_rule(tp, sizes, heads, kv_heads)
        out.append(HandPlan(DP_TP, (a, b), ("data", "tensor"), rule, "data"))
        sizes = {"fsdp": a, "tensor": b}
        rule = named_rule(MAXTEXT_RULES, sizes, heads, kv_heads)
        out.append(HandPlan(MAXTEXT, (a, b), ("fsdp", "tensor"), rule, "fsdp"))
    return out


def specs(plan: HandPlan, state, batch):
    """``(state specs, batch specs)``: PartitionSpec trees shaped like the inputs."""
    import jax

    sizes = dict(zip(plan.axis_names, plan.mesh_shape, strict=True))
    n = axis_size(sizes, plan.batch_axis)

    def of_state(path, leaf):
        return plan.rule(jax.tree_util.keystr(path), tuple(leaf.shape))

    def of_batch(path, leaf):
        if plan.batch_axis is None or leaf.shape[0] % n:
            return P()
        return P(plan.batch_axis)

    return (
        jax.tree_util.tree_map_with_path(of_state, state),
        jax.tree_util.tree_map_with_path(of_batch, batch),
    )
