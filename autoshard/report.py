"""Reading plans: summaries grouped by parameter, diffs between plans, figures.

A train state holds each parameter once under ``params`` and again, with the same
shape, in every optimizer moment (``opt_state[0].mu[...]``, ``.nu[...]``). The
summary folds those moments into their parameter's row: one line per parameter,
its moments' specs next to it ("same" when they follow the parameter). Grouping
reads the input paths (`Entry.path`, from the step's pytree): a leaf whose path
ends with a parameter's path below ``params`` and has its shape is one of its
moments; every other leaf gets its own row.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from jax.sharding import AbstractMesh, PartitionSpec

if TYPE_CHECKING:
    from autoshard.plan import Entry, Plan

# Path components under which a state keeps its parameters.
PARAM_ROOTS = ("params", "param")
_COMPONENT = re.compile(r"\.([A-Za-z_]\w*)|\[(['\"]?)(.*?)\2\]")


def components(path: str) -> tuple[str, ...]:
    """Split a pytree path string into its keys: "state.params['w'][0].value" ->
    ("state", "params", "w", "0", "value")."""
    head = re.match(r"[A-Za-z_]\w*", path)
    out = [head.group(0)] if head else []
    out += [m.group(1) or m.group(3) for m in _COMPONENT.finditer(path, head.end() if head else 0)]
    return tuple(out)


def _display(keys: tuple[str, ...]) -> str:
    keys = keys[:-1] if keys and keys[-1] == "value" and len(keys) > 1 else keys
    return ".".join(keys)


@dataclass(frozen=True)
class Row:
    """One line of a summary: a parameter with its optimizer moments, or another leaf.

    name: the parameter's path below ``params`` (or the leaf's full path).
    entry: the parameter's (or leaf's) Entry.
    moments: (label, Entry) per optimizer moment folded into this row.
    """

    name: str
    entry: Entry
    moments: tuple[tuple[str, Entry], ...] = ()

    def moment_text(self) -> str:
        """ "same" when every moment has the parameter's spec, else each moment's spec."""
        if not self.moments:
            return ""
        if all(e.spec == self.entry.spec for _, e in self.moments):
            return f"{', '.join(label for label, _ in self.moments)}: same"
        return ", ".join(f"{label} {spec_text(e.spec)}" for label, e in self.moments)


def rows(entries) -> list[Row]:
    """Group input entries into rows: parameters first (with their moments), then the rest.

    Args:
      entries: `Plan.inputs`.

    Returns:
      A list of Row, parameters in input order, then every leaf no parameter claimed.

    Example:
      >>> [r.name for r in rows(plan.inputs)][:2]       # doctest: +SKIP
      ['blocks.0.attn.k.bias', 'blocks.0.attn.k.kernel']
    """
    keyed = [(e, components(e.path)) for e in entries]
    params: dict[tuple[str, ...], Entry] = {}
    for e, keys in keyed:
        roots = [i for i, k in enumerate(keys) if k in PARAM_ROOTS]
        if roots and roots[0] + 1 < len(keys):
            params.setdefault(keys[roots[0] + 1 :], e)
    moments: dict[tuple[str, ...], list[tuple[str, Entry]]] = {k: [] for k in params}
    others = []
    for e, keys in keyed:
        owner = _owner(e, keys, params)
        if owner is None:
            others.append(Row(e.path, e))
        elif params[owner] is not e:
            moments[owner].append((_moment_label(keys, owner), e))
    return [Row(_display(k), p, tuple(moments[k])) for k, p in params.items()] + others


def _owner(e: Entry, keys, params) -> tuple[str, ...] | None:
    """The parameter key this leaf belongs to (itself or as a moment), or None."""
    for n in range(len(keys) - 1, 0, -1):
        tail = keys[-n:]
        p = params.get(tail)
        if p is not None and p.shape == e.shape:
            return tail
    return None


def _moment_label(keys, owner) -> str:
    """The last non-index key before the parameter's path: 'mu', 'nu', 'trace', ..."""
    head = [k for k in keys[: len(keys) - len(owner)] if not k.isdigit()]
    return head[-1] if head else "state"


