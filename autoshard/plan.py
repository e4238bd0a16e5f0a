"""Plan: what autoshard decided for one input signature, printable and saveable."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import jax
from jax.sharding import PartitionSpec

from autoshard import export, report
from autoshard.cost_model.pipeline import PipelineChoice
from autoshard.passes.annotate import Layout
from autoshard.remat import RematChoice


@dataclass(frozen=True)
class Cost:
    """Predicted per-step costs, per device.

    time: seconds (compute + communication, the ILP objective).
    comm_bytes: bytes moved per device, by collective kind.
    collectives: {kind: (count, bytes)} as the compiled program should show them.
    memory: bytes per device: arguments, outputs, activations_peak, total.
    comm_time_by_kind: communication seconds per step, by collective kind.
    """

    time: float
    compute_time: float
    comm_time: float
    comm_bytes: dict[str, float]
    collectives: dict[str, tuple[int, float]]
    memory: dict[str, float]
    comm_time_by_kind: dict[str, float] = field(default_factory=dict)
    # per operation: (flops, bytes of memory traffic) per device per step, for re-pricing
    # the plan on other hardware (autoshard.cost_model.calibration); () when unknown
    ops: tuple[tuple[float, float], ...] = field(default=(), repr=False, compare=False)


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
      pipeline: the pipeline parallelism chosen (stages, microbatches, schedule,
        bubble, per-stage memory), or None.
      remat: the rematerialisation of layer stacks chosen (autoshard.remat.RematChoice:
        policy, layers, residual bytes saved with and without it), or None.

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
    pipeline: PipelineChoice | None = None
    remat: RematChoice | None = None

    def summary(self, rich: bool | None = None) -> str:
        """A readable report: the mesh, one row per parameter (its optimizer moments
        folded in), every other input leaf, and the predicted costs.

        Args:
          rich: draw the table with `rich` (None: when it is installed).

        Returns:
          The report as a string.

        Example:
          >>> print(step.plan(state, batch).summary())      # doctest: +SKIP
        """
        return report.summary(self, rich)

    def diff(self, other: Plan) -> report.PlanDiff:
        """What changes from this plan to `other`: tensor by tensor, and the predicted
        step time, memory and collectives. `print()` it for a report.

        Example:
          >>> print(plan_a.diff(plan_b))                    # doctest: +SKIP
        """
        return report.diff(self, other)

    def plot(self):
        """A matplotlib Figure: the dimension each mesh axis splits, per parameter, and
        the predicted step time by compute and collective kind (needs matplotlib).

        Example:
          >>> plan.plot().savefig("plan.png")               # doctest: +SKIP
        """
        return report.figure(self)

    def shardings(self):
        """The plan's input shardings: `NamedSharding` pytrees shaped like the step's
        arguments (for `jax.device_put`, or as an orbax restore target).

        Example:
          >>> state_sh, batch_sh = plan.shardings()         # doctest: +SKIP
        """
        to_sharding = lambda p: jax.sharding.NamedSharding(self.mesh, p)
        return jax.tree_util.tree_map(to_sharding, self.in_specs, is_leaf=_is_spec)

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
        return json.dumps(self.to_doc(), indent=1)

    def to_doc(self) -> dict:
        """The plan as a JSON-ready dict (what `to_json` writes, `from_doc` reads)."""
        return {
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
            "pipeline": asdict(self.pipeline) if self.pipeline else None,
            "remat": asdict(self.remat) if self.remat else None,
        }

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
        return cls.from_doc(doc, mesh)

    @classmethod
    def from_doc(cls, doc: dict, mesh, in_specs=None, out_specs=None, layout=None) -> Plan:
        """The plan `to_doc` described, on `mesh`. Specs come back as flat lists unless
        `in_specs` / `out_specs` (pytrees) are given; `layout` is not part of the doc."""
        cost = dict(doc["cost"])
        cost["collectives"] = {k: tuple(v) for k, v in cost["collectives"].items()}
        cost["ops"] = tuple(tuple(o) for o in cost.get("ops", ()))
        solver = dict(doc["solver"])
        solver["mesh_shape"] = tuple(solver["mesh_shape"])
        entries = tuple(
            Entry(e["path"], tuple(e["shape"]), e["dtype"], _spec_from_json(e["spec"]))
            for e in doc["inputs"]
        )
        return cls(
            mesh,
            specs_from_json(doc["in_specs"]) if in_specs is None else in_specs,
            specs_from_json(doc["out_specs"]) if out_specs is None else out_specs,
            Cost(**cost),
            SolverStats(**solver),
            entries,
            layout,
            pipeline=PipelineChoice(**doc["pipeline"]) if doc.get("pipeline") else None,
            remat=_remat_from_json(doc.get("remat")),
        )


def _remat_from_json(doc) -> RematChoice | None:
    if not doc:
        return None
    return RematChoice(**{**doc, "layers": tuple(doc["layers"])})


def _is_abstract(mesh) -> bool:
    return isinstance(mesh, jax.sharding.AbstractMesh)


def _spec_json(p: PartitionSpec) -> list:
    return [list(d) if isinstance(d, tuple) else d for d in p]


def _spec_from_json(d: list) -> PartitionSpec:
    return PartitionSpec(*[tuple(x) if isinstance(x, list) else x for x in d])


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def _specs_to_json(tree) -> dict:
    leaves, treedef = jax.tree_util.tree_flatten(tree, is_leaf=_is_spec)
    return {"leaves": [_spec_json(p) for p in leaves], "treedef": str(treedef)}


def specs_from_json(doc) -> list:
    """Saved spec pytrees come back as a flat list (pytree classes are not portable)."""
    return [_spec_from_json(p) for p in doc["leaves"]]
