"""A plan as people write one by hand: PartitionSpecs as Python source, and logical-axis
rules in the style of MaxText and `flax.linen.logical_to_mesh_axes`.

Logical names come from parameter paths: a kernel's module name says what its two
dimensions are (``q`` is ``("embed", "heads")``, ``w2`` is ``("mlp", "embed")``, ...),
an extra leading dimension of a stacked (scanned) layer is ``"layers"``, a norm's
scale is ``"norm"``, the first dimension of a step's data inputs is ``"batch"``.
Dimensions no name fits stay unnamed; if the plan splits one of them, or splits a
name's dimensions differently in different parameters, the rules cannot say it and
the export lists those parameters as exceptions.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from jax.sharding import PartitionSpec

# module names -> logical names of a kernel's (input, output) dimensions
KERNEL_ROLES: tuple[tuple[frozenset[str], tuple[str, str]], ...] = (
    (frozenset({"q", "query", "q_proj", "wq"}), ("embed", "heads")),
    (frozenset({"k", "v", "key", "value", "k_proj", "v_proj", "wk", "wv"}), ("embed", "kv_heads")),
    (frozenset({"o", "out", "o_proj", "out_proj", "wo", "attn_out"}), ("heads", "embed")),
    (
        frozenset(
            {"w1", "w3", "w_up", "w_gate", "up", "gate", "fc1", "wi", "up_proj", "gate_proj"}
        ),
        ("embed", "mlp"),
    ),
    (frozenset({"w2", "w_down", "down", "fc2", "down_proj"}), ("mlp", "embed")),
    (frozenset({"head", "lm_head", "unembed", "logits"}), ("embed", "vocab")),
)
STACKED = "layers"
_KEY = re.compile(r"\['([^']*)'\]|\[(\d+)\]|\.(\w+)|^(\w+)")


def path_keys(path: str) -> list[str]:
    """The keys of a jax key path string, without a trailing ``.value``.

    Example:
      >>> path_keys("state.params['blocks'][0]['q']['kernel'].value")
      ['state', 'params', 'blocks', '0', 'q', 'kernel']
    """
    keys = ["".join(g) for g in (m.groups("") for m in _KEY.finditer(path))]
    return keys[:-1] if keys and keys[-1] == "value" else keys


def _is_param(keys: list[str]) -> bool:
    return "params" in keys and "opt_state" not in keys


def _names(keys: list[str], ndim: int) -> tuple[str | None, ...] | None:
    """Logical names of a parameter's dimensions, from its path (None: no rule fits)."""
    leaf, module = keys[-1], keys[-2] if len(keys) > 1 else ""
    if "norm" in module or module.startswith("ln"):
        base: tuple[str, ...] = ("norm",)
    elif leaf == "embedding":
        base = ("position", "embed") if "pos" in module else ("vocab", "embed")
    else:
        roles = [names for mods, names in KERNEL_ROLES if module in mods]
        if not roles:
            return None
        base = roles[0] if leaf == "kernel" else roles[0][-1:]
    extra = ndim - len(base)
    if extra < 0 or extra > 1:
        return None
    return (STACKED,) * extra + base


def logical_axes(plan) -> dict[str, tuple[str | None, ...]]:
    """Logical names of every named parameter's and data input's dimensions, by path.

    Example:
      >>> axes = logical_axes(plan)                       # doctest: +SKIP
      >>> axes["state.params['blocks']['mlp']['w1']['kernel'].value"]   # doctest: +SKIP
      ('layers', 'embed', 'mlp')
    """
    out: dict[str, tuple[str | None, ...]] = {}
    sizes: dict[str, set[int]] = {}
    for e in plan.inputs:
        keys = path_keys(e.path)
        if _is_param(keys):
            names = _names(keys, len(e.shape))
        elif "state" not in keys and e.shape:
            names = ("batch", "length")[: len(e.shape)] + (None,) * (len(e.shape) - 2)
        else:
            continue
        if names is not None:
            out[e.path] = names
            for n, s in zip(names, e.shape, strict=True):
                sizes.setdefault(n, set()).add(s)
    # a name whose dimensions differ in size (heads of 64 here, 256 there) is no name
    mixed = {n for n, s in sizes.items() if len(s) > 1 and n not in (STACKED, "norm", "batch")}
    return {p: tuple(None if n in mixed else n for n in ns) for p, ns in out.items()}


@dataclass(frozen=True)
class LogicalRules:
    """Logical-axis rules read off a plan.

    rules: ((logical name, mesh axes or None), ...) for flax.linen.logical_to_mesh_axes.
    axes: the logical names of each exported input's dimensions, by path.
    exceptions: paths whose planned spec the rules do not give (use their PartitionSpec).
    """

    rules: tuple[tuple[str, str | tuple[str, ...] | None], ...]
    axes: dict[str, tuple[str | None, ...]]
    exceptions: tuple[str, ...]