def fold_layers(rs: list[Row]) -> list[Row]:
    """Merge rows that differ only in one layer index and agree on shape, dtype and
    layout: "blocks.0.mlp.w1.kernel" and "blocks.1..." become "blocks.{0,1}.mlp.w1.kernel"
    ("blocks.{0..11}..." for a longer run)."""
    groups: dict[tuple, list[tuple[int, Row]]] = {}
    out: list[Row | None] = []
    for r in rs:
        keys = r.name.split(".")
        idx = [i for i, k in enumerate(keys) if k.isdigit()]
        if len(idx) != 1:
            out.append(r)
            continue
        pattern = tuple("#" if i == idx[0] else k for i, k in enumerate(keys))
        e = r.entry
        key = (pattern, e.shape, e.dtype, str(e.spec), r.moment_text())
        if key not in groups:
            out.append(None)
            groups[key] = []
        groups[key].append((int(keys[idx[0]]), r))
    merged = iter(groups.values())
    return [r if r is not None else _merge(next(merged)) for r in out]


def _merge(members: list[tuple[int, Row]]) -> Row:
    first = members[0][1]
    if len(members) == 1:
        return first
    ns = sorted(n for n, _ in members)
    run = ns == list(range(ns[0], ns[-1] + 1)) and len(ns) > 2
    label = f"{{{ns[0]}..{ns[-1]}}}" if run else "{" + ",".join(map(str, ns)) + "}"
    keys = first.name.split(".")
    name = ".".join(label if k.isdigit() else k for k in keys)
    return Row(name, first.entry, first.moments)


def spec_text(p: PartitionSpec) -> str:
    return "P(" + ", ".join(repr(d) for d in p) + ")"


