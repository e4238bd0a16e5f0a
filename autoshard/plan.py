"""Plan: what autoshard decided for one input signature, printable and saveable."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import jax
from jax.sharding import PartitionSpec

from autoshard import export
from autoshard.passes.annotate import Layout


@dataclass(frozen=True)
class Cost:
    """Predicted per-step costs, per device.

    time: seconds (compute + communication, the ILP objective).
    comm_bytes: bytes moved per device, by collective kind.
    collectives: {kind: (count, bytes)} as the compiled program should show them.
    memory: bytes per device: arguments, outputs, activations_peak, total.
    """

    time: float
    compute_time: float
    comm_time: float
    comm_bytes: dict[str, float]
    collectives: dict[str, tuple[int, float]]
    memory: dict[str, float]


@dataclass(frozen=True)
class SolverStats:
    mesh_shape: tuple[int, ...]
    ilp_nodes: int
    graph_nodes: int
    variables: int
    constraints: int
    solve_time: float
    plan_time: float
    status: str
    candidates: dict[str, float] = field(default_factory=dict)  # mesh shape -> objective


@dataclass(frozen=True)
class Entry:
    """One input leaf: its path, shape, dtype and chosen spec."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    spec: PartitionSpec


@dataclass(frozen=True, eq=False)
class Plan:
    """A sharding plan for one input signature.

    Attributes:
      mesh: the jax Mesh the step runs on (axes of type Auto).
      in_specs, out_specs: PartitionSpec pytrees shaped like the arguments / outputs.
      cost: predicted costs (Cost).
      solver: ILP size and timings (SolverStats).
      inputs: one Entry per input leaf, for reading.

    Example:
      >>> plan = step.plan(state, batch)          # doctest: +SKIP
      >>> print(plan.summary())                   # doctest: +SKIP
    """

    mesh: jax.sharding.Mesh
    in_specs: Any
    out_specs: Any
    cost: Cost
    solver: SolverStats
    inputs: tuple[Entry, ...]
    layout: Layout | None = field(default=None, repr=False)

    def summary(self) -> str:
        """A readable table: mesh, every input leaf with shape and spec, predicted costs."""
        mesh = ", ".join(f"{n}={s}" for n, s in self.mesh.shape.items())
        abstract = ", abstract" if _is_abstract(self.mesh) else ""
        lines = [f"mesh: ({mesh})  [{self.mesh.size} devices{abstract}]"]
        width = max((len(e.path) for e in self.inputs), default=10)
        lines.append(f"{'input':<{width}}  {'shape':<16} {'dtype':<8} spec")
        for e in self.inputs:
            lines.append(f"{e.path:<{width}}  {str(e.shape):<16} {e.dtype:<8} {_pspec(e.spec)}")
        c, s = self.cost, self.solver
        lines.append(
            f"predicted step: {c.time * 1e3:.3f} ms (compute {c.compute_time * 1e3:.3f} ms, "
            f"communication {c.comm_time * 1e3:.3f} ms)"
        )
        coll = ", ".join(f"{k} x{n} ({_bytes(b)})" for k, (n, b) in sorted(c.collectives.items()))
        lines.append(f"collectives: {coll or 'none'}")
        mem = ", ".join(f"{k} {_bytes(v)}" for k, v in c.memory.items())
        lines.append(f"memory per device: {mem}")
        lines.append(
            f"ILP: {s.ilp_nodes} nodes (from {s.graph_nodes} operations), {s.variables} "
            f"variables, {s.constraints} constraints, solved in {s.solve_time:.2f} s ({s.status}); "
            f"planning took {s.plan_time:.2f} s"
        )
        if len(s.candidates) > 1:
            cands = ", ".join(f"{k}: {v * 1e3:.3f} ms" for k, v in s.candidates.items())
            lines.append(f"meshes tried: {cands}")
        return "\n".join(lines)

    def export(self, rules: bool = False) -> str:
        """This plan as Python source people write by hand: every input's PartitionSpec,
        or with rules=True MaxText-style logical-axis rules (see `autoshard.export`).

        Example:
          >>> print(plan.export(rules=True))          # doctest: +SKIP
        """
        if rules:
            return export.logical_rules_source(self)
        return export.partition_specs_source(self)

    def to_json(self) -> str:
        """The plan as JSON: mesh shape and names, specs, costs, solver stats."""
        doc = {
            "mesh": {
                "shape": list(self.mesh.axis_sizes),
                "names": list(self.mesh.axis_names),
                "abstract": _is_abstract(self.mesh),
            },
            "in_specs": _specs_to_json(self.in_specs),
            "out_specs": _specs_to_json(self.out_specs),
            "inputs": [
                {
                    "path": e.path,
                    "shape": list(e.shape),
                    "dtype": e.dtype,
                    "spec": _spec_json(e.spec),
                }
                for e in self.inputs
            ],
            "cost": asdict(self.cost),
            "solver": asdict(self.solver),
        }
        return json.dumps(doc, indent=1)

    def save(self, path: str) -> None:
        with open(path, "w") as f:
            f.write(self.to_json())

    @classmethod
    def load(cls, path: str, devices=None) -> Plan:
        """Read a saved plan (for inspection and comparison; it carries no layout of
        intermediates, so run steps through parallelize, which re-plans). A plan for
        an abstract mesh, or for more devices than there are, comes back on a jax
        AbstractMesh."""
        with open(path) as f:
            doc = json.load(f)
        devices = jax.devices() if devices is None else devices
        shape, names = tuple(doc["mesh"]["shape"]), tuple(doc["mesh"]["names"])
        types = (jax.sharding.AxisType.Auto,) * len(shape)
        if doc["mesh"].get("abstract") or math.prod(shape) > len(devices):
            mesh = jax.sharding.AbstractMesh(shape, names, axis_types=types)
        else:
            mesh = jax.make_mesh(
                shape, names, axis_types=types, devices=devices[: math.prod(shape)]
            )
        cost = doc["cost"]
        cost["collectives"] = {k: tuple(v) for k, v in cost["collectives"].items()}
        solver = doc["solver"]
        solver["mesh_shape"] = tuple(solver["mesh_shape"])
        entries = tuple(
            Entry(e["path"], tuple(e["shape"]), e["dtype"], _spec_from_json(e["spec"]))
            for e in doc["inputs"]
        )
        return cls(
            mesh,
            _specs_from_json(doc["in_specs"]),
            _specs_from_json(doc["out_specs"]),
            Cost(**cost),
            SolverStats(**solver),
            entries,
        )


def _is_abstract(mesh) -> bool:
    return isinstance(mesh, jax.sharding.AbstractMesh)


def _pspec(p: PartitionSpec) -> str:
    return "P(" + ", ".join(repr(d) for d in p) + ")"


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n}"


def _spec_json(p: PartitionSpec) -> list:
    return [list(d) if isinstance(d, tuple) else d for d in p]


def _spec_from_json(d: list) -> PartitionSpec:
    return PartitionSpec(*[tuple(x) if isinstance(x, list) else x for x in d])


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def _specs_to_json(tree) -> dict:
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_is_spec)
    return {"leaves": [_spec_json(p) for p in leaves], "treedef": str(treedef)}


def _specs_from_json(doc) -> list:
    """Saved spec pytrees come back as a flat list (pytree classes are not portable)."""
    return [_spec_from_json(p) for p in doc["leaves"]]