def _dim_axes(spec: PartitionSpec, ndim: int) -> list:
    dims = list(spec) + [None] * (ndim - len(spec))
    return [d if not isinstance(d, tuple) or len(d) != 1 else d[0] for d in dims]


def apply_rules(names, rules) -> PartitionSpec:
    """The PartitionSpec the rules give dimensions with these logical names (as
    flax.linen.logical_to_mesh_axes does for one rule per name: a mesh axis used by
    an earlier rule is not used again).

    Example:
      >>> apply_rules(("embed", "mlp"), (("embed", None), ("mlp", "y")))
      P(None, 'y')
    """
    table, used, dims = dict(rules), set(), [None] * len(names)
    for name, _ in rules:
        for i, n in enumerate(names):
            axes = table.get(n)
            flat = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            if n == name and dims[i] is None and flat and not used & set(flat):
                dims[i], used = axes, used | set(flat)
    while dims and dims[-1] is None:
        dims.pop()
    return PartitionSpec(*dims)


def logical_rules(plan) -> LogicalRules:
    """The rules that best reproduce a plan: each logical name gets the mesh axes the
    plan gives most of its bytes; parameters the rules get wrong are exceptions.

    Example:
      >>> r = logical_rules(plan)                          # doctest: +SKIP
      >>> r.rules                                          # doctest: +SKIP
      (('batch', 'x'), ('embed', None), ('heads', 'y'), ('mlp', 'y'), ...)
    """
    axes = logical_axes(plan)
    votes: dict[str, Counter] = {}
    for e in plan.inputs:
        if e.path not in axes:
            continue
        nbytes = float(max(1, _count(e.shape)))
        for n, a in zip(axes[e.path], _dim_axes(e.spec, len(e.shape)), strict=True):
            if n is not None:
                votes.setdefault(n, Counter())[a] += nbytes
    rules = tuple((n, c.most_common(1)[0][0]) for n, c in sorted(votes.items()))
    exceptions = tuple(
        e.path
        for e in plan.inputs
        if e.path in axes and apply_rules(axes[e.path], rules) != _trim(e.spec)
    )
    return LogicalRules(rules, axes, exceptions)


def _count(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _trim(spec: PartitionSpec) -> PartitionSpec:
    dims = [d if not isinstance(d, tuple) or len(d) != 1 else d[0] for d in spec]
    while dims and dims[-1] is None:
        dims.pop()
    return PartitionSpec(*dims)


def _p(spec: PartitionSpec) -> str:
    return "P(" + ", ".join(repr(d) for d in spec) + ")"


def _mesh_line(plan) -> str:
    shape = dict(plan.mesh.shape)
    return f"# mesh axes {tuple(shape)} of sizes {tuple(shape.values())}"


def partition_specs_source(plan) -> str:
    """Python source assigning ``in_specs``: every input's PartitionSpec, by path, in
    the order of ``plan.in_specs``' leaves.

    Example:
      >>> src = partition_specs_source(plan)               # doctest: +SKIP
      >>> ns = {}; exec(src, ns); list(ns["in_specs"].values()) == plan_leaves  # doctest: +SKIP
      True
    """
    lines = [
        "from jax.sharding import PartitionSpec as P",
        "",
        _mesh_line(plan),
        "in_specs = {",
    ]
    lines += [f"    {e.path!r}: {_p(e.spec)},  # {e.dtype}{list(e.shape)}" for e in plan.inputs]
    return "\n".join([*lines, "}", ""])


def logical_rules_source(plan) -> str:
    """Python source assigning ``logical_axis_rules`` (for MaxText-style configs and
    `flax.linen.logical_to_mesh_axes`) and ``logical_axes``, the names of each
    parameter's dimensions; parameters the rules cannot express are listed with
    their PartitionSpec in ``exceptions``.

    Example:
      >>> print(logical_rules_source(plan))                # doctest: +SKIP
    """
    r = logical_rules(plan)
    specs = {e.path: e.spec for e in plan.inputs}
    lines = [
        "from jax.sharding import PartitionSpec as P",
        "",
        _mesh_line(plan),
        "logical_axis_rules = (",
        *[f"    ({n!r}, {a!r})," for n, a in r.rules],
        ")",
        "logical_axes = {",
        *[f"    {p!r}: {names!r}," for p, names in r.axes.items()],
        "}",
        "# inputs whose planned layout the rules do not give",
        "exceptions = {",
        *[f"    {p!r}: {_p(specs[p])}," for p in r.exceptions],
        "}",
        "",
    ]
    return "\n".join(lines)