def local_shape(shape, spec: PartitionSpec, mesh_shape: dict[str, int]) -> tuple[int, ...]:
    """The per-device shape of a tensor split by `spec` on a mesh of these axis sizes."""
    out = []
    for i, n in enumerate(shape):
        d = spec[i] if i < len(spec) else None
        axes = d if isinstance(d, tuple) else (() if d is None else (d,))
        out.append(n // math.prod(mesh_shape[a] for a in axes))
    return tuple(out)


def nbytes_text(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def _table(header: list[str], body: list[list[str]], use_rich: bool | None) -> str:
    """A text table; drawn with rich when it is installed (or use_rich=True)."""
    if use_rich is not False:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:
            if use_rich:
                raise
        else:
            from rich import box

            table = Table(*header, box=box.SIMPLE_HEAD, pad_edge=False)
            for r in body:
                table.add_row(*r)
            out = io.StringIO()
            console = Console(
                file=out,
                width=400,
                color_system=None,
                force_terminal=False,
                force_jupyter=False,
                highlight=False,
            )
            console.print(table)
            return "\n".join(ln.rstrip() for ln in out.getvalue().splitlines()).strip("\n")
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    fmt = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
    return "\n".join([fmt(header), *(fmt(r) for r in body)])


def mesh_text(plan: Plan) -> str:
    mesh = ", ".join(f"{n}={s}" for n, s in plan.mesh.shape.items())
    if isinstance(plan.mesh, AbstractMesh):  # planned for devices this process lacks
        return f"mesh: ({mesh})  [{plan.mesh.size} devices, abstract]"
    return f"mesh: ({mesh})  [{plan.mesh.devices.size} devices]"


def tensor_table(plan: Plan, use_rich: bool | None = None) -> str:
    """One row per parameter (moments folded in) and per other input leaf."""
    sizes = dict(plan.mesh.shape)
    body = []
    for r in fold_layers(rows(plan.inputs)):
        e = r.entry
        local = local_shape(e.shape, e.spec, sizes)
        body.append([r.name, str(e.shape), e.dtype, spec_text(e.spec), str(local), r.moment_text()])
    header = ["tensor", "shape", "dtype", "spec", "per device", "optimizer state"]
    if not any(b[-1] for b in body):
        header, body = header[:-1], [b[:-1] for b in body]
    return _table(header, body, use_rich)


def cost_lines(plan: Plan) -> list[str]:
    """Predicted time, collectives, memory and the ILP's size, one line each."""
    c, s = plan.cost, plan.solver
    lines = [
        f"predicted step: {c.time * 1e3:.3f} ms (compute {c.compute_time * 1e3:.3f} ms, "
        f"communication {c.comm_time * 1e3:.3f} ms)"
    ]
    coll = ", ".join(f"{k} x{n} ({nbytes_text(b)})" for k, (n, b) in sorted(c.collectives.items()))
    lines.append(f"collectives: {coll or 'none'}")
    mem = ", ".join(f"{k} {nbytes_text(v)}" for k, v in c.memory.items())
    lines.append(f"memory per device: {mem}")
    lines.append(
        f"ILP: {s.ilp_nodes} nodes (from {s.graph_nodes} operations), {s.variables} "
        f"variables, {s.constraints} constraints, solved in {s.solve_time:.2f} s ({s.status}); "
        f"planning took {s.plan_time:.2f} s"
    )
    if plan.pipeline is not None:
        pl = plan.pipeline
        lines.append(
            f"pipeline: {pl.stages} stages on axis {pl.axis!r} x {pl.microbatches} "
            f"microbatches ({pl.schedule}), {pl.layers // pl.stages} of {pl.layers} layers "
            f"per stage, bubble {pl.bubble:.0%}"
        )
    if len(s.candidates) > 1:
        cands = ", ".join(f"{k}: {v * 1e3:.3f} ms" for k, v in s.candidates.items())
        lines.append(f"meshes tried: {cands}")
    return lines


def summary(plan: Plan, use_rich: bool | None = None) -> str:
    """The mesh, the per-tensor table (optimizer moments folded into their parameter),
    and the predicted costs. See `Plan.summary`."""
    folded = sum(len(r.moments) for r in rows(plan.inputs))
    note = [f"({folded} optimizer-state leaves folded into their parameters' rows)"]
    return "\n".join(
        [
            mesh_text(plan),
            tensor_table(plan, use_rich),
            *(note if folded else []),
            *cost_lines(plan),
        ]
    )


@dataclass(frozen=True)
class Change:
    """One tensor (a parameter with its moments, or another leaf) laid out differently."""

    name: str
    before: str  # spec, with the moments' specs when they differ from it
    after: str


@dataclass(frozen=True)
class PlanDiff:
    """What changed from plan `a` to plan `b`, and what it costs.

    changed: tensors whose layout differs; only_a / only_b: tensors one plan lacks.
    time, memory: (a, b) predicted step seconds and total bytes per device.
    collectives: kind -> ((count, bytes) in a, (count, bytes) in b), kinds that differ.
    """

    mesh: tuple[str, str]
    changed: tuple[Change, ...]
    only_a: tuple[str, ...]
    only_b: tuple[str, ...]
    time: tuple[float, float]
    compute_time: tuple[float, float]
    comm_time: tuple[float, float]
    memory: tuple[float, float]
    collectives: dict

    def __str__(self) -> str:
        return diff_text(self)


def _layouts(plan: Plan) -> dict[str, str]:
    out = {}
    for r in rows(plan.inputs):
        own = spec_text(r.entry.spec)
        moments = r.moment_text()
        out[r.name] = own if not moments or moments.endswith(": same") else f"{own}; {moments}"
    return out


def diff(a: Plan, b: Plan) -> PlanDiff:
    """Compare two plans tensor by tensor, and their predicted costs.

    Args:
      a, b: plans of the same step (for example on two meshes, or two budgets).

    Returns:
      A PlanDiff; `str()` of it is a readable report.

    Example:
      >>> print(plan_8.diff(plan_2x4))                  # doctest: +SKIP
    """
    la, lb = _layouts(a), _layouts(b)
    changed = tuple(Change(k, la[k], lb[k]) for k in la if k in lb and la[k] != lb[k])
    kinds = sorted(set(a.cost.collectives) | set(b.cost.collectives))
    colls = {
        k: (tuple(a.cost.collectives.get(k, (0, 0.0))), tuple(b.cost.collectives.get(k, (0, 0.0))))
        for k in kinds
    }
    return PlanDiff(
        (mesh_text(a), mesh_text(b)),
        changed,
        tuple(k for k in la if k not in lb),
        tuple(k for k in lb if k not in la),
        (a.cost.time, b.cost.time),
        (a.cost.compute_time, b.cost.compute_time),
        (a.cost.comm_time, b.cost.comm_time),
        (a.cost.memory.get("total", 0.0), b.cost.memory.get("total", 0.0)),
        {k: v for k, v in colls.items() if v[0] != v[1]},
    )


def _delta(pair, scale: float, unit: str, fmt=None) -> str:
    x, y = pair
    f = fmt or (lambda v: f"{v * scale:.3f} {unit}")
    rel = f", {100 * (y - x) / x:+.0f}%" if x else ""
    sign = "+" if y >= x else "-"
    return f"{f(x)} -> {f(y)} ({sign}{f(abs(y - x))}{rel})"


def diff_text(d: PlanDiff) -> str:
    """The readable form of a PlanDiff."""
    lines = [d.mesh[0] if d.mesh[0] == d.mesh[1] else f"{d.mesh[0]}  ->  {d.mesh[1]}"]
    if d.changed:
        body = [[c.name, c.before, "->", c.after] for c in d.changed]
        n = len(d.changed)
        lines += [
            f"{n} tensor{'s' if n != 1 else ''} laid out differently:",
            _table(["tensor", "before", "", "after"], body, False),
        ]
    else:
        lines.append("every tensor keeps its layout")
    for label, names in (("only in the first plan", d.only_a), ("only in the second", d.only_b)):
        if names:
            lines.append(f"{label}: {', '.join(names)}")
    lines.append("predicted step: " + _delta(d.time, 1e3, "ms"))
    lines.append("  compute: " + _delta(d.compute_time, 1e3, "ms"))
    lines.append("  communication: " + _delta(d.comm_time, 1e3, "ms"))
    lines.append("memory per device: " + _delta(d.memory, 1, "", nbytes_text))
    for k, ((n0, b0), (n1, b1)) in d.collectives.items():
        lines.append(f"{k}: x{n0} ({nbytes_text(b0)}) -> x{n1} ({nbytes_text(b1)})")
    return "\n".join(lines)


def _split_dims(spec: PartitionSpec, axis: str) -> int:
    """The tensor dimension that mesh axis `axis` splits under `spec`, or -1."""
    for i, d in enumerate(spec):
        if d == axis or (isinstance(d, tuple) and axis in d):
            return i
    return -1


def figure(plan: Plan):
    """A matplotlib Figure of the plan: left, which dimension of each tensor every
    mesh axis splits (one row per parameter, moments folded in); right, the predicted
    step time split into compute and each collective kind.

    Args:
      plan: a Plan.

    Returns:
      A `matplotlib.figure.Figure` (axes: layout, time breakdown); needs matplotlib.

    Example:
      >>> plan.plot().savefig("plan.png")               # doctest: +SKIP
    """
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure

    rs = fold_layers(rows(plan.inputs))
    axes = list(plan.mesh.axis_names)
    grid = [[_split_dims(r.entry.spec, a) for a in axes] for r in rs]
    ndim = max([1, *(len(r.entry.shape) for r in rs)])
    height = 2.0 + 0.24 * len(rs)
    fig = Figure(figsize=(11, height))
    left = fig.add_axes((0.24, 0.6 / height, 0.22, 1 - 1.2 / height))
    right = fig.add_axes((0.55, 1 - 1.5 / height, 0.42, 0.9 / height))
    colors = ["#e8e8e8", "#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3"][: ndim + 1]
    left.imshow(
        [[d + 1 for d in row] for row in grid],
        cmap=ListedColormap(colors),
        vmin=-0.5,
        vmax=len(colors) - 0.5,
        aspect="auto",
    )
    for i, row in enumerate(grid):
        for j, d in enumerate(row):
            left.text(j, i, "-" if d < 0 else f"dim {d}", ha="center", va="center", fontsize=7)
    sizes = dict(plan.mesh.shape)
    left.set_xticks(range(len(axes)), [f"{a}={sizes[a]}" for a in axes])
    left.set_yticks(range(len(rs)), [r.name for r in rs], fontsize=7)
    left.set_title("dimension split by each mesh axis")
    _time_bars(right, plan)
    return fig


def _time_bars(ax, plan: Plan) -> None:
    c = plan.cost
    parts = [("compute", c.compute_time)]
    by_kind = c.comm_time_by_kind or ({"communication": c.comm_time} if c.comm_time else {})
    parts += sorted(by_kind.items())
    start = 0.0
    for label, t in parts:
        ax.barh([0], [t * 1e3], left=[start], label=f"{label} {t * 1e3:.3f} ms")
        start += t * 1e3
    ax.set_yticks([])
    ax.set_xlabel("predicted step time (ms)")
    ax.set_title(f"step {c.time * 1e3:.3f} ms on {mesh_text(plan)[6:]}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.6), ncol=2, fontsize=8)


def _axis_sentence(plan: Plan, axis: str, rs: list[Row]) -> str:
    params = [r for r in rs if r.moments or "params" in components(r.entry.path)]
    split = [r for r in params if _split_dims(r.entry.spec, axis) >= 0]
    data = [r.name for r in rs if r not in params and _split_dims(r.entry.spec, axis) >= 0]
    size = dict(plan.mesh.shape)[axis]
    parts = []
    if data:
        parts.append(f"splits the inputs {', '.join(data)} (data parallel)")
    if split:
        dims: dict[int, int] = {}
        for r in split:
            d = _split_dims(r.entry.spec, axis)
            dims[d] = dims.get(d, 0) + 1
        how = ", ".join(f"{n} on dimension {d}" for d, n in sorted(dims.items()))
        parts.append(f"splits {len(split)} of {len(params)} parameters ({how})")
    if not parts:
        parts.append("splits nothing the step takes in (only intermediates, if anything)")
    return f"- axis {axis} ({size} devices) " + "; ".join(parts) + "."


def explain(plan: Plan) -> str:
    """The plan in sentences: what each mesh axis splits, where the predicted time goes,
    memory, and whether the solver proved the plan optimal.

    Args:
      plan: a Plan (also one read back with `Plan.load`).

    Returns:
      A few lines of text.

    Example:
      >>> print(report.explain(plan))                   # doctest: +SKIP
    """
    rs = rows(plan.inputs)
    c, s = plan.cost, plan.solver
    axes = ", ".join(f"{n}={k}" for n, k in plan.mesh.shape.items())
    lines = [f"The step runs on mesh ({axes}) over {plan.mesh.devices.size} devices."]
    lines += [_axis_sentence(plan, a, rs) for a in plan.mesh.axis_names]
    whole = [r.name for r in rs if r.moments and r.entry.spec == PartitionSpec()]
    if whole:
        lines.append(f"- {len(whole)} parameters stay whole on every device (replicated).")
    share = lambda t: f"{t * 1e3:.3f} ms ({100 * t / c.time:.0f}%)" if c.time else "0 ms"
    coll = ", ".join(f"{k} {share(t)}" for k, t in sorted(c.comm_time_by_kind.items()))
    lines.append(
        f"Predicted step: {c.time * 1e3:.3f} ms = compute {share(c.compute_time)}"
        + (f" + {coll}." if coll else " (no communication).")
    )
    mem = c.memory.get("total")
    if mem is not None:
        lines.append(f"Predicted memory: {nbytes_text(mem)} per device.")
    proof = {
        "optimal": "the solver proved it the cheapest under the cost model",
        "time_limit": "the solver stopped at its time limit with the best plan found so far "
        "(raise time_limit for a proven optimum that every host reproduces)",
        "fallback": "no better plan than replicating everything was found in the time limit",
    }.get(s.status, s.status)
    lines.append(f"Solver: {proof}; {s.variables} variables, {s.solve_time:.2f} s.")
    return "\n".join(lines)
